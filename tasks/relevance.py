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
Modes: ``exact`` (the definition above, many renders per forward), ``fast`` (tasks.relevance_fast) and
``covariance`` (from the run's samples, no rendering: tasks.relevance_covariance).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from infra.records import Sink
from infra.shards import Item, ShardSpec
from infra.stage import code_fingerprint
from models import zoo
from models.device import DeviceChoice, pick_device, set_cpu_threads
from models.stylegan2 import StyleCode
from models.zoo import ModelSpec

Mode = Literal["exact", "fast", "covariance"]
COLUMN = "direction"
_STATS_STREAM, _IMAGES_STREAM = 101, 202       # seed tags: statistics codes vs base images
DEFINITIONS = {"exact": "StyleCLIP fs3: normalise(mean_i normalise(e(m+kσ) - e(m-kσ)))",
               "fast": "fs3 by its derivative: normalise(mean_i normalise(∂e/∂s_c)) (tasks/relevance_fast.py)",
               "covariance": "normalise(Σ_n (s_nc - mean s_c)(i_n - mean i)) over the pools' samples "
                             "(tasks/relevance_covariance.py)"}


def channel_items(n_channels: int) -> list[Item]:
    """One item per conv channel; zero-padded keys sort in channel order."""
    return [Item(f"ch{c:06d}", f"channel:{c}") for c in range(n_channels)]


def channel_of(item: Item) -> int:
    return int(item.source.split(":", 1)[1])


@dataclass
class StyleStats:
    """What every relevance computation starts from, recomputable from the seed anywhere."""
    mean: Tensor        # (C,) per-channel mean of conv styles over n_stat_samples codes
    std: Tensor         # (C,) per-channel std (population, numpy's default as in StyleCLIP)
    base: StyleCode     # n_images codes, each the base of one sample image

    def images(self, part: slice) -> "StyleStats":
        """The same statistics with only some of the base images."""
        return StyleStats(self.mean, self.std, StyleCode(self.base.conv[part], self.base.rgb[part]))


def _z(n: int, dim: int, seed: int, stream: int) -> Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed * 1_000 + stream))


@torch.no_grad()
def style_statistics(G: Any, n_stat_samples: int, n_images: int, seed: int, chunk: int = 4096) -> StyleStats:
    """Per-channel mean/std over ``n_stat_samples`` codes z → w → s and ``n_images`` base codes (seeded)."""
    device = next(G.parameters()).device
    z_all = _z(n_stat_samples, G.style_dim, seed, _STATS_STREAM)
    total = torch.zeros(G.layout.conv_total, dtype=torch.float64, device=device)
    squares = torch.zeros_like(total)
    for z in z_all.split(chunk):
        s = G.style_space(G.mapping(z.to(device))).conv.double()       # (b, C)
        total += s.sum(0)
        squares += s.pow(2).sum(0)
    mean = total / n_stat_samples
    std = (squares / n_stat_samples - mean.pow(2)).clamp_min(0).sqrt()
    base = G.style_space(G.mapping(_z(n_images, G.style_dim, seed, _IMAGES_STREAM).to(device)))
    return StyleStats(mean.float(), std.float(), base)


def clip_embed(clip: Any, images: Tensor) -> Tensor:
    """Unit-norm CLIP embeddings (B, D) of images in [-1, 1]; differentiable, unlike encode_images."""
    return F.normalize(clip.model.encode_image(clip.preprocess(images)).float(), dim=-1)


def exact_rows(G: Any, clip: Any, stats: StyleStats, channels: Sequence[int], sigma_scale: float,
               batch_size: int) -> Tensor:
    """Rows of Rₛ for ``channels`` (len, D) by StyleCLIP's definition; ``batch_size`` renders per forward.

    row = normalise(sum over images of d), which equals normalise(mean), as StyleCLIP averages.
    """
    return F.normalize(exact_sums(G, clip, stats, channels, sigma_scale, batch_size), dim=-1)


@torch.no_grad()
def exact_sums(G: Any, clip: Any, stats: StyleStats, channels: Sequence[int], sigma_scale: float,
               batch_size: int) -> Tensor:
    """Σ over the base images of StyleCLIP's per-image directions, (len(channels), D), unnormalised.

    1. the (channel, image) pairs are cut into chunks of batch_size // 2 pairs (two renders each);
    2. per pair: the base code with channel c := mean_c − kσ_c and := mean_c + kσ_c;
    3. render, embed, normalise; d = normalise(e₊ − e₋), summed per channel.
    """
    device = stats.mean.device
    chans = torch.as_tensor(list(channels), dtype=torch.long, device=device)
    n = stats.base.batch_size
    pair_ch = torch.arange(len(chans), device=device).repeat_interleave(n)   # (P,) row of each pair
    pair_img = torch.arange(n, device=device).repeat(len(chans))             # (P,) image of each pair
    sums = torch.zeros(len(chans), clip.embed_dim, device=device)
    step = max(1, batch_size // 2)
    for start in range(0, len(pair_ch), step):
        j, i = pair_ch[start:start + step], pair_img[start:start + step]
        c = chans[j].repeat(2)                                                # − half, then + half
        sign = torch.cat([-torch.ones(len(j)), torch.ones(len(j))]).to(device)
        conv = stats.base.conv[i].repeat(2, 1)
        conv[torch.arange(len(c), device=device), c] = stats.mean[c] + sign * sigma_scale * stats.std[c]
        e = clip_embed(clip, G.synthesize(StyleCode(conv, stats.base.rgb[i].repeat(2, 1))))
        sums.index_add_(0, j, F.normalize(e[len(j):] - e[:len(j)], dim=-1))
    return sums


def freeze(*modules: torch.nn.Module) -> None:
    """Inference only: no parameter keeps a gradient (the fast mode differentiates w.r.t. s alone)."""
    for module in modules:
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)


@dataclass
class RelevanceProcessor:
    generator: Any                 # models.stylegan2.Generator
    clip: Any                      # models.clip.ClipEncoder
    stats: StyleStats | None       # None in covariance mode (it renders nothing)
    mode: Mode
    sigma_scale: float
    batch_size: int
    jacobian_batch: int = 8
    fast_rank: int = 0
    pairs: Sequence[Any] = ()      # covariance: the (codes, CLIP) shard pairs it reads
    output_metadata: dict[str, Any] = field(default_factory=dict)
    _all_rows: Tensor | None = None   # fast / covariance: the whole matrix, computed once per worker

    def rows(self, channels: Sequence[int]) -> Tensor:
        """(len(channels), D) rows of Rₛ in this processor's mode."""
        if self.mode == "exact":
            return exact_rows(self.generator, self.clip, self.stats, channels, self.sigma_scale,
                              self.batch_size)
        if self._all_rows is None:       # one pass gives every channel; blocks then just slice it
            self._all_rows = self._whole_matrix()
        return self._all_rows[torch.as_tensor(list(channels), dtype=torch.long)]

    def _whole_matrix(self) -> Tensor:
        if self.mode == "covariance":
            from tasks.relevance_covariance import covariance_rows
            return covariance_rows(self.pairs)
        from tasks.relevance_fast import fast_rows
        return fast_rows(self.generator, self.clip, self.stats, self.jacobian_batch, self.fast_rank)

    def __call__(self, spec: ShardSpec, sink: Sink) -> None:
        channels = [channel_of(i) for i in spec.items]
        layers = {c: l.name for l in self.generator.layout.conv for c in range(l.offset, l.stop)}
        rows = self.rows(channels).float().cpu()
        for item, c, row in zip(spec.items, channels, rows):
            if torch.isfinite(row).all():
                sink.add(item.key, item.source, vectors={COLUMN: row.numpy()}, channel=c, layer=layers[c])
            else:
                sink.add_failure(item.key, item.source, "relevance row is not finite", channel=c)


@dataclass(frozen=True)
class RelevanceBuilder:
    generator: ModelSpec
    clip: ModelSpec
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    mode: Mode = "exact"
    n_images: int = 100            # base images averaged over (StyleCLIP: 100)
    n_stat_samples: int = 100_000  # codes for the per-channel mean/std (StyleCLIP: 100k)
    sigma_scale: float = 5.0       # k in mean ± kσ
    batch_size: int = 32           # exact: renders per forward
    jacobian_batch: int = 8        # fast: images per Jacobian pass
    fast_rank: int = 0             # fast: 0 = full Jacobian, k = k leading CLIP directions (after batch 1)
    root: str | None = None        # covariance: the run whose pools it reads
    pools: tuple[str, ...] = ("samples",)
    seed: int = 0
    device: DeviceChoice = "auto"
    cpus: float = 1.0

    @property
    def stage(self) -> str:
        return f"relevance_{self.mode}"

    def settings(self) -> dict[str, Any]:
        """What determines the numbers (not how fast they come): part of the fingerprint and metadata."""
        return {"mode": self.mode, "n_images": self.n_images, "n_stat_samples": self.n_stat_samples,
                "sigma_scale": self.sigma_scale, "seed": self.seed,
                "fast_rank": self.fast_rank if self.mode == "fast" else None,
                "data": self._data() if self.mode == "covariance" else None,
                "generator": zoo.identity(self.generator, self.storage_options),
                "clip": zoo.identity(self.clip, self.storage_options)}

    def _pairs(self) -> list[Any]:
        from infra.fsio import Location
        from tasks.relevance_covariance import covariance_pairs

        if self.root is None:
            raise ValueError("covariance relevance needs the run root (RelevanceBuilder.root)")
        return covariance_pairs(Location(self.root, self.storage_options), self.pools)

    def _data(self) -> dict[str, Any]:
        """The samples the covariance rows come from: their pools and shards' fingerprint."""
        from tasks.row_cache import pairs_fingerprint
        return {"pools": list(self.pools), "shards": pairs_fingerprint(self._pairs())}

    def build(self) -> RelevanceProcessor:
        set_cpu_threads(self.cpus)
        device = pick_device(self.device)
        gen = zoo.build(self.generator, device=device, storage_options=self.storage_options)
        clip = zoo.build(self.clip, device=device, storage_options=self.storage_options)
        freeze(gen, clip.model)
        covariance = self.mode == "covariance"
        stats = None if covariance else style_statistics(gen, self.n_stat_samples, self.n_images, self.seed)
        meta = {**self.settings(), "clip_model": clip.describe(), "layout": gen.layout.to_dict(),
                "n_channels": gen.layout.conv_total, "embed_dim": clip.embed_dim, "column": COLUMN,
                "normalised": True, "noise_mode": "const", "std": "population",
                "definition": DEFINITIONS[self.mode]}
        return RelevanceProcessor(gen, clip, stats, self.mode, self.sigma_scale, self.batch_size,
                                  self.jacobian_batch, self.fast_rank, self._pairs() if covariance else (),
                                  meta)

    def fingerprint(self) -> str:
        from tasks.relevance_covariance import covariance_rows
        from tasks.relevance_fast import fast_rows
        return code_fingerprint(RelevanceProcessor, fast_rows, covariance_rows, config=self.settings())


def load_relevance(root: str, stage: str = "relevance_exact",
                   storage_options: dict[str, Any] | None = None) -> Tensor:
    """Assemble Rₛ (C, D) from a run's finished blocks, in channel order; missing channels are an error."""
    from infra.fsio import Location
    from infra.readers import read_vectors, vectors_tensor
    from infra.store import StageStore
    from infra.tables import decode_metadata

    table = read_vectors(StageStore(Location(root, storage_options or {}), stage))
    expected = decode_metadata(table).get("n_channels")
    channels = torch.tensor([int(k[2:]) for k in table.column("key").to_pylist()])
    order = torch.argsort(channels)
    if expected is not None and not torch.equal(channels[order], torch.arange(expected)):
        missing = sorted(set(range(expected)) - set(channels.tolist()))
        raise ValueError(f"{root}/{stage}: {len(missing)} of {expected} channels missing "
                         f"(first {missing[:5]}); run the relevance flow to finish it")
    return vectors_tensor(table, COLUMN)[order]
