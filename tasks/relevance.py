"""Relevance stage: the matrix Rₛ (conv channels × CLIP dim) of StyleCLIP's global directions ("fs3").

StyleCLIP (Patashnik et al., ICCV 2021, §5 and its ``SingleChannel``/``GetGUIData`` scripts; see
docs/paper-setting.md, "The relevance matrix"): for each conv channel c of S and each of n sample
images, set c to its mean over many samples, then add −kσ and +kσ (σ: that channel's std, k = 5), render both, CLIP-embed and
normalise each embedding; the image's direction is normalise(e₊ − e₋); the channel's row is
normalise(mean of the n directions). DeltaEdit needs every conv layer (6048 rows at 1024 px); the
layout comes from the generator, so any resolution or custom widths work.

The stage is sharded by *blocks of channels*: items are channels (key ``ch000042``, source
``channel:42``), one vector ``direction`` (D,) per channel, so a crashed run resumes per block. Every
worker recomputes the statistics (per-channel mean/std over ``n_stat_samples`` codes, ``n_images`` base
codes) from the run seed: cheap, deterministic, and no arrays travel between processes.
Modes: ``exact`` (the definition above, many renders per forward), ``fast`` (models/relevance.py),
``covariance`` (from the run's samples, no rendering: tasks.relevance_covariance) and ``imported``
(a published matrix in StyleCLIP's fs3 layout, ``relevance.source``, checked against the run's generator
and CLIP: ``deltaedit relevance import fs3.npy``; written as the same blocks, with the file's sha256 in
the fingerprint and its URI in the metadata).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from infra.config import RunConfig
from infra.runtime.shards import Item, ShardSpec
from infra.runtime.stage import code_fingerprint
from infra.storage.fsio import Location
from infra.storage.readers import read_vectors, vectors_tensor
from infra.storage.records import Sink
from infra.storage.store import StageStore
from infra.storage.tables import decode_metadata
from models import zoo
from models.device import DeviceChoice
from models.relevance import (
    StyleStats,
    exact_rows,
    fast_rows,
    freeze,
    published_rows,
    read_published,
    style_statistics,
)
from models.zoo import ModelSpec
from tasks.actor import ActorModels
from tasks.layout import SAMPLES, relevance_stage
from tasks.relevance_covariance import covariance_pairs, covariance_rows
from tasks.train.row_cache import pairs_fingerprint

Mode = Literal["exact", "fast", "covariance", "imported"]
COLUMN = "direction"
DEFINITIONS = {
    "exact": "StyleCLIP fs3: normalise(mean_i normalise(e(m+kσ) - e(m-kσ)))",
    "fast": "fs3 by its derivative: normalise(mean_i normalise(∂e/∂s_c)) (models/relevance.py)",
    "covariance": "normalise(Σ_n (s_nc - mean s_c)(i_n - mean i)) over the pools' samples "
    "(tasks/relevance_covariance.py)",
    "imported": "a published fs3 (StyleCLIP's GetFs: normalise(mean_i normalise(e(m+kσ) - e(m-kσ)))), "
    "rows renormalised to unit length (models/relevance.published_rows)",
}


def channel_items(n_channels: int) -> list[Item]:
    """One item per conv channel; zero-padded keys sort in channel order."""
    return [Item(f"ch{c:06d}", f"channel:{c}") for c in range(n_channels)]


def channel_of(item: Item) -> int:
    return int(item.source.split(":", 1)[1])


@dataclass
class RelevanceProcessor:
    generator: Any  # models.stylegan2.Generator
    clip: Any  # models.clip.ClipEncoder
    stats: StyleStats | None  # None in covariance and imported modes (they render nothing)
    mode: Mode
    sigma_scale: float
    batch_size: int
    jacobian_batch: int = 8
    fast_rank: int = 0
    pairs: Sequence[Any] = ()  # covariance: the (codes, CLIP) shard pairs it reads
    published: Tensor | None = None  # imported: the whole matrix, read and checked by the builder
    output_metadata: dict[str, Any] = field(default_factory=dict)
    _all_rows: Tensor | None = None  # fast / covariance: the whole matrix, computed once per worker

    def rows(self, channels: Sequence[int]) -> Tensor:
        """(len(channels), D) rows of Rₛ in this processor's mode."""
        if self.mode == "exact":
            return exact_rows(
                self.generator, self.clip, self.stats, channels, self.sigma_scale, self.batch_size
            )
        if self._all_rows is None:  # one pass gives every channel; blocks then just slice it
            self._all_rows = self._whole_matrix()
        return self._all_rows[torch.as_tensor(list(channels), dtype=torch.long)]

    def _whole_matrix(self) -> Tensor:
        if self.mode == "imported":
            if self.published is None:
                raise ValueError("imported relevance: the builder gives the matrix (published)")
            return self.published
        if self.mode == "covariance":
            return covariance_rows(self.pairs)
        return fast_rows(self.generator, self.clip, self.stats, self.jacobian_batch, self.fast_rank)

    def __call__(self, spec: ShardSpec, sink: Sink) -> None:
        channels = [channel_of(i) for i in spec.items]
        layers = {
            c: layer.name
            for layer in self.generator.layout.conv
            for c in range(layer.offset, layer.stop)
        }
        rows = self.rows(channels).float().cpu()
        for item, c, row in zip(spec.items, channels, rows):
            if torch.isfinite(row).all():
                sink.add(
                    item.key, item.source, vectors={COLUMN: row.numpy()}, channel=c, layer=layers[c]
                )
            else:
                sink.add_failure(item.key, item.source, "relevance row is not finite", channel=c)


@dataclass(frozen=True)
class RelevanceBuilder:
    generator: ModelSpec
    clip: ModelSpec
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    mode: Mode = "exact"
    n_images: int = 100  # base images averaged over (StyleCLIP: 100)
    n_stat_samples: int = 100_000  # codes for the per-channel mean/std (StyleCLIP: 100k)
    sigma_scale: float = 5.0  # k in mean ± kσ
    batch_size: int = 32  # exact: renders per forward
    jacobian_batch: int = 8  # fast: images per Jacobian pass
    fast_rank: int = 0  # fast: 0 = full Jacobian, k = k leading CLIP directions (after batch 1)
    root: str | None = None  # covariance: the run whose pools it reads
    pools: tuple[str, ...] = (SAMPLES,)
    source: str | None = None  # imported: the published matrix (path or URI of an fs3.npy)
    seed: int = 0
    device: DeviceChoice = "auto"
    cpus: float = 1.0

    @classmethod
    def from_config(cls, cfg: RunConfig) -> RelevanceBuilder:
        r = cfg.relevance
        return cls(
            generator=cfg.models.generator,
            clip=cfg.models.clip,
            storage_options=cfg.storage_options,
            mode=r.mode,
            n_images=r.n_images,
            n_stat_samples=r.n_stat_samples,
            sigma_scale=r.sigma_scale,
            batch_size=r.batch_size,
            jacobian_batch=r.jacobian_batch,
            fast_rank=r.fast_rank,
            root=cfg.root,
            pools=tuple(r.pools),
            source=r.source,
            seed=cfg.seed,
            device=cfg.device,
            cpus=cfg.ray.cpus_per_actor,
        )

    @property
    def stage(self) -> str:
        return relevance_stage(self.mode)

    def settings(self) -> dict[str, Any]:
        """What determines the numbers (not how fast they come): part of the fingerprint and metadata."""
        if self.mode == "imported":  # the file's content (not its path), checked against G and CLIP
            return {
                "mode": self.mode,
                "source_sha256": zoo.sha256_of(self._source(), **self.storage_options),
                "generator": zoo.identity(self.generator, self.storage_options),
                "clip": zoo.identity(self.clip, self.storage_options),
            }
        return {
            "mode": self.mode,
            "n_images": self.n_images,
            "n_stat_samples": self.n_stat_samples,
            "sigma_scale": self.sigma_scale,
            "seed": self.seed,
            "fast_rank": self.fast_rank if self.mode == "fast" else None,
            "data": self._data() if self.mode == "covariance" else None,
            "generator": zoo.identity(self.generator, self.storage_options),
            "clip": zoo.identity(self.clip, self.storage_options),
        }

    def _source(self) -> str:
        if not self.source:
            raise ValueError(
                "imported relevance needs relevance.source (an fs3.npy path or URI); "
                "see `deltaedit relevance import`"
            )
        return self.source

    def _pairs(self) -> list[Any]:
        if self.root is None:
            raise ValueError("covariance relevance needs the run root (RelevanceBuilder.root)")
        return covariance_pairs(Location(self.root, self.storage_options), self.pools)

    def _data(self) -> dict[str, Any]:
        """The samples the covariance rows come from: their pools and shards' fingerprint."""
        return {"pools": list(self.pools), "shards": pairs_fingerprint(self._pairs())}

    def build(self) -> RelevanceProcessor:
        models = ActorModels.start(self)
        gen, clip = models.load(self.generator), models.load(self.clip)
        freeze(gen, clip.model)
        covariance, imported = self.mode == "covariance", self.mode == "imported"
        stats = (
            None
            if covariance or imported
            else style_statistics(gen, self.n_stat_samples, self.n_images, self.seed)
        )
        published = None
        if imported:
            source = self._source()
            matrix = read_published(source, **self.storage_options)
            published = published_rows(matrix, gen.layout, clip.embed_dim, source)
        meta = {
            **self.settings(),
            "clip_model": clip.describe(),
            "layout": gen.layout.to_dict(),
            "n_channels": gen.layout.conv_total,
            "embed_dim": clip.embed_dim,
            "column": COLUMN,
            "normalised": True,
            "noise_mode": "const",
            "std": "population",
            "definition": DEFINITIONS[self.mode],
            **({"source": self.source} if imported else {}),
        }
        return RelevanceProcessor(
            gen,
            clip,
            stats,
            self.mode,
            self.sigma_scale,
            self.batch_size,
            self.jacobian_batch,
            self.fast_rank,
            self._pairs() if covariance else (),
            published,
            meta,
        )

    def fingerprint(self) -> str:
        return code_fingerprint(
            RelevanceProcessor, fast_rows, covariance_rows, config=self.settings()
        )


def load_relevance(
    root: str, stage: str = relevance_stage("exact"), storage_options: dict[str, Any] | None = None
) -> Tensor:
    """Assemble Rₛ (C, D) from a run's finished blocks, in channel order; missing channels are an error."""
    table = read_vectors(StageStore(Location(root, storage_options or {}), stage))
    expected = decode_metadata(table).get("n_channels")
    channels = torch.tensor([int(k[2:]) for k in table.column("key").to_pylist()])
    order = torch.argsort(channels)
    if expected is not None and not torch.equal(channels[order], torch.arange(expected)):
        missing = sorted(set(range(expected)) - set(channels.tolist()))
        raise ValueError(
            f"{root}/{stage}: {len(missing)} of {expected} channels missing "
            f"(first {missing[:5]}); run the relevance flow to finish it"
        )
    return vectors_tensor(table, COLUMN)[order]
