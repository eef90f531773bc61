"""Invert stage: e4e over an image shard → W+ → style code S (conv and toRGB parts), with each sample's
reconstruction PSNR (G(s) against the input at the generator's resolution)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from infra.config import RunConfig
from infra.runtime.shards import ShardSpec
from infra.runtime.stage import code_fingerprint
from infra.runtime.upstream import spec_batches
from infra.storage.fsio import Location
from infra.storage.records import Sink
from infra.storage.store import StageStore
from models import zoo
from models.device import DeviceChoice
from models.imaging import psnr, resize_to
from models.zoo import ModelSpec
from tasks.actor import ActorModels
from tasks.layout import CODES, IMAGES


@dataclass
class InvertProcessor:
    encoder: Any  # models.e4e.Encoder
    generator: Any  # models.stylegan2.Generator
    upstream: StageStore
    batch_size: int
    keep_wplus: bool
    device: str
    output_metadata: dict[str, Any] = field(default_factory=dict)
    reuse_items = True  # records depend only on their own item (infra.runtime.stage)

    @torch.no_grad()
    def __call__(self, spec: ShardSpec, sink: Sink) -> None:
        sources = {i.key: i.source for i in spec.items}
        for keys, images in spec_batches(self.upstream, spec, self.batch_size):
            images = images.to(self.device)
            w_plus = self.encoder(resize_to(images, self.encoder.input_size))  # (B, n_styles, D)
            code = self.generator.style_space(w_plus)
            recon = self.generator.synthesize(code)
            scores = psnr(recon, resize_to(images, recon.shape[-1])).tolist()
            columns = {"s": code.conv, "s_rgb": code.rgb}
            if self.keep_wplus:
                columns["w_plus"] = w_plus.flatten(1)
            columns = {
                name: c.cpu() for name, c in columns.items()
            }  # one copy per batch, not per sample
            finite = (
                torch.stack([c.isfinite().all(dim=1) for c in columns.values()]).all(dim=0).tolist()
            )
            rows = {name: c.numpy() for name, c in columns.items()}
            for n, key in enumerate(keys):
                if not finite[n]:
                    sink.add_failure(key, sources[key], "inversion produced non-finite codes")
                    continue
                sink.add(
                    key,
                    sources[key],
                    vectors={name: r[n] for name, r in rows.items()},
                    psnr=round(scores[n], 4),
                )


@dataclass(frozen=True)
class InvertBuilder:
    encoder: ModelSpec
    generator: ModelSpec | None  # None: the encoder checkpoint's paired decoder
    upstream_root: str
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    batch_size: int = 16
    keep_wplus: bool = False
    device: DeviceChoice = "auto"
    cpus: float = 1.0
    upstream_stage: str = IMAGES
    stage: str = CODES

    @classmethod
    def from_config(
        cls, cfg: RunConfig, upstream_stage: str = IMAGES, stage: str = CODES
    ) -> InvertBuilder:
        """The inversion of ``upstream_stage``'s images into ``stage`` under this config."""
        return cls(
            encoder=cfg.models.encoder,
            generator=cfg.models.generator,
            upstream_root=cfg.root,
            storage_options=cfg.storage_options,
            batch_size=cfg.invert.batch_size,
            keep_wplus=cfg.invert.keep_wplus,
            device=cfg.device,
            cpus=cfg.ray.cpus_per_actor,
            upstream_stage=upstream_stage,
            stage=stage,
        )

    def build(self) -> InvertProcessor:
        models = ActorModels.start(self)
        encoder = models.load(self.encoder).eval()
        generator = models.load(self.generator) if self.generator is not None else encoder.generator
        if generator is None:
            raise ValueError(
                "invert needs a generator: set models.generator, or use an encoder "
                "checkpoint that carries its decoder"
            )
        generator.eval()
        meta = {
            "encoder": self.encoder.model_dump(mode="json"),
            "layout": generator.layout.to_dict(),
            "columns": {"s": "conv styles", "s_rgb": "toRGB styles", "w_plus": "W+ (flattened)"},
        }
        upstream = StageStore(
            Location(self.upstream_root, self.storage_options), self.upstream_stage
        )
        return InvertProcessor(
            encoder, generator, upstream, self.batch_size, self.keep_wplus, models.device, meta
        )

    def fingerprint(self) -> str:
        return code_fingerprint(
            InvertProcessor,
            config={
                "encoder": zoo.identity(self.encoder, self.storage_options),
                "generator": zoo.identity(self.generator, self.storage_options),
                "keep_wplus": self.keep_wplus,
            },
        )
