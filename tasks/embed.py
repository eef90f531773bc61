"""Embed stage: CLIP image embeddings (L2-normalised) of every image of an upstream image shard."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from infra.config import RunConfig
from infra.runtime.shards import ShardSpec
from infra.runtime.stage import code_fingerprint
from infra.runtime.upstream import spec_batches
from infra.storage.fsio import Location
from infra.storage.records import Sink
from infra.storage.store import StageStore
from models import zoo
from models.device import DeviceChoice
from models.zoo import ModelSpec
from tasks.actor import ActorModels
from tasks.layout import clip_stage


@dataclass
class EmbedProcessor:
    clip: Any  # models.clip.ClipEncoder
    upstream: StageStore
    batch_size: int
    output_metadata: dict[str, Any] = field(default_factory=dict)
    reuse_items = True  # records depend only on their own item (infra.runtime.stage)

    def __call__(self, spec: ShardSpec, sink: Sink) -> None:
        sources = {i.key: i.source for i in spec.items}
        for keys, images in spec_batches(self.upstream, spec, self.batch_size):
            try:
                emb = (
                    self.clip.encode_images(images, batch_size=self.batch_size).float().cpu()
                )  # (B, D)
            except Exception as exc:  # a batch that cannot be embedded: record every sample
                for key in keys:
                    sink.add_failure(
                        key, sources[key], f"embedding failed ({type(exc).__name__}: {exc})"
                    )
                continue
            for key, vec, finite in zip(keys, emb.numpy(), emb.isfinite().all(dim=1).tolist()):
                if finite:
                    sink.add(key, sources[key], vectors={"embedding": vec})
                else:
                    sink.add_failure(key, sources[key], "embedding is not finite")


@dataclass(frozen=True)
class EmbedBuilder:
    clip: ModelSpec
    upstream_root: str
    upstream_stage: str
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    batch_size: int = 64
    device: DeviceChoice = "auto"
    cpus: float = 1.0

    @classmethod
    def from_config(cls, cfg: RunConfig, upstream_stage: str) -> EmbedBuilder:
        """The CLIP embeddings of ``upstream_stage``'s images under this config."""
        return cls(
            clip=cfg.models.clip,
            upstream_root=cfg.root,
            upstream_stage=upstream_stage,
            storage_options=cfg.storage_options,
            batch_size=cfg.embed.batch_size,
            device=cfg.device,
            cpus=cfg.ray.cpus_per_actor,
        )

    @property
    def stage(self) -> str:
        return clip_stage(self.upstream_stage)

    def build(self) -> EmbedProcessor:
        clip = ActorModels.start(self).load(self.clip)
        meta = {
            **clip.describe(),
            "normalised": True,
            "column": "embedding",
            "source_stage": self.upstream_stage,
        }
        upstream = StageStore(
            Location(self.upstream_root, self.storage_options), self.upstream_stage
        )
        return EmbedProcessor(clip, upstream, self.batch_size, meta)

    def fingerprint(self) -> str:
        return code_fingerprint(
            EmbedProcessor,
            config={
                "clip": zoo.identity(self.clip, self.storage_options),
                "upstream": self.upstream_stage,
            },
        )
