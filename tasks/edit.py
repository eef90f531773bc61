"""Edit stage: codes (+ CLIP image embeddings) × prompt variants × methods → edited images.

One item per (image, variant, method), keyed ``<image>__<prompt id>[__<sweep point>]__<method>``, plus
``<image>__recon`` (G(s), the reference every edit is compared with). A shard holds the items of
``bulk_edit.images_per_shard`` images of one codes shard, so a rerun resumes image group by image group.
Within a shard, items that share a (variant, method) go through the mapper and the generator in
batches; records are written in the shard's item order, so a rerun writes identical bytes.

Manifest columns: image_key, prompt_id, method, source_text, target_text, terms (JSON), tau, strength,
omega, channels_changed. Timings are per shard, in the done-marker (they differ between runs; the data must not).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from infra.config import BulkEditConfig
from infra.records import Sink
from infra.shards import Item, ShardSpec
from infra.stage import code_fingerprint
from infra.store import StageStore
from infra.upstream import plan_downstream
from infra.readers import read_vectors, vectors_tensor
from models import zoo
from models.device import DeviceChoice, pick_device, set_cpu_threads
from models.stylegan2 import StyleCode
from models.zoo import ModelSpec
from tasks import edit_directions as ed
from tasks.imaging import encode_png, to_uint8
from tasks.prompts import EditVariant

RECON = "reconstruction"
NAN = float("nan")


def edit_key(image_key: str, variant: EditVariant, method: str) -> str:
    return "__".join(p for p in (image_key, variant.prompt_id, variant.suffix, method) if p)


def plan_edits(codes: StageStore, variants: Sequence[EditVariant], methods: Sequence[str], cfg: BulkEditConfig
               ) -> list[ShardSpec]:
    """Shards ``<codes shard>-<k>`` of ``images_per_shard`` images each, over the ok codes (sorted)."""
    specs, budget = [], cfg.max_images
    for upstream in plan_downstream(codes):
        items = upstream.items if budget is None else upstream.items[:max(budget, 0)]
        budget = None if budget is None else budget - len(items)
        for k, start in enumerate(range(0, len(items), cfg.images_per_shard)):
            group = items[start:start + cfg.images_per_shard]
            specs.append(ShardSpec(f"{upstream.shard_id}-{k:03d}",
                                   tuple(i for image in group
                                         for i in _image_items(image, upstream.shard_id, variants, methods, cfg))))
    return specs


def _image_items(image: Item, shard_id: str, variants: Sequence[EditVariant], methods: Sequence[str],
                 cfg: BulkEditConfig) -> list[Item]:
    base = {"image": image.key, "codes_shard": shard_id, **image.meta}
    source = f"codes/{shard_id}/{image.key}"
    items = [Item(f"{image.key}__recon", source, {**base, "method": RECON})] if cfg.reconstruction else []
    items += [Item(edit_key(image.key, v, m), source, {**base, "method": m, "variant": v.to_dict()})
              for v in variants for m in methods]
    return items


@dataclass
class EditModels:
    generator: Any                              # models.stylegan2.Generator
    clip: Any                                   # models.clip.ClipEncoder
    mappers: dict[str, torch.nn.Module]         # method -> mapper
    relevance: Tensor | None                    # (C, D) Rₛ
    sigma: Tensor | None                        # (C,) per-channel std of S (StyleCLIP-GD)


@dataclass
class EditProcessor:
    models: EditModels
    codes: StageStore
    embeddings: StageStore
    cfg: BulkEditConfig
    output_metadata: dict[str, Any] = field(default_factory=dict)
    _texts: dict[Any, Any] = field(default_factory=dict)

    def __call__(self, spec: ShardSpec, sink: Sink) -> None:
        inputs = self._inputs(spec)
        outcomes: dict[str, tuple[str, Any, dict[str, Any]]] = {}
        pending: list[tuple[Item, Tensor, Tensor, dict[str, Any]]] = []
        for (method, variant), items in _groups(spec).items():
            fields = _fields(method, variant, self.cfg.tau)
            try:
                conv, changed = self._edit(method, variant, [inputs[i.meta["image"]] for i in items])
            except ed.PromptError as exc:
                outcomes.update({i.key: ("failed", str(exc), fields) for i in items})
                continue
            rgb = torch.stack([inputs[i.meta["image"]][1] for i in items])
            pending += [(item, conv[n], rgb[n], {**fields, "channels_changed": int(changed[n])})
                        for n, item in enumerate(items)]
        self._render(pending, outcomes)
        for item in spec.items:
            status, payload, fields = outcomes[item.key]
            fields = {"image_key": item.meta["image"], **fields}
            if status == "ok":
                sink.add(item.key, item.source, image=payload, image_ext=self.cfg.image_format, **fields)
            else:
                sink.add_failure(item.key, item.source, payload, **fields)

    def _inputs(self, spec: ShardSpec) -> dict[str, tuple[Tensor, Tensor, Tensor | None]]:
        """image key -> (s, s_rgb, CLIP embedding or None) from the codes and clip_images shards."""
        shard = spec.items[0].meta["codes_shard"]
        codes = read_vectors(self.codes, [shard])
        keys = codes.column("key").to_pylist()
        s, rgb = vectors_tensor(codes, "s"), vectors_tensor(codes, "s_rgb")
        emb: dict[str, Tensor] = {}
        if shard in self.embeddings.finished() and self.embeddings.loc.exists(f"{shard}.parquet"):
            table = read_vectors(self.embeddings, [shard])
            emb = dict(zip(table.column("key").to_pylist(), vectors_tensor(table, "embedding")))
        return {k: (s[n], rgb[n], emb.get(k)) for n, k in enumerate(keys)}

    def _edit(self, method: str, variant: EditVariant | None, rows: list[tuple[Tensor, Tensor, Tensor | None]]
              ) -> tuple[Tensor, Tensor]:
        """Edited conv codes (B, C) and the number of channels changed per image."""
        s = torch.stack([r[0] for r in rows])
        if variant is None:                                       # the reconstruction
            return s, torch.zeros(len(rows), dtype=torch.long)
        dt, t_target = self._text(variant)
        tau = self.cfg.tau if variant.tau is None else variant.tau
        if method == "styleclip_gd":
            step = ed.global_direction(self.models.relevance, dt, self.models.sigma, self.cfg.gd_beta)
            delta = (self.cfg.gd_alpha * step).expand_as(s)
        else:
            if any(r[2] is None for r in rows):
                raise ed.PromptError("no CLIP embedding for this image (its embed step failed)")
            i = torch.stack([r[2] for r in rows])
            delta = ed.mapper_delta(self.models.mappers[method], method, s, i, dt, t_target)
            if self.models.relevance is not None:
                normalized = self.cfg.threshold == "normalized"
                delta = delta * ed.relevance_mask(self.models.relevance, dt, tau, normalized)
        delta = variant.strength * delta
        return s + delta, (delta != 0).sum(dim=1)

    def _text(self, variant: EditVariant) -> tuple[Tensor, Tensor]:
        """Δt and target embedding of a variant, computed once per processor (errors too)."""
        if variant.terms not in self._texts:
            templates = ed.TEMPLATES[self.cfg.templates]
            try:
                ed.check_terms(self.models.clip, variant.terms, templates, self.cfg.long_prompts == "truncate")
                self._texts[variant.terms] = ed.text_direction(self.models.clip, variant.terms, templates)
            except ed.PromptError as exc:
                self._texts[variant.terms] = exc
        result = self._texts[variant.terms]
        if isinstance(result, Exception):
            raise result
        return result

    @torch.no_grad()
    def _render(self, pending: list[tuple[Item, Tensor, Tensor, dict[str, Any]]],
                outcomes: dict[str, tuple[str, Any, dict[str, Any]]]) -> None:
        G = self.models.generator
        device = next(G.parameters()).device
        for start in range(0, len(pending), self.cfg.batch_size):
            chunk = pending[start:start + self.cfg.batch_size]
            conv, rgb = (torch.stack([c[n] for c in chunk]).to(device) for n in (1, 2))
            code = StyleCode(conv, rgb)
            images = G.synthesize(code)
            finite = torch.isfinite(images).flatten(1).all(dim=1)
            pixels = to_uint8(images)
            for n, (item, _, _, fields) in enumerate(chunk):
                outcomes[item.key] = (("ok", encode_png(pixels[n], self.cfg.image_format), fields) if finite[n]
                                      else ("failed", "the edited code renders non-finite pixels", fields))


def _groups(spec: ShardSpec) -> dict[tuple[str, EditVariant | None], list[Item]]:
    """Items by (method, variant), in first-seen order."""
    groups: dict[tuple[str, EditVariant | None], list[Item]] = {}
    for item in spec.items:
        v = item.meta.get("variant")
        variant = None if v is None else EditVariant(v["prompt_id"], tuple(tuple(t) for t in v["terms"]),
                                                     v["tau"], v["strength"], v["omega"], v["suffix"])
        groups.setdefault((item.meta["method"], variant), []).append(item)
    return groups


def _fields(method: str, variant: EditVariant | None, default_tau: float) -> dict[str, Any]:
    """The manifest columns of an edit (the same columns, types and order for every record)."""
    if variant is None:
        return {"prompt_id": "", "method": method, "source_text": "", "target_text": "", "terms": "[]",
                "tau": NAN, "strength": 0.0, "omega": NAN, "channels_changed": 0}
    tau = default_tau if variant.tau is None else variant.tau
    return {"prompt_id": variant.prompt_id, "method": method,
            "source_text": variant.source_text, "target_text": variant.target_text,
            "terms": json.dumps(variant.terms),          # [[source, target, weight], ...]: Δt exactly
            "tau": NAN if method == "styleclip_gd" else float(tau), "strength": float(variant.strength),
            "omega": NAN if variant.omega is None else float(variant.omega), "channels_changed": 0}


@dataclass(frozen=True)
class EditBuilder:
    """Loads the generator, CLIP, mappers and Rₛ once per actor (``build``)."""
    generator: ModelSpec
    clip: ModelSpec
    mappers: tuple[tuple[str, ModelSpec], ...]       # (method, mapper spec) for the mapper-based methods
    root: str
    cfg: BulkEditConfig
    relevance_stage: str | None                      # None: no relevance threshold (and no StyleCLIP-GD)
    n_stat_samples: int = 10_000                     # codes for StyleCLIP-GD's per-channel σ
    seed: int = 0
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    device: DeviceChoice = "auto"
    cpus: float = 1.0
    codes_stage: str = "codes"                       # where the codes (and clip_<images>) come from
    clip_stage: str = "clip_images"
    stage: str = "edits"

    def build(self) -> EditProcessor:
        from infra.fsio import Location
        from tasks.relevance import load_relevance, style_statistics

        set_cpu_threads(self.cpus)
        device = pick_device(self.device)
        opts = self.storage_options
        gen = zoo.build(self.generator, device=device, storage_options=opts).eval()
        clip = zoo.build(self.clip, device=device, storage_options=opts)
        mappers = {m: zoo.build(spec, device=device, storage_options=opts).eval() for m, spec in self.mappers}
        relevance = sigma = None
        if self.relevance_stage is not None:
            relevance = load_relevance(self.root, self.relevance_stage, opts).to(device)
        if "styleclip_gd" in self.cfg.methods:
            sigma = style_statistics(gen, self.n_stat_samples, 1, self.seed).std.to(device)
        root = Location(self.root, opts)
        meta = {"generator": self.generator.model_dump(mode="json"), "clip": clip.describe(),
                "relevance_stage": self.relevance_stage, "settings": self.cfg.model_dump(mode="json")}
        return EditProcessor(EditModels(gen, clip, mappers, relevance, sigma), StageStore(root, self.codes_stage),
                             StageStore(root, self.clip_stage), self.cfg, meta)

    def fingerprint(self) -> str:
        """Code + settings + the identity of every input the edits depend on (model files, Rₛ blocks)."""
        from infra.fsio import Location

        settings = self.cfg.model_dump(mode="json", exclude={"prompts", "catalog", "max_images",
                                                             "images_per_shard", "batch_size"})
        models = {name: zoo.identity(spec, self.storage_options) for name, spec in
                  {"generator": self.generator, "clip": self.clip, **dict(self.mappers)}.items()}
        relevance = None
        if self.relevance_stage is not None:
            store = StageStore(Location(self.root, self.storage_options), self.relevance_stage)
            relevance = sorted((m["shard_id"], m["input_fingerprint"], m["code_fingerprint"])
                               for m in map(store.marker, store.finished()) if m)
        return code_fingerprint(EditProcessor, ed.global_direction, config={
            "settings": settings, "models": models, "relevance": relevance,
            "inputs": [self.codes_stage, self.clip_stage], "n_stat_samples": self.n_stat_samples,
            "seed": self.seed})
