"""How the edit stage's models are loaded, once per actor, and what its output depends on (``EditBuilder``).

``build`` loads the generator, CLIP, the mappers, Rₛ, StyleCLIP-GD's σ, DeltaEdit-D's decoder and the
image-embedding memory of ``bulk_edit.condition: retrieved`` into an ``EditProcessor`` (tasks/edit/processor.py);
``fingerprint`` names every input the edits depend on, so a changed model, Rₛ block or memory shard redoes
the stage and nothing else does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from infra.config import BulkEditConfig, RelevanceConfig
from infra.runtime.stage import code_fingerprint
from infra.storage.fsio import Location
from infra.storage.store import StageStore
from models import edit_directions as ed
from models import zoo
from models.compiled import FixedBatchCompiled
from models.device import DeviceChoice
from models.imaging import encode_image
from models.relevance import style_statistics
from models.stylegan2 import StyleCode
from models.zoo import ModelSpec
from tasks.actor import ActorModels
from tasks.edit.diffusion import DiffusionDecoder
from tasks.edit.memory import load_memory, memory_identity
from tasks.edit.processor import EditModels, EditProcessor
from tasks.layout import CLIP_IMAGES, CODES, EDITS, IMAGES
from tasks.relevance import load_relevance


@dataclass(frozen=True)
class EditBuilder:
    """Loads the generator, CLIP, mappers and Rₛ once per actor (``build``)."""

    generator: ModelSpec
    clip: ModelSpec
    mappers: tuple[tuple[str, ModelSpec], ...]  # (method, mapper spec) for the mapper-based methods
    root: str
    cfg: BulkEditConfig
    relevance_stage: str | None  # None: no relevance threshold (and no StyleCLIP-GD)
    diffusion: ModelSpec | None = None  # DeltaEdit-D's decoder (when bulk_edit.decoder has it)
    n_stat_samples: int = RelevanceConfig().n_stat_samples  # codes for StyleCLIP-GD's per-channel σ
    seed: int = 0
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    device: DeviceChoice = "auto"
    cpus: float = 1.0
    codes_stage: str = CODES  # where the codes (and clip_<images>) come from
    clip_stage: str = CLIP_IMAGES
    images_stage: str = IMAGES  # the photos the codes were inverted from
    stage: str = EDITS
    memory_stages: tuple[str, ...] = ()  # CLIP stages searched by condition=retrieved (else none)
    eval_fraction: float = 0.0  # split.eval_fraction: the catalog's eval part is not in the memory
    # the mappers' and the diffusion decoder's identities go into each edit's item (``item_models``,
    # set by bulk-edit's plan) instead of the stage's fingerprint: a new method or decoder then
    # computes only its own edits
    models_per_item: bool = False

    def build(self) -> EditProcessor:
        models = ActorModels.start(self)
        device, opts = models.device, self.storage_options
        gen, clip = models.load(self.generator).eval(), models.load(self.clip)
        mappers = {m: models.load(spec).eval() for m, spec in self.mappers}
        relevance = sigma = None
        if self.relevance_stage is not None:
            relevance = load_relevance(self.root, self.relevance_stage, opts).to(device)
        if "styleclip_gd" in self.cfg.methods:
            sigma = style_statistics(gen, self.n_stat_samples, 1, self.seed).std.to(device)
        synthesize = compiled_synthesis(gen, self.cfg.batch_size) if self.cfg.compile else None
        diffusion = None
        if self.diffusion is not None:
            diffusion = DiffusionDecoder(
                models.load(self.diffusion).eval(),
                self.cfg.diffusion,
                self.cfg.batch_size,
                lambda conv, rgb: gen.synthesize(StyleCode(conv, rgb)),
            )
        root = Location(self.root, opts)
        memory = None
        if self.memory_stages:
            memory = load_memory(
                root,
                self.memory_stages,
                self.cfg.retrieve_k,
                self.cfg.memory_rows,
                self.seed,
                self.eval_fraction,
            ).to(device)
        meta = {
            "generator": self.generator.model_dump(mode="json"),
            "clip": clip.describe(),
            "relevance_stage": self.relevance_stage,
            "settings": self.cfg.model_dump(mode="json"),
            "diffusion": None if self.diffusion is None else self.diffusion.model_dump(mode="json"),
        }
        return EditProcessor(
            EditModels(gen, clip, mappers, relevance, sigma, diffusion, synthesize, memory),
            StageStore(root, self.codes_stage),
            StageStore(root, self.clip_stage),
            self.cfg,
            StageStore(root, self.images_stage),
            meta,
        )

    def fingerprint(self) -> str:
        """Code + settings + the identity of every input the edits depend on (model files, Rₛ blocks).

        With ``models_per_item``, which methods and decoders run and their models are left to the items
        (``item_models``): they say which edits exist, not how any one edit comes out."""
        exclude: dict[str, Any] = {
            "prompts": True,
            "catalog": True,
            "max_images": True,
            "images_per_shard": True,
            "batch_size": True,
            "compile": True,
            "diffusion": {"max_images"},
        }
        if self.models_per_item:
            exclude.update(
                {"methods": True, "decoder": True, "diffusion": {"max_images", "methods"}}
            )
        settings = self.cfg.model_dump(mode="json", exclude=exclude)
        specs = {"generator": self.generator, "clip": self.clip}
        if not self.models_per_item:
            specs.update(dict(self.mappers))
            if self.diffusion is not None:
                specs["diffusion"] = self.diffusion
        models = {name: zoo.identity(spec, self.storage_options) for name, spec in specs.items()}
        relevance = None
        if self.relevance_stage is not None:
            store = StageStore(Location(self.root, self.storage_options), self.relevance_stage)
            relevance = sorted(
                (m["shard_id"], m["input_fingerprint"], m["code_fingerprint"])
                for m in map(store.marker, store.finished())
                if m
            )
        memory = memory_identity(Location(self.root, self.storage_options), self.memory_stages)
        config = {
            "settings": settings,
            "models": models,
            "relevance": relevance,
            "memory": memory,
            **({"memory_eval_fraction": self.eval_fraction} if self.eval_fraction else {}),
            "inputs": [self.codes_stage, self.clip_stage, self.images_stage],
            "n_stat_samples": self.n_stat_samples,
            "seed": self.seed,
        }
        return code_fingerprint(
            EditProcessor,
            ed.global_direction,
            DiffusionDecoder,
            encode_image,
            memory_identity,
            config=config,
        )


def item_models(builder: EditBuilder) -> dict[str, Any]:
    """The identity of each method's mapper and of the diffusion decoder (``models_per_item``)."""
    specs = dict(builder.mappers)
    if builder.diffusion is not None:
        specs["diffusion"] = builder.diffusion
    return {name: zoo.identity(spec, builder.storage_options) for name, spec in specs.items()}


def compiled_synthesis(generator: Any, batch_size: int) -> FixedBatchCompiled:
    """``generator.synthesize`` as a (conv, rgb) function compiled for batches of ``batch_size``."""
    return FixedBatchCompiled(
        lambda conv, rgb: generator.synthesize(StyleCode(conv, rgb)), batch_size
    )
