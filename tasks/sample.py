"""Sample stage: generator samples z → w → s → image, stored as images plus their exact codes.

Each sample's z comes from its own seed (run seed, sample index), so a sample does not depend on
how the run was sharded or batched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from infra.config import RunConfig
from infra.runtime.shards import Item, ShardSpec
from infra.runtime.stage import code_fingerprint
from infra.storage.records import Sink
from models import zoo
from models.device import DeviceChoice
from models.imaging import encode_image, to_uint8
from models.zoo import ModelSpec
from tasks.actor import ActorModels
from tasks.layout import SAMPLES


def sample_items(n: int, seed: int) -> list[Item]:
    return [Item(f"sample_{i:08d}", f"generator:{seed}:{i}") for i in range(n)]


def sample_z(source: str, style_dim: int) -> torch.Tensor:
    """The z of one sample, from its ``generator:<seed>:<index>`` source."""
    _, seed, index = source.split(":")
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
    return torch.randn(style_dim, generator=gen)


@dataclass
class SampleProcessor:
    generator: Any  # models.stylegan2.Generator
    batch_size: int
    truncation_psi: float
    image_format: str
    device: str
    output_metadata: dict[str, Any] = field(default_factory=dict)
    reuse_items = True  # records depend only on their own item (infra.runtime.stage)

    @torch.no_grad()
    def __call__(self, spec: ShardSpec, sink: Sink) -> None:
        items = list(spec.items)
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            z = torch.stack([sample_z(i.source, self.generator.style_dim) for i in batch]).to(
                self.device
            )
            w = self.generator.mapping(z)
            if self.truncation_psi < 1:
                w = self.generator.truncate(w, self.truncation_psi)
            code = self.generator.style_space(w)
            pixels = to_uint8(self.generator.synthesize(code))
            columns = {"s": code.conv, "s_rgb": code.rgb, "w": w}
            rows = {name: c.cpu().numpy() for name, c in columns.items()}  # one copy per batch
            for n, item in enumerate(batch):
                sink.add(
                    item.key,
                    item.source,
                    image=encode_image(pixels[n], self.image_format),
                    image_ext=self.image_format,
                    vectors={name: r[n] for name, r in rows.items()},
                )


@dataclass(frozen=True)
class SampleBuilder:
    generator: ModelSpec
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    batch_size: int = 32
    truncation_psi: float = 1.0
    image_format: str = "png"
    device: DeviceChoice = "auto"
    cpus: float = 1.0
    stage: str = SAMPLES

    @classmethod
    def from_config(cls, cfg: RunConfig) -> SampleBuilder:
        s = cfg.sample
        return cls(
            generator=cfg.models.generator,
            storage_options=cfg.storage_options,
            batch_size=s.batch_size,
            truncation_psi=s.truncation_psi,
            image_format=s.image_format,
            device=cfg.device,
            cpus=cfg.ray.cpus_per_actor,
        )

    def build(self) -> SampleProcessor:
        models = ActorModels.start(self)
        gen = models.load(self.generator).eval()
        meta = {
            "generator": self.generator.model_dump(mode="json"),
            "truncation_psi": self.truncation_psi,
            "columns": {"s": "conv styles", "s_rgb": "toRGB styles", "w": "mapped w"},
            "layout": gen.layout.to_dict(),
        }
        return SampleProcessor(
            gen, self.batch_size, self.truncation_psi, self.image_format, models.device, meta
        )

    def fingerprint(self) -> str:
        return code_fingerprint(
            SampleProcessor,
            encode_image,
            config={
                "generator": zoo.identity(self.generator, self.storage_options),
                "psi": self.truncation_psi,
                "format": self.image_format,
            },
        )
