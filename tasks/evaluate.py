"""Metrics stage: per-edit measurements of one edits shard → the ``metrics`` store.

For every ok edit (and every reconstruction) of the shard it reads the edited image, the image's
reconstruction by the same decoder (G(s), or the DDIM reconstruction for DeltaEdit-D; same edits shard)
and its input (images store), and records:

- psnr / ssim / mse of the edit against the reconstruction (how much the edit changed; for the
  reconstruction row: against the input, i.e. the inversion's fidelity);
- psnr_input / ssim_input of the edit against the input x (resized to the edit's size), as the paper's
  Tab. 1 measures PSNR: inversion error and edit together;
- clip_direction: cos(E(edit) − E(recon), Δt) with the run's CLIP and prompt templates;
- edit_accuracy / preservation from the attribute oracle when one is configured (the toy domain):
  the attributes the target text names (minus the source's) must be read from the edit, the others must
  read as on the reconstruction, so inversion errors are not charged to the edit; for the reconstruction
  row, preservation = agreement with the input; unedited_accuracy = how often the reconstruction already
  shows the target (the chance level an edit must beat);
- lpips (edit vs recon; the reconstruction row: vs the input) and identity (edit vs input: the cosine of
  ArcFace IR-SE-50 embeddings, e4e's model_ir_se50.pth, or of a TorchScript network's) when their
  networks are supplied;
- vectors ``features`` (the FID-family extractor on this image: torch-fidelity's TF Inception, or the
  run's CLIP) and ``input_features`` (on its input), from which the flow computes FID and KID per prompt.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from infra.config import EvaluateConfig, RunConfig
from infra.runtime.shards import Item, ShardSpec
from infra.runtime.stage import code_fingerprint
from infra.storage.fsio import Location
from infra.storage.readers import decode_image, encoded_image, iter_image_samples
from infra.storage.records import Sink
from infra.storage.store import StageStore
from models import metrics as M
from models import zoo
from models.device import DeviceChoice
from models.edit_directions import TEMPLATES, text_direction
from models.imaging import resize_to
from models.toy.captions import changed_attributes, expected_values
from models.toy.oracle import Oracle
from models.zoo import ModelSpec
from tasks.actor import ActorModels
from tasks.edit.processor import RECON, recon_key
from tasks.layout import EDITS, IMAGES, METRICS, Stages

NAN = float("nan")
_FILES = (
    "oracle",
    "inception_weights",
    "lpips_weights",
    "identity_model",
)  # fingerprinted by content
COPIED = (
    "image_key",
    "prompt_id",
    "method",
    "decoder",
    "source_text",
    "target_text",
    "strength",
    "omega",
    "channels_changed",
    "mask_fraction",
    "psnr_outside_mask",
)


@dataclass
class MetricsModels:
    clip: Any  # models.clip.ClipEncoder (clip_direction)
    features: (
        M.FeatureExtractor
    )  # FID-family features (torch-fidelity's Inception or the run's CLIP)
    oracle: Any | None = None  # models.toy.oracle.Oracle
    lpips: Callable[[Tensor, Tensor], Tensor] | None = None
    identity: M.FeatureExtractor | None = None


@dataclass
class MetricsProcessor:
    models: MetricsModels
    edits: StageStore
    images: StageStore
    templates: str = "imagenet"
    batch_size: int = 64
    output_metadata: dict[str, Any] = field(default_factory=dict)
    _directions: dict[str, Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def __call__(self, spec: ShardSpec, sink: Sink) -> None:
        rows = {r["key"]: r for r in self.edits.manifest(spec.shard_id).to_pylist()}
        edited = {s["__key__"]: _image(s) for s in iter_image_samples(self.edits, [spec.shard_id])}
        wanted = {r["image_key"] for r in rows.values()}
        inputs = {
            s["__key__"]: _image(s)
            for s in iter_image_samples(self.images, [_images_shard(spec)])
            if s["__key__"] in wanted
        }
        for chunk in _batches(spec.items, lambda i: tuple(edited[i.key].shape), self.batch_size):
            meta = [rows[i.key] for i in chunk]
            edit = torch.stack([edited[i.key] for i in chunk])
            recon = torch.stack([edited[recon_key(m["image_key"], m["decoder"])] for m in meta])
            source = torch.stack([inputs[m["image_key"]] for m in meta])
            for n, (item, values, vectors) in enumerate(
                self._measure(chunk, meta, edit, recon, source)
            ):
                sink.add(
                    item.key,
                    item.source,
                    vectors=vectors,
                    **{k: meta[n][k] for k in COPIED},
                    variant=_variant(item.key),
                    **values,
                )

    def _measure(
        self, chunk: list, meta: list[dict[str, Any]], edit: Tensor, recon: Tensor, source: Tensor
    ) -> list[tuple[Any, dict[str, float], dict[str, Tensor]]]:
        is_recon = torch.tensor([m["method"] == RECON for m in meta])
        source_at_edit = _resize(source, edit)
        ref = torch.where(is_recon[:, None, None, None], source_at_edit, recon)  # recon: vs input
        values = {k: v.tolist() for k, v in M.pixel_metrics(edit, ref).items()}
        vs_input = M.pixel_metrics(edit, source_at_edit)  # the paper's Tab. 1 PSNR
        values.update(psnr_input=vs_input["psnr"].tolist(), ssim_input=vs_input["ssim"].tolist())
        e_edit, e_recon = (
            self.models.clip.encode_images(x).cpu() for x in (edit, recon)
        )  # one copy each
        values["clip_direction"] = [
            NAN
            if m["method"] == RECON
            else float(M.clip_direction(e_edit[n : n + 1], e_recon[n : n + 1], self._dt(m)))
            for n, m in enumerate(meta)
        ]
        values.update(self._oracle(meta, edit, recon, source))
        values["lpips"] = (
            self.models.lpips(edit, ref).tolist() if self.models.lpips else [NAN] * len(meta)
        )
        values["identity"] = (
            M.identity_similarity(self.models.identity, edit, source).tolist()
            if self.models.identity
            else [NAN] * len(meta)
        )
        feats, feats_in = self.models.features(edit), self.models.features(source)
        return [
            (
                item,
                {k: float(v[n]) for k, v in values.items()},
                {"features": feats[n], "input_features": feats_in[n]},
            )
            for n, item in enumerate(chunk)
        ]

    def _oracle(
        self, meta: list[dict[str, Any]], edit: Tensor, recon: Tensor, source: Tensor
    ) -> dict[str, list[float]]:
        """edit_accuracy and preservation per row (NaN without an oracle)."""
        if self.models.oracle is None:
            return {
                k: [NAN] * len(meta) for k in ("edit_accuracy", "unedited_accuracy", "preservation")
            }

        after, before, truth = (self.models.oracle.predict(x) for x in (edit, recon, source))
        acc, unedited, keep = [], [], []
        for n, m in enumerate(meta):
            pick = lambda readings: {k: v[n : n + 1] for k, v in readings.items()}  # noqa: E731
            if m["method"] == RECON:
                expected, scores = {}, M.oracle_scores(pick(truth), pick(after), {})
            else:
                interpolation = m["omega"] == m["omega"]  # not NaN: an ω sweep has no single target
                expected = (
                    {} if interpolation else expected_values(m["source_text"], m["target_text"])
                )
                changing = (
                    changed_attributes(m["source_text"], m["target_text"]) if interpolation else ()
                )
                scores = M.oracle_scores(pick(before), pick(after), expected, changing)
            acc.append(float(scores["edit_accuracy"][0]))
            keep.append(float(scores["preservation"][0]))
            # how often the target is read without any edit: the chance level edit_accuracy must beat
            unedited.append(
                float(M.oracle_scores(pick(before), pick(before), expected)["edit_accuracy"][0])
            )
        return {"edit_accuracy": acc, "unedited_accuracy": unedited, "preservation": keep}

    def _dt(self, meta: dict[str, Any]) -> Tensor:
        """Δt of the row's prompt, from the terms the edit stage recorded."""
        key = meta["terms"]
        if key not in self._directions:
            terms = tuple(tuple(t) for t in json.loads(key))
            dt = text_direction(self.models.clip, terms, TEMPLATES[self.templates])[0]
            self._directions[key] = dt.cpu()  # beside the embeddings, on the host
        return self._directions[key]


def _image(sample: dict[str, Any]) -> Tensor:
    return decode_image(encoded_image(sample))


def _images_shard(spec: ShardSpec) -> str:
    """Edits shard ``<codes shard>-<k>`` → its images shard (codes keep their images shard's id)."""
    return spec.shard_id.rsplit("-", 1)[0]


def _variant(key: str) -> str:
    """``<image>__<prompt>[__<sweep>]__<method>[__<decoder>]`` → ``<prompt>[__<sweep>]`` ("" for a
    reconstruction)."""
    parts = key.split("__")
    if parts[-1] in ("diffusion", "diffusion_masked"):
        parts = parts[:-1]
    return "__".join(parts[1:-1])


def _resize(images: Tensor, like: Tensor) -> Tensor:
    return resize_to(images, like.shape[-1])


@dataclass(frozen=True)
class MetricsBuilder:
    """Loads CLIP, the feature extractor and the optional networks once per actor."""

    clip: ModelSpec
    root: str
    cfg: EvaluateConfig
    templates: str = "imagenet"
    images_stage: str = IMAGES
    edits_stage: str = EDITS
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    device: DeviceChoice = "auto"
    cpus: float = 1.0
    stage: str = METRICS

    @classmethod
    def from_config(cls, cfg: RunConfig, stages: Stages) -> MetricsBuilder:
        """The metrics of ``stages.edits`` (against ``stages.images``) under this config."""
        return cls(
            clip=cfg.models.clip,
            root=cfg.root,
            cfg=cfg.evaluate,
            templates=cfg.bulk_edit.templates,
            images_stage=stages.images,
            edits_stage=stages.edits,
            storage_options=cfg.storage_options,
            device=cfg.device,
            cpus=cfg.ray.cpus_per_actor,
            stage=stages.metrics,
        )

    def build(self) -> MetricsProcessor:
        models = ActorModels.start(self)
        device, opts, c = models.device, self.storage_options, self.cfg
        clip = models.load(self.clip)
        features = (
            M.inception_extractor(c.inception_weights, device, **opts)
            if c.feature_extractor == "inception"
            else M.clip_extractor(clip)
        )
        oracle = None
        if c.oracle:
            oracle = Oracle.load(c.oracle, device=device)
        lpips = M.lpips_metric(c.lpips_weights, c.lpips_net, device) if c.lpips_weights else None
        identity = None
        if c.identity_model and c.identity_format == "torchscript":
            identity = M.torchscript_extractor(
                c.identity_model, c.identity_input_size, device, **opts
            )
        elif c.identity_model:
            identity = M.arcface_extractor(c.identity_model, device, **opts)
        root = Location(self.root, opts)
        meta = {
            "clip": clip.describe(),
            "features": c.feature_extractor,
            "identity": c.identity_format if c.identity_model else None,
            "templates": self.templates,
        }
        models = MetricsModels(clip, features, oracle, lpips, identity)
        return MetricsProcessor(
            models,
            StageStore(root, self.edits_stage),
            StageStore(root, self.images_stage),
            self.templates,
            c.batch_size,
            meta,
        )

    def fingerprint(self) -> str:
        files = [
            self.cfg.oracle,
            self.cfg.inception_weights,
            self.cfg.lpips_weights,
            self.cfg.identity_model,
        ]
        return code_fingerprint(
            MetricsProcessor,
            M.pixel_metrics,
            M.oracle_scores,
            config={
                "settings": self.cfg.model_dump(
                    mode="json", exclude={"grid_images", "report_dir", "batch_size", *_FILES}
                ),
                "features": self.cfg.feature_extractor,
                "clip": zoo.identity(self.clip, self.storage_options),
                "files": [zoo.sha256_of(f, **self.storage_options) if f else None for f in files],
                "templates": self.templates,
                "inputs": [self.images_stage, self.edits_stage],
            },
        )


def _batches(
    items: Sequence[Item], size_of: Callable[[Item], tuple], batch_size: int
) -> list[list[Item]]:
    """Batches of at most ``batch_size`` items whose edits have one image size (the generator's and a
    diffusion decoder's can differ), in the shard's order within each size."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault(size_of(item), []).append(item)
    return [g[n : n + batch_size] for g in groups.values() for n in range(0, len(g), batch_size)]
