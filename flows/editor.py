"""Edit your own images from Python, the way the bulk-edit flow edits a catalog::

    editor = Editor.from_config("configs/toy.yaml")          # models, mappers, Rₛ: loaded once
    result = editor.edit(["photo.png", pil_image], ["a red shape", "a shape -> a square"])
    result.images[0].save("red.png")                         # result.edits[0]: what was done

Every step is the pipeline's own stage code, run in this process on a temporary run root (no
Prefect, no Ray): the ingest stage reads, validates and resizes each input (``ingest.resize`` into
``ingest.image_size``; with ``ingest.align``, a face is first aligned as FFHQ's were), the invert
stage inverts it with e4e, the embed stage takes its CLIP image embedding, and the edit stage (``tasks.edit.processor.EditProcessor``) turns each prompt into Δt, runs the
mapper, applies the relevance mask and the strength, and decodes — with the shards, batches and
item order of the bulk-edit flow. So an edit here equals the flow's edit of the same file under the
same config, pixel for pixel (tests/test_editor.py). The models are located as the bulk-edit stage
locates them (``tasks.edit_plan.edit_builder``: the run's trained mappers and relevance matrix).

Bad input never stops a call: an unreadable or too small image, an empty or too long prompt, an
unknown method or decoder fail only their own edits, each with its reason (``Edit.error``).
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from flows.editor_inputs import (
    array_image,
    as_list,
    describe_source,
    is_prompt_pair_batch,
    pil_image,
    what_ingest_did,
)
from flows.editor_results import Edit, EditResult, InputReport
from infra.config import ConfigError, RunConfig, load_config
from infra.runtime.shards import Item, plan_shards
from infra.runtime.stage import execute_shard
from infra.runtime.upstream import plan_downstream
from infra.storage.fsio import Location
from infra.storage.records import MemorySink, Record
from infra.storage.store import StageStore
from models import edit_directions as ed
from models import zoo
from tasks.edit.plan import edit_builder
from tasks.edit.processor import (
    GENERATOR,
    EditModels,
    EditProcessor,
    edit_key,
    plan_edits,
    recon_key,
)
from tasks.embed import EmbedProcessor
from tasks.ingest import IngestProcessor, to_rgb
from tasks.invert import InvertProcessor
from tasks.layout import Stages, relevance_stage
from tasks.prompts import EditVariant, load_prompts, resolve_tau

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]
Prompt = Union[str, tuple[str, str], EditVariant]
DECODERS = ("generator", "diffusion", "diffusion_masked")
ARROWS = ("->", "→")
DEMO_HINT = (
    "on the toy domain, `deltaedit demo` (make demo) makes every input of the edits: the "
    "relevance matrix and both mappers"
)
_STAGE_FP = "editor"  # code fingerprint of the temporary stores (no run's is compared)
RUN = Stages.of()  # the temporary run's stages


class Editor:
    """The edit stage of a run, loaded once, for images and prompts given in Python."""

    def __init__(
        self,
        cfg: RunConfig,
        models: EditModels,
        encoder: Any,
        where: str,
        neutral_source: str | None = None,
        ingester: IngestProcessor | None = None,
    ) -> None:
        self.cfg, self.models, self.encoder, self.where = cfg, models, encoder, where
        self.neutral_source = neutral_source  # the source of a prompt given as a target alone
        # the ingest stage's processor, kept across calls (ingest.align's landmark model loaded once)
        self.ingester = ingester or IngestProcessor(cfg.ingest, cfg.storage_options)
        self._texts: dict[Any, Any] = {}  # Δt per prompt, kept across calls (stage's cache)

    @classmethod
    def from_config(
        cls,
        config: str | Path | RunConfig | None,
        overrides: Sequence[str] = (),
        methods: Sequence[str] | None = None,
        decoders: Sequence[str] | None = None,
        neutral_source: str | None = None,
    ) -> Editor:
        """Load the generator, e4e, CLIP, the mappers of ``methods`` (default: the config's
        bulk_edit.methods) and Rₛ as the bulk-edit stage finds them, and the diffusion decoder when
        ``decoders`` (default: bulk_edit.decoder) asks for it. A missing model, mapper or Rₛ is a
        ConfigError naming the command that makes it. ``neutral_source``: the source text of
        prompts given as a target alone (default: the source most of bulk_edit.prompts use).
        """
        if isinstance(config, RunConfig):
            cfg, where = config, "<config>"
        else:
            cfg, where = load_config(config, list(overrides)), str(config or "<defaults>")
        for name, given, known in (
            ("method", methods, ed.METHODS),
            ("decoder", decoders, DECODERS),
        ):
            unknown = [v for v in given or () if v not in known]
            if unknown:
                raise ConfigError(f"unknown {name} {unknown}: one of {', '.join(known)}")
        if cfg.models.encoder is None:
            raise ConfigError(f"{where}: editing images needs models.encoder (e4e) to invert them")
        ingester = IngestProcessor(cfg.ingest, cfg.storage_options)  # ingest.align: checked first
        be = cfg.bulk_edit
        be = be.model_copy(
            update={
                "methods": list(be.methods if methods is None else methods),
                "decoder": list(be.decoder if decoders is None else decoders),
                "max_images": None,
                "diffusion": be.diffusion.model_copy(update={"methods": None, "max_images": None}),
            }
        )
        cfg = cfg.model_copy(update={"bulk_edit": be})
        try:
            builder = edit_builder(cfg, where)
        except ConfigError as exc:  # a missing mapper or Rₛ: say how the demo makes it
            raise ConfigError(
                f"{exc}; {DEMO_HINT}" if "deltaedit run" in str(exc) else str(exc)
            ) from None
        if builder.relevance_stage is None and _has_relevance(cfg):
            builder = replace(builder, relevance_stage=relevance_stage(cfg.relevance.mode))
        # the stage sets torch's threads to its actor's CPUs; here the caller's setting stays
        models = replace(builder, cpus=torch.get_num_threads()).build().models
        opts = cfg.storage_options
        encoder = zoo.build(cfg.models.encoder, device=models.device, storage_options=opts).eval()
        if neutral_source is None:
            neutral_source = _neutral_source(cfg)
        return cls(cfg, models, encoder, where, neutral_source, ingester)

    @property
    def methods(self) -> list[str]:
        return list(self.cfg.bulk_edit.methods)

    @property
    def decoders(self) -> list[str]:
        return list(self.cfg.bulk_edit.decoder)

    def requirements(self) -> str:
        """What the generator needs of an input image and what ingest does to give it that."""
        ing, size = self.cfg.ingest, self.models.generator.size
        how = {
            "fit": "fitted into a square (aspect ratio kept, padded with black)",
            "center_crop": "center-cropped to a square",
            "none": "kept as it is (the encoder squashes it to a square)",
        }[ing.resize]
        if ing.align is not None:
            side = ing.align.output_size or ing.image_size
            how = f"face-aligned as FFHQ's faces (ingest.align) to {side}x{side}, then {how}"
        return (
            f"the generator makes {size}x{size} RGB images; each input (any size, at least "
            f"{ing.min_side} px a side) is {how} at {ing.image_size}x{ing.image_size} "
            f"(ingest.resize={ing.resize}), then inverted by e4e at "
            f"{self.encoder.input_size} px"
        )

    def edit(
        self,
        images: ImageInput | Sequence[ImageInput],
        prompts: Prompt | Sequence[Prompt],
        method: str | Sequence[str] = "deltaedit",
        strength: float = 1.0,
        tau: float | None = None,
        decoder: str | Sequence[str] = GENERATOR,
        seed: int = 0,
        progress: bool = False,
    ) -> EditResult:
        """Edit every image with every prompt, method and decoder (image-major order).

        ``images``: paths or URIs, PIL images or (H, W[, 3|4]) uint8 arrays, one or a list.
        ``prompts``: "source -> target", a target alone (source: ``neutral_source``), a
        (source, target) pair or an ``EditVariant``, one or a list. ``tau``: the relevance threshold
        (None: bulk_edit.tau, under bulk_edit.threshold). ``seed`` seeds torch for the call (the
        global random state is restored after).
        """
        if not math.isfinite(strength):
            raise ValueError(f"strength must be a finite number, got {strength}")
        if tau is not None and not tau >= 0:
            raise ValueError(f"tau must be >= 0 (or None for bulk_edit.tau), got {tau}")
        start = time.perf_counter()
        images = as_list(images, (str, os.PathLike, Image.Image, np.ndarray))
        prompt_list = as_list(prompts, (str, tuple, EditVariant))
        methods = as_list(method, (str,))
        decoders = as_list(decoder, (str,))
        variants = [self._variant(n, p, strength, tau) for n, p in enumerate(prompt_list)]
        method_errors = {m: self._method_error(m) for m in methods}
        decoder_errors = {d: self._decoder_error(d) for d in decoders}
        ok_variants = [v for v in variants if isinstance(v, EditVariant)]
        ok_methods = list(dict.fromkeys(m for m in methods if method_errors[m] is None))
        ok_decoders = list(dict.fromkeys(d for d in decoders if decoder_errors[d] is None))
        be = self.cfg.bulk_edit.model_copy(update={"methods": ok_methods, "decoder": ok_decoders})
        timings: dict[str, float] = {}
        bar = tqdm(desc="deltaedit edit", unit="shard", total=0, disable=not progress)
        with (
            tempfile.TemporaryDirectory(prefix="deltaedit-edit-") as tmp,
            _seeded(seed, self.models.device),
            bar,
        ):
            root = Location(tmp)
            inputs, items = self._ingest(images, root, timings, bar)
            self._invert(root, inputs, timings, bar)
            records, seconds = self._edit_stage(
                root, be, ok_variants if ok_methods else [], ok_methods, timings, bar
            )
        for report in inputs:
            recon = records.get(recon_key(items[report.index].key))
            if recon is not None and recon.image is not None:
                report.reconstruction = pil_image(recon.image)
        edits = []
        for report in inputs:
            key = items[report.index].key
            for p, variant in enumerate(variants):
                for m in methods:
                    for d in decoders:
                        error = (
                            report.error
                            or (variant if isinstance(variant, str) else None)
                            or method_errors[m]
                            or decoder_errors[d]
                        )
                        edits.append(
                            self._outcome(
                                report,
                                p,
                                prompt_list[p],
                                variant,
                                m,
                                d,
                                error,
                                records,
                                seconds,
                                key,
                            )
                        )
        timings["total"] = round(time.perf_counter() - start, 4)
        return EditResult(edits, inputs, timings, self.requirements(), seed)

    # --- inputs ---------------------------------------------------------------------------------

    def _ingest(
        self, images: list[Any], root: Location, timings: dict[str, float], bar: Any
    ) -> tuple[list[InputReport], list[Item]]:
        """The ingest stage over the inputs (in-memory ones written as PNG first)."""
        t0 = time.perf_counter()
        reports, items = [], []
        for n, image in enumerate(images):
            key = f"i{n:06d}"  # sorts in input order, as plan_shards sorts
            report = InputReport(n, describe_source(image, n))
            try:
                source = self._source(image, root, key)
            except (ValueError, TypeError, OSError) as exc:
                report.error, source = f"cannot read input ({exc})", f"<image {n}>"
            reports.append(report)
            items.append(Item(key, source))
        store = StageStore(root, RUN.images)
        processor = self.ingester
        good = [i for i, r in zip(items, reports) if r.ok]
        specs = plan_shards(good, self.cfg.ingest.shard_size)
        _grow(bar, 3 * len(specs))  # ingest, invert and embed each shard
        for spec in specs:
            execute_shard(processor, spec, store, _STAGE_FP)
            bar.update(1)
            for row in store.manifest(spec.shard_id).to_pylist():
                report = reports[int(row["key"][1:])]
                if row["status"] != "ok":
                    report.error = row["error"]
                    continue
                report.original_size = (row["orig_width"], row["orig_height"])
                report.size = (row["width"], row["height"])
                report.done, report.content_box = what_ingest_did(
                    row, self.cfg.ingest.image_size, self.cfg.ingest.resize
                )
        timings["ingest"] = round(time.perf_counter() - t0, 4)
        return reports, items

    def _source(self, image: Any, root: Location, key: str) -> str:
        """Where the ingest stage reads an input: its own path, or a PNG of an in-memory image."""
        if isinstance(image, (str, os.PathLike)):
            return os.fspath(image)
        if isinstance(image, np.ndarray):
            image = array_image(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a path, a PIL image or an array, got {type(image).__name__}")
        image = to_rgb(ImageOps.exif_transpose(image))  # as ingest treats a file's pixels
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        folder = root.child("inputs")
        folder.write_bytes(f"{key}.png", buf.getvalue())
        return folder.url(f"{key}.png")

    def _invert(
        self, root: Location, inputs: list[InputReport], timings: dict[str, float], bar: Any
    ) -> None:
        """The invert and embed stages over the ingested images (their processors, batches)."""
        images, codes = StageStore(root, RUN.images), StageStore(root, RUN.codes)
        m = self.models
        invert = InvertProcessor(
            self.encoder, m.generator, images, self.cfg.invert.batch_size, False, str(m.device)
        )
        embed = EmbedProcessor(m.clip, images, self.cfg.embed.batch_size)
        for name, processor, out in (
            ("invert", invert, codes),
            ("embed", embed, StageStore(root, RUN.clip)),
        ):
            t0 = time.perf_counter()
            for spec in plan_downstream(images):
                if spec.items:
                    execute_shard(processor, spec, out, _STAGE_FP)
                bar.update(1)
            timings[name] = round(time.perf_counter() - t0, 4)
        for shard in codes.finished():
            for row in codes.manifest(shard).to_pylist():
                report = inputs[int(row["key"][1:])]
                if row["status"] != "ok":
                    report.error = f"inversion failed: {row['error']}"
                else:
                    report.inversion_psnr = row["psnr"]

    def _edit_stage(
        self,
        root: Location,
        be: Any,
        variants: list[EditVariant],
        methods: list[str],
        timings: dict[str, float],
        bar: Any,
    ) -> tuple[dict[str, Record], dict[str, float]]:
        """The edit stage's processor over the bulk-edit flow's shards of these codes."""
        t0 = time.perf_counter()
        codes = StageStore(root, RUN.codes)
        processor = EditProcessor(
            self.models,
            codes,
            StageStore(root, RUN.clip),
            be,
            StageStore(root, RUN.images),
            _texts=self._texts,
        )
        records: dict[str, Record] = {}
        seconds: dict[str, float] = {}
        specs = [s for s in plan_edits(codes, variants, methods, be) if s.items]
        _grow(bar, len(specs))
        for spec in specs:
            t1, sink = time.perf_counter(), MemorySink()
            processor(spec, sink)
            share = (time.perf_counter() - t1) / len(spec.items)
            for record in sink.records:
                records[record.key], seconds[record.key] = record, round(share, 4)
            bar.update(1)
        timings["edit"] = round(time.perf_counter() - t0, 4)
        return records, seconds

    # --- prompts, methods, outcomes ---------------------------------------------------------------

    def _variant(
        self, n: int, prompt: Any, strength: float, tau: float | None
    ) -> EditVariant | str:
        """The edit variant of a prompt, or why it cannot be one."""
        if isinstance(prompt, EditVariant):
            variant = replace(prompt, prompt_id=f"p{n:03d}")
        else:
            terms = self._terms(prompt)
            if isinstance(terms, str):
                return terms
            variant = EditVariant(f"p{n:03d}", (terms,), tau, float(strength))
        [variant] = resolve_tau([variant], self.cfg.bulk_edit.tau)
        if variant.tau > 0 and self.models.relevance is None:
            return (
                f"tau {variant.tau} needs the relevance matrix "
                f"{relevance_stage(self.cfg.relevance.mode)}, "
                f"which {self.cfg.root} does not have (run `deltaedit run relevance`; "
                f"{DEMO_HINT})"
            )
        return variant

    def _terms(self, prompt: Any) -> tuple[str, str, float] | str:
        """(source, target, 1) of "source -> target", a target alone or a pair; else the error."""
        if isinstance(prompt, tuple) and not is_prompt_pair_batch(prompt):
            return prompt[0], prompt[1], 1.0
        if not isinstance(prompt, str):
            return (
                "a prompt must be 'source -> target', a target text or a (source, target) "
                f"pair, got {prompt!r}"
            )
        for arrow in ARROWS:
            if arrow in prompt:
                source, target = prompt.split(arrow, 1)
                return source.strip(), target.strip(), 1.0
        if self.neutral_source is None:
            return (
                f"prompt {prompt!r} has no source text: write 'source -> target', pass a "
                "(source, target) pair, or set a neutral source (Editor.neutral_source, "
                "--source)"
            )
        return self.neutral_source, prompt.strip(), 1.0

    def _method_error(self, method: str) -> str | None:
        if method not in ed.METHODS:
            return f"unknown method {method!r}: one of {', '.join(ed.METHODS)}"
        if method not in self.methods:
            return (
                f"method {method!r} was not loaded (this editor has {self.methods}): "
                f"Editor.from_config(..., methods=[..., {method!r}])"
            )
        return None

    def _decoder_error(self, decoder: str) -> str | None:
        if decoder not in DECODERS:
            return f"unknown decoder {decoder!r}: one of {', '.join(DECODERS)}"
        if decoder not in self.decoders:
            return (
                f"decoder {decoder!r} was not loaded (this editor has {self.decoders}): "
                f"Editor.from_config(..., decoders=[..., {decoder!r}])"
            )
        return None

    def _outcome(
        self,
        report: InputReport,
        p: int,
        prompt: Any,
        variant: EditVariant | str,
        method: str,
        decoder: str,
        error: str | None,
        records: dict[str, Record],
        seconds: dict[str, float],
        image_key: str,
    ) -> Edit:
        text = (
            f"{variant.source_text} -> {variant.target_text}"
            if isinstance(variant, EditVariant)
            else str(prompt)
        )
        edit = Edit(report.index, p, report.source, text, method, decoder, error=error)
        if error is not None:
            return edit
        key = edit_key(image_key, variant, method, decoder)  # variant: an EditVariant here
        record = records.get(key)
        if record is None:  # not planned: cannot happen
            edit.error = "the edit stage made no record of this edit"
            return edit
        f = record.fields
        edit.tau = None if math.isnan(f["tau"]) else f["tau"]
        edit.strength, edit.channels_changed = f["strength"], f["channels_changed"]
        edit.seconds = seconds.get(key, 0.0)
        if record.status != "ok":
            edit.error = record.error
        else:
            edit.image = pil_image(record.image)
        return edit


# --- helpers --------------------------------------------------------------------------------------


def _neutral_source(cfg: RunConfig) -> str | None:
    """The source text most single-term prompts of bulk_edit.prompts use ("a shape" on the toy)."""
    if not cfg.bulk_edit.prompts:
        return None
    try:
        variants = load_prompts(cfg.bulk_edit.prompts, cfg.storage_options)
    except ConfigError:
        return None
    sources = Counter(v.terms[0][0] for v in variants if len(v.terms) == 1)
    return sources.most_common(1)[0][0] if sources else None


def _has_relevance(cfg: RunConfig) -> bool:
    """Whether the run has finished blocks of Rₛ (the build then loads and checks them)."""
    stage = StageStore(Location(cfg.root, cfg.storage_options), relevance_stage(cfg.relevance.mode))
    return bool(stage.finished())


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch seeded for the call; the caller's random state restored afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _grow(bar: Any, n: int) -> None:
    """Add ``n`` steps to the bar's total (each stage knows its shards only once it plans them)."""
    bar.total = (bar.total or 0) + n
    bar.refresh()
