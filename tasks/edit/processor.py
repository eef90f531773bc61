"""Edit stage: codes (+ CLIP image embeddings) × prompt variants × methods → edited images.

One item per (image, variant, method, decoder), keyed ``<image>__<prompt id>[__<sweep point>]__<method>``
for the generator (DeltaEdit-G) and the same plus ``__diffusion`` / ``__diffusion_masked`` for the diffusion
decoder (DeltaEdit-D, ``tasks.edit.diffusion``), plus ``<image>__recon`` (G(s)) and ``<image>__recon__diffusion``
(the DDIM reconstruction), the references every edit is compared with. A shard holds the items of
``bulk_edit.images_per_shard`` images of one codes shard, so a rerun resumes image group by image group.
Within a shard, items that share a (variant, method) go through the mapper and the generator in
batches; records are written in the shard's item order, so a rerun writes identical bytes.

Manifest columns: image_key, prompt_id, method, decoder, source_text, target_text, terms (JSON), tau,
strength, omega, channels_changed, mask_fraction and psnr_outside_mask (diffusion edits whose masked twin is in
the run: PSNR vs the DDIM reconstruction outside the edit mask, for the plain and the mask-guided decode).
Timings are per shard, in the done-marker (they differ between runs; the data must not).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from infra.config import BulkEditConfig
from infra.runtime.shards import Item, ShardSpec
from infra.runtime.upstream import plan_downstream
from infra.storage.readers import (
    decode_image,
    encoded_image,
    iter_image_samples,
    read_vectors,
    vectors_tensor,
)
from infra.storage.records import Sink
from infra.storage.store import StageStore
from models import edit_directions as ed
from models.device import module_device
from models.imaging import encode_image, psnr_where, to_uint8
from models.stylegan2 import StyleCode
from tasks.edit.diffusion import DiffusionDecoder, DiffusionEdit, noise_seed
from tasks.prompts import EditVariant

RECON = "reconstruction"
GENERATOR = "generator"
NAN = float("nan")


def edit_key(image_key: str, variant: EditVariant, method: str, decoder: str = GENERATOR) -> str:
    return "__".join(
        p
        for p in (image_key, variant.prompt_id, variant.suffix, method, decoder_suffix(decoder))
        if p
    )


def recon_key(image_key: str, decoder: str = GENERATOR) -> str:
    """The reconstruction an edit by ``decoder`` is compared with (both diffusion decoders share one)."""
    return f"{image_key}__recon" + ("" if decoder == GENERATOR else "__diffusion")


def decoder_suffix(decoder: str) -> str:
    return "" if decoder == GENERATOR else decoder


def plan_edits(
    codes: StageStore,
    variants: Sequence[EditVariant],
    methods: Sequence[str],
    cfg: BulkEditConfig,
    keep: Callable[[str], bool] | None = None,
) -> list[ShardSpec]:
    """Shards ``<codes shard>-<k>`` of ``images_per_shard`` images each, over the ok codes (sorted) whose
    key ``keep`` accepts (None: all; ``tasks.split.eval_keys``: the catalog's eval part).
    Each variant's τ is resolved already (``tasks.prompts.resolve_tau``): items record the τ they use."""
    if any(v.tau is None for v in variants):
        raise ValueError(
            "plan_edits: every variant needs its τ resolved (tasks.prompts.resolve_tau)"
        )
    specs, budget = [], cfg.max_images
    for upstream in plan_downstream(codes):
        items = [i for i in upstream.items if keep is None or keep(i.key)]
        items = items if budget is None else items[: max(budget, 0)]
        budget = None if budget is None else budget - len(items)
        for k, start in enumerate(range(0, len(items), cfg.images_per_shard)):
            group = items[start : start + cfg.images_per_shard]
            specs.append(
                ShardSpec(
                    f"{upstream.shard_id}-{k:03d}",
                    tuple(
                        i
                        for n, image in enumerate(group)
                        for i in _image_items(
                            image, upstream.shard_id, variants, methods, cfg, _decoders(cfg, n)
                        )
                    ),
                )
            )
    return specs


def _decoders(cfg: BulkEditConfig, index: int) -> list[str]:
    """The decoders that render the ``index``-th image of a shard (diffusion only for the first max_images)."""
    limit = cfg.diffusion.max_images
    return [d for d in cfg.decoder if d == GENERATOR or limit is None or index < limit]


def _image_items(
    image: Item,
    shard_id: str,
    variants: Sequence[EditVariant],
    methods: Sequence[str],
    cfg: BulkEditConfig,
    decoders: Sequence[str],
) -> list[Item]:
    base = {"image": image.key, "codes_shard": shard_id, **image.meta}
    source = f"codes/{shard_id}/{image.key}"
    items = []
    if cfg.reconstruction:
        recons = dict.fromkeys(recon_key(image.key, d) for d in decoders)
        items += [
            Item(
                key,
                source,
                {
                    **base,
                    "method": RECON,
                    "decoder": GENERATOR if key.endswith("recon") else "diffusion",
                },
            )
            for key in recons
        ]
    for d in decoders:
        ms = (
            methods
            if d == GENERATOR or cfg.diffusion.methods is None
            else [m for m in methods if m in cfg.diffusion.methods]
        )
        items += [
            Item(
                edit_key(image.key, v, m, d),
                source,
                {**base, "method": m, "decoder": d, "variant": v.to_dict()},
            )
            for v in variants
            for m in ms
        ]
    return items


@dataclass
class EditModels:
    generator: Any  # models.stylegan2.Generator
    clip: Any  # models.clip.ClipEncoder
    mappers: dict[str, torch.nn.Module]  # method -> mapper
    relevance: Tensor | None  # (C, D) Rₛ
    sigma: Tensor | None  # (C,) per-channel std of S (StyleCLIP-GD)
    diffusion: DiffusionDecoder | None = None  # DeltaEdit-D
    synthesize: Callable[[Tensor, Tensor], Tensor] | None = (
        None  # (conv, rgb) → images; None: eager G
    )
    memory: Tensor | None = None  # (P, D) unit image embeddings (bulk_edit.condition: retrieved)

    def render(self, conv: Tensor, rgb: Tensor) -> Tensor:
        """G(s) of a batch of codes, compiled when ``bulk_edit.compile`` is set."""
        if self.synthesize is not None:
            return self.synthesize(conv, rgb)
        return self.generator.synthesize(StyleCode(conv, rgb))

    @property
    def device(self) -> torch.device:
        """Where every model of the edit runs (the builder puts them all on one device)."""
        return module_device(self.generator)


@dataclass
class EditProcessor:
    models: EditModels
    codes: StageStore
    embeddings: StageStore
    cfg: BulkEditConfig
    images: StageStore | None = None  # the input photos (the diffusion decoder encodes them)
    output_metadata: dict[str, Any] = field(default_factory=dict)
    reuse_items = True  # an edit depends only on its own item (infra.runtime.stage)
    _texts: dict[Any, Any] = field(default_factory=dict)
    _subspaces: dict[Any, Tensor] = field(default_factory=dict)

    def __call__(self, spec: ShardSpec, sink: Sink) -> None:
        """Edit the shard's items and stream each finished edit into ``sink`` in the shard's item order:
        only a batch of renders (and one image's diffusion edits) is held, whatever the shard's size."""
        inputs = self._inputs(spec)
        codes = self._codes(spec, inputs)
        out = _InOrder(spec.items, self._writer(sink))
        batch: list[tuple[Item, Tensor, dict[str, Any]]] = []
        photos: dict[str, bytes] | None = None
        for item in spec.items:
            if item.key not in codes:  # decoded with its image's first diffusion item
                continue
            status, code, fields = codes.pop(item.key)
            if status != "ok":
                out.put(item.key, (status, code, fields))
            elif item.meta["decoder"] == GENERATOR:
                batch.append((item, code, fields))
                if len(batch) == self.cfg.batch_size:
                    self._render(batch, inputs, out)
                    batch = []
            else:  # an image's first diffusion item: decode all of that image's diffusion items
                self._render(batch, inputs, out)
                batch = []
                if photos is None:
                    photos = self._photos(
                        spec.items[0].meta["codes_shard"], _diffusion_images(spec)
                    )
                self._render_diffusion((item, code, fields), codes, spec, inputs, photos, out)
        self._render(batch, inputs, out)
        out.close()

    def _writer(self, sink: Sink) -> Callable[[Item, tuple[str, Any, dict[str, Any]]], None]:
        def write(item: Item, outcome: tuple[str, Any, dict[str, Any]]) -> None:
            status, payload, fields = outcome
            fields = {"image_key": item.meta["image"], **fields}
            if status == "ok":
                sink.add(
                    item.key, item.source, image=payload, image_ext=self.cfg.image_format, **fields
                )
            else:
                sink.add_failure(item.key, item.source, payload, **fields)

        return write

    def _codes(
        self, spec: ShardSpec, inputs: dict[str, tuple[Tensor, Tensor, Tensor | None]]
    ) -> dict[str, tuple[str, Any, dict[str, Any]]]:
        """item key -> ("ok", edited conv code (C,), fields) or ("failed", why, fields): the mapper and the
        threshold in batches of the items that share a (method, variant), over the whole shard (codes are
        small; the images they render are not)."""
        codes: dict[str, tuple[str, Any, dict[str, Any]]] = {}
        for (method, variant), items in _groups(spec).items():
            try:
                conv, changed = self._edit(
                    method, variant, [inputs[i.meta["image"]] for i in items]
                )
            except ed.PromptError as exc:
                codes.update({i.key: ("failed", str(exc), _fields(i, variant)) for i in items})
                continue
            counts = changed.tolist()  # one copy to the host per batch
            codes.update(
                {
                    item.key: (
                        "ok",
                        conv[n],
                        {**_fields(item, variant), "channels_changed": int(counts[n])},
                    )
                    for n, item in enumerate(items)
                }
            )
        return codes

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

    def _edit(
        self,
        method: str,
        variant: EditVariant | None,
        rows: list[tuple[Tensor, Tensor, Tensor | None]],
    ) -> tuple[Tensor, Tensor]:
        """Edited conv codes (B, C) and the number of channels changed per image."""
        s = torch.stack([r[0] for r in rows]).to(self.models.device)  # codes come from Parquet
        if variant is None:  # the reconstruction
            return s, torch.zeros(len(rows), dtype=torch.long)
        dt, t_target = self._text(variant)
        if method == "styleclip_gd":
            step = ed.global_direction(
                self.models.relevance, dt, self.models.sigma, self.cfg.gd_beta
            )
            delta = (self.cfg.gd_alpha * step).expand_as(s)
        else:
            if any(r[2] is None for r in rows):
                raise ed.PromptError("no CLIP embedding for this image (its embed step failed)")
            i = torch.stack([r[2] for r in rows]).to(s.device)
            retrieved = method == "deltaedit" and self.models.memory is not None
            cond = (
                ed.retrieved_direction(self.models.memory, i, dt, self.cfg.retrieve_k)
                if retrieved
                else dt
            )
            delta = ed.mapper_delta(self.models.mappers[method], method, s, i, cond, t_target)
            if self.models.relevance is not None:
                mask = ed.relevance_mask(self.models.relevance, dt, variant.tau, self.cfg.threshold)
                if retrieved and self.cfg.mask == "text+image":
                    mask = mask | ed.image_mask(
                        self.models.relevance,
                        cond,
                        self._subspace(variant, dt),
                        self.cfg.image_mask_tau,
                    )
                delta = delta * mask
        delta = variant.strength * delta
        return s + delta, (delta != 0).sum(dim=1)

    def _subspace(self, variant: EditVariant, dt: Tensor) -> Tensor:
        """The prompt's image subspace (``ed.prompt_subspace``), computed once per processor."""
        if variant.terms not in self._subspaces:
            self._subspaces[variant.terms] = ed.prompt_subspace(
                self.models.memory, dt, self.cfg.retrieve_k, self.cfg.image_mask_rank
            )
        return self._subspaces[variant.terms]

    def _text(self, variant: EditVariant) -> tuple[Tensor, Tensor]:
        """Δt and target embedding of a variant, computed once per processor (errors too)."""
        if variant.terms not in self._texts:
            templates = ed.TEMPLATES[self.cfg.templates]
            try:
                ed.check_terms(
                    self.models.clip, variant.terms, templates, self.cfg.long_prompts == "truncate"
                )
                self._texts[variant.terms] = ed.text_direction(
                    self.models.clip, variant.terms, templates
                )
            except ed.PromptError as exc:
                self._texts[variant.terms] = exc
        result = self._texts[variant.terms]
        if isinstance(result, Exception):
            raise result
        return result

    def _encode(self, pixels: np.ndarray) -> bytes:
        return encode_image(pixels, self.cfg.image_format, self.cfg.png_level)

    @torch.no_grad()
    def _render(
        self,
        batch: list[tuple[Item, Tensor, dict[str, Any]]],
        inputs: dict[str, tuple[Tensor, Tensor, Tensor | None]],
        out: _InOrder,
    ) -> None:
        """G(ŝ) of a batch of generator items, each encoded and handed on at once."""
        if not batch:
            return
        device = self.models.device
        conv = torch.stack([c for _, c, _ in batch]).to(device)
        rgb = torch.stack([inputs[i.meta["image"]][1] for i, _, _ in batch]).to(device)
        images = self.models.render(conv, rgb)
        finite = torch.isfinite(images).flatten(1).all(dim=1).tolist()
        pixels = to_uint8(images)
        for n, (item, _, fields) in enumerate(batch):
            out.put(
                item.key,
                ("ok", self._encode(pixels[n]), fields)
                if finite[n]
                else ("failed", "the edited code renders non-finite pixels", fields),
            )

    @torch.no_grad()
    def _render_diffusion(
        self,
        first: tuple[Item, Tensor, dict[str, Any]],
        codes: dict[str, tuple[str, Any, dict[str, Any]]],
        spec: ShardSpec,
        inputs: dict[str, tuple[Tensor, Tensor, Tensor | None]],
        photos: dict[str, bytes],
        out: _InOrder,
    ) -> None:
        """The reconstruction and every diffusion edit (plain / mask-guided) of the image of ``first`` (its
        first diffusion item; the others are taken out of ``codes``), by ``DiffusionDecoder.edit_image``."""
        image, shard = first[0].meta["image"], first[0].meta["codes_shard"]
        pending = [first] + [
            (i, *codes.pop(i.key)[1:])
            for i in spec.items
            if i.meta["image"] == image
            and i.meta["decoder"] != GENERATOR
            and codes.get(i.key, ("",))[0] == "ok"
        ]
        if image not in photos:
            for item, _, fields in pending:
                out.put(
                    item.key,
                    (
                        "failed",
                        f"no input image for {image} in {self.images.stage}/{shard} "
                        "(the diffusion decoder encodes it)",
                        fields,
                    ),
                )
            return
        s0, rgb0 = inputs[image][0][None], inputs[image][1][None]
        edits = [
            DiffusionEdit(i.key, _twin(i.key), code, i.meta["decoder"] == "diffusion_masked")
            for i, code, _ in pending
            if i.meta["method"] != RECON
        ]
        recon, images, masks = self.models.diffusion.edit_image(
            decode_image(photos[image])[None], s0, rgb0, edits, noise_seed(image)
        )
        for item, _, fields in pending:
            edited = recon if item.meta["method"] == RECON else images.pop(item.key)
            mask = masks.get(_twin(item.key))
            if mask is not None:  # the plain edit is scored outside its masked twin's mask
                fields = {
                    **fields,
                    "mask_fraction": float(mask.mean()),
                    "psnr_outside_mask": float(
                        psnr_where(edited[None], recon[None], 1 - mask[None])[0]
                    ),
                }
            out.put(
                item.key,
                ("ok", self._encode(to_uint8(edited[None])[0]), fields)
                if torch.isfinite(edited).all()
                else ("failed", "the edited code decodes to non-finite pixels", fields),
            )

    def _photos(self, shard: str, wanted: set[str]) -> dict[str, bytes]:
        """The encoded input photos of ``wanted`` keys from the images shard, if it exists (read once per
        shard, decoded one image at a time)."""
        if not wanted or self.images is None or shard not in self.images.finished():
            return {}
        return {
            sample["__key__"]: encoded_image(sample)
            for sample in iter_image_samples(self.images, [shard])
            if sample["__key__"] in wanted
        }


class _InOrder:
    """Hands outcomes on in the shard's item order, holding only those that arrive ahead of their turn."""

    def __init__(self, items: Sequence[Item], write: Callable[[Item, Any], None]):
        self.items, self.write, self.next = items, write, 0
        self.ready: dict[str, Any] = {}

    def put(self, key: str, outcome: Any) -> None:
        self.ready[key] = outcome
        while self.next < len(self.items) and self.items[self.next].key in self.ready:
            item = self.items[self.next]
            self.write(item, self.ready.pop(item.key))
            self.next += 1

    def close(self) -> None:
        if self.next != len(self.items):
            raise RuntimeError(
                f"edit stage: {len(self.items) - self.next} items were never written"
            )


def _diffusion_images(spec: ShardSpec) -> set[str]:
    return {i.meta["image"] for i in spec.items if i.meta["decoder"] != GENERATOR}


def _twin(key: str) -> str:
    """The key shared by a diffusion edit and its mask-guided twin."""
    return key.removesuffix("__diffusion_masked").removesuffix("__diffusion")


def _groups(spec: ShardSpec) -> dict[tuple[str, EditVariant | None], list[Item]]:
    """Items by (method, variant), in first-seen order."""
    groups: dict[tuple[str, EditVariant | None], list[Item]] = {}
    for item in spec.items:
        v = item.meta.get("variant")
        variant = None if v is None else EditVariant.from_dict(v)
        groups.setdefault((item.meta["method"], variant), []).append(item)
    return groups


def _fields(item: Item, variant: EditVariant | None) -> dict[str, Any]:
    """The manifest columns of an edit (the same columns, types and order for every record); ``tau``: the
    variant's, resolved when the edits were planned."""
    method, decoder = item.meta["method"], item.meta["decoder"]
    masking = {"mask_fraction": NAN, "psnr_outside_mask": NAN}
    if variant is None:
        return {
            "prompt_id": "",
            "method": method,
            "decoder": decoder,
            "source_text": "",
            "target_text": "",
            "terms": "[]",
            "tau": NAN,
            "strength": 0.0,
            "omega": NAN,
            "channels_changed": 0,
            **masking,
        }
    return {
        "prompt_id": variant.prompt_id,
        "method": method,
        "decoder": decoder,
        "source_text": variant.source_text,
        "target_text": variant.target_text,
        "terms": json.dumps(variant.terms),  # [[source, target, weight], ...]: Δt exactly
        "tau": NAN if method == "styleclip_gd" else float(variant.tau),
        "strength": float(variant.strength),
        "omega": NAN if variant.omega is None else float(variant.omega),
        "channels_changed": 0,
        **masking,
    }
