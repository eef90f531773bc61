"""The relevance matrix Rₛ as math: StyleCLIP's exact definition and its fast derivative, on any G and CLIP.

Exact (StyleCLIP's "fs3"; docs/relevance.md): for each conv channel c and each of n base images, set c to
its mean ± kσ, render both, CLIP-embed and normalise; the image's direction is normalise(e₊ − e₋); the
channel's row is normalise(mean of the n directions).

Fast: StyleCLIP's direction for channel c on image i is normalise(e(m_c + kσ_c) − e(m_c − kσ_c)), with e the
unit-norm CLIP embedding of the render. That is a central difference: to first order
it equals 2kσ_c · J_i[:, c], with J_i = ∂e/∂s (D × C) the Jacobian of the normalised embedding w.r.t.
the conv styles, and since σ_c > 0 its direction is that of the Jacobian column. Reverse mode gives
all C columns of J_i from one forward and D backward passes — instead of 2·C renders per image — so
the cost no longer grows with the number of channels (6048 at 1024 px) but with the CLIP dim (512).

Approximations (measured against the exact mode by ``deltaedit relevance compare``): J is taken at the
image's own code rather than with channel c moved to its mean, and the ±kσ secant by the tangent.
How close that is depends on how linear the models' response is over ±kσ, so check a new model pair
with ``deltaedit relevance compare`` first. Measured (bench/relevance_bench.py): mean row cosine 0.977 on
the toy-sized random-weight models (32 images); with the trained toy models of 2026-11-24 0.968 on 100
images (noise floor, exact rows of two disjoint halves of the images: 0.706), and rank 32 0.965 at 37× the
exact mode's speed. With the previous toy generator it was 0.81: its ±5σ secant was far from any
tangent (even the exact definition at k = 0.05 had cosine 0.77 to k = 5). ``exact`` stays the default.
Optional ``rank`` k < D: the normalised-embedding Jacobian has a low effective rank (toy: 99.7% of its
energy in 16 of 64 dims), so after the first batch of images only the k leading directions Q of that
batch's Jacobians are differentiated (k backward passes instead of D) and J ≈ (J Q) Qᵀ.
"""

from __future__ import annotations

import io
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from models.checkpoint import read_bytes
from models.errors import CheckpointError
from models.stylegan2 import StyleCode

_STATS_STREAM, _IMAGES_STREAM = 101, 202  # seed tags: statistics codes vs base images


@dataclass
class StyleStats:
    """What every relevance computation starts from, recomputable from the seed anywhere."""

    mean: Tensor  # (C,) per-channel mean of conv styles over n_stat_samples codes
    std: Tensor  # (C,) per-channel std (population, numpy's default as in StyleCLIP)
    base: StyleCode  # n_images codes, each the base of one sample image

    def images(self, part: slice) -> "StyleStats":
        """The same statistics with only some of the base images."""
        return StyleStats(self.mean, self.std, StyleCode(self.base.conv[part], self.base.rgb[part]))


def _z(n: int, dim: int, seed: int, stream: int) -> Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed * 1_000 + stream))


@torch.no_grad()
def style_statistics(
    G: Any, n_stat_samples: int, n_images: int, seed: int, chunk: int = 4096
) -> StyleStats:
    """Per-channel mean/std over ``n_stat_samples`` codes z → w → s and ``n_images`` base codes (seeded)."""
    device = next(G.parameters()).device
    z_all = _z(n_stat_samples, G.style_dim, seed, _STATS_STREAM)
    total = torch.zeros(G.layout.conv_total, dtype=torch.float64, device=device)
    squares = torch.zeros_like(total)
    for z in z_all.split(chunk):
        s = G.style_space(G.mapping(z.to(device))).conv.double()  # (b, C)
        total += s.sum(0)
        squares += s.pow(2).sum(0)
    mean = total / n_stat_samples
    std = (squares / n_stat_samples - mean.pow(2)).clamp_min(0).sqrt()
    base = G.style_space(G.mapping(_z(n_images, G.style_dim, seed, _IMAGES_STREAM).to(device)))
    return StyleStats(mean.float(), std.float(), base)


def clip_embed(clip: Any, images: Tensor) -> Tensor:
    """Unit-norm CLIP embeddings (B, D) of images in [-1, 1]; differentiable, unlike encode_images."""
    return F.normalize(clip.model.encode_image(clip.preprocess(images)).float(), dim=-1)


def exact_rows(
    G: Any,
    clip: Any,
    stats: StyleStats,
    channels: Sequence[int],
    sigma_scale: float,
    batch_size: int,
) -> Tensor:
    """Rows of Rₛ for ``channels`` (len, D) by StyleCLIP's definition; ``batch_size`` renders per forward.

    row = normalise(sum over images of d), which equals normalise(mean), as StyleCLIP averages.
    """
    return F.normalize(exact_sums(G, clip, stats, channels, sigma_scale, batch_size), dim=-1)


@torch.no_grad()
def exact_sums(
    G: Any,
    clip: Any,
    stats: StyleStats,
    channels: Sequence[int],
    sigma_scale: float,
    batch_size: int,
) -> Tensor:
    """Σ over the base images of StyleCLIP's per-image directions, (len(channels), D), unnormalised.

    1. the (channel, image) pairs are cut into chunks of batch_size // 2 pairs (two renders each);
    2. per pair: the base code with channel c := mean_c − kσ_c and := mean_c + kσ_c;
    3. render, embed, normalise; d = normalise(e₊ − e₋), summed per channel.
    """
    device = stats.mean.device
    chans = torch.as_tensor(list(channels), dtype=torch.long, device=device)
    n = stats.base.batch_size
    pair_ch = torch.arange(len(chans), device=device).repeat_interleave(n)  # (P,) row of each pair
    pair_img = torch.arange(n, device=device).repeat(len(chans))  # (P,) image of each pair
    sums = torch.zeros(len(chans), clip.embed_dim, device=device)
    step = max(1, batch_size // 2)
    for start in range(0, len(pair_ch), step):
        j, i = pair_ch[start : start + step], pair_img[start : start + step]
        c = chans[j].repeat(2)  # − half, then + half
        sign = torch.cat([-torch.ones(len(j)), torch.ones(len(j))]).to(device)
        conv = stats.base.conv[i].repeat(2, 1)
        conv[torch.arange(len(c), device=device), c] = (
            stats.mean[c] + sign * sigma_scale * stats.std[c]
        )
        e = clip_embed(clip, G.synthesize(StyleCode(conv, stats.base.rgb[i].repeat(2, 1))))
        sums.index_add_(0, j, F.normalize(e[len(j) :] - e[: len(j)], dim=-1))
    return sums


def freeze(*modules: torch.nn.Module) -> None:
    """Inference only: no parameter keeps a gradient (the fast mode differentiates w.r.t. s alone)."""
    for module in modules:
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)


def image_jacobian(
    G: Any, clip: Any, conv: Tensor, rgb: Tensor, basis: Tensor | None = None
) -> Tensor:
    """∂ normalise(CLIP(G(s)))/∂s for a batch of codes: (B, C, D), one backward per CLIP dim; with
    ``basis`` Q (D, k) one backward per basis vector, J ≈ (J Q) Qᵀ."""
    s = conv.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        e = clip_embed(clip, G.synthesize(StyleCode(s, rgb)))  # (B, D)
        out = e if basis is None else e @ basis  # (B, D or k)
        dims = out.shape[1]
        cols = [
            torch.autograd.grad(out[:, d].sum(), s, retain_graph=d < dims - 1)[0]
            for d in range(dims)
        ]
    jac = torch.stack(cols, dim=2)  # images are independent
    return jac if basis is None else jac @ basis.T


def leading_directions(jac: Tensor, rank: int) -> Tensor:
    """(D, rank) orthonormal: the top right-singular vectors of a batch of Jacobians (B, C, D)."""
    return torch.linalg.svd(jac.reshape(-1, jac.shape[-1]), full_matrices=False).Vh[:rank].T


def fast_rows(G: Any, clip: Any, stats: StyleStats, batch_size: int, rank: int = 0) -> Tensor:
    """All rows of Rₛ (C, D): per image, the unit Jacobian columns; averaged over images; normalised.

    ``stats``: StyleStats. ``rank`` > 0: project on the leading directions of the first
    batch (see the module notes). Channels with σ = 0 get a zero row, as in the exact mode.
    """
    base: StyleCode = stats.base
    sums = torch.zeros(G.layout.conv_total, clip.embed_dim, device=stats.mean.device)
    basis = None
    for start in range(0, base.batch_size, batch_size):
        part = slice(start, start + batch_size)
        jac = image_jacobian(G, clip, base.conv[part], base.rgb[part], basis)  # (b, C, D)
        sums += F.normalize(jac, dim=-1).sum(0)
        if basis is None and 0 < rank < clip.embed_dim:
            basis = leading_directions(jac, rank)
    rows = F.normalize(sums, dim=-1)
    rows[stats.std == 0] = 0
    return rows


def subset_channels(n_channels: int, n: int, seed: int) -> list[int]:
    """``n`` channels drawn (seeded) across every layer, sorted."""
    perm = torch.randperm(n_channels, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[: min(n, n_channels)].tolist())


def top_k_overlap(exact: Tensor, fast: Tensor, delta: Tensor, k: int) -> float:
    """|top-k ∩ top-k| / k of the channels ranked by |Rₛ·Δt| (the channels an edit keeps)."""
    k = min(k, len(exact))
    top_e = set((exact @ delta).abs().topk(k).indices.tolist())
    top_f = set((fast @ delta).abs().topk(k).indices.tolist())
    return len(top_e & top_f) / k


def timed_exact(
    G: Any, clip: Any, stats: StyleStats, channels: list[int], sigma_scale: float, batch_size: int
) -> tuple[Tensor, float, float]:
    """(exact rows of ``channels``, seconds they took, split-half cosine).

    The split-half cosine — mean row cosine between the exact rows of the first and the second half of
    the images — is the noise floor of any comparison: how stable the rows are with these many images.
    Computed from the same renders (row = normalise(Σ_A + Σ_B)).
    """
    start = time.perf_counter()
    half = max(1, stats.base.batch_size // 2)
    a = exact_sums(G, clip, stats.images(slice(0, half)), channels, sigma_scale, batch_size)
    b = exact_sums(G, clip, stats.images(slice(half, None)), channels, sigma_scale, batch_size)
    seconds = time.perf_counter() - start
    split = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(1).mean().item()
    return F.normalize(a + b, dim=-1), seconds, split


def compare_rows(
    G: Any,
    clip: Any,
    stats: StyleStats,
    channels: list[int],
    sigma_scale: float,
    batches: tuple[int, int],
    deltas: dict[str, Tensor],
    top_k: int,
    rank: int = 0,
    exact: tuple[Tensor, float, float] | None = None,
) -> dict[str, Any]:
    """Exact rows of ``channels`` vs the fast matrix: row cosines, top-k overlap per Δt, timings.

    ``batches``: (renders per forward of the exact mode, images per Jacobian pass of the fast mode).
    ``exact``: the result of ``timed_exact``, to reuse over several fast settings.
    ``speed_ratio`` extrapolates the exact time to every channel (its cost is linear in channels) and
    divides by the fast time for the whole matrix.
    """
    reference, t_exact, split_half = exact or timed_exact(
        G, clip, stats, channels, sigma_scale, batches[0]
    )
    start = time.perf_counter()
    fast = fast_rows(G, clip, stats, batches[1], rank)[torch.as_tensor(channels)]
    t_fast = time.perf_counter() - start
    cos = (reference * fast).sum(1)
    overlap = {
        name: top_k_overlap(reference, fast, d.to(fast), top_k) for name, d in deltas.items()
    }
    exact_all = t_exact * G.layout.conv_total / len(channels)
    return {
        "channels": len(channels),
        "n_channels": G.layout.conv_total,
        "rank": rank,
        "mean_row_cosine": cos.mean().item(),
        "min_row_cosine": cos.min().item(),
        "exact_split_half_cosine": split_half,
        "top_k": top_k,
        "top_k_overlap": overlap,
        "seconds_exact_subset": round(t_exact, 3),
        "seconds_exact_all_est": round(exact_all, 3),
        "seconds_fast_all": round(t_fast, 3),
        "speed_ratio": exact_all / t_fast,
    }


# StyleCLIP's published Rₛ, as read in orpatashnik/StyleCLIP (global_directions/MapTS.py: GetFs and SplitS;
# global_torch/StyleCLIP.py: np.load of the published fs3.npy, used as is with SplitS). GetFs loads
# single_channel.npy (channels × images × 2 × D:
# the unit CLIP embeddings of the −kσ and +kσ renders), normalises each embedding, takes their difference
# (+kσ minus −kσ) and normalises it, averages over the images, and normalises each row again:
#     fs3 = mean_i normalise(e₊ − e₋);  fs3 = fs3 / ||fs3||  (per row)
# so the published fs3.npy has unit rows. Its rows follow the generator's style layers minus the toRGB ones
# (its ``M.mindexs``; SplitS walks ``M.s_names`` skipping names with "RGB"), in synthesis order: the 4×4
# conv, then per resolution Conv0_up (as many channels as its input) and Conv1. That is rosinality's
# conv1, convs.0, convs.1, … (StyleLayout.conv), 6048 × 512 for FFHQ 1024 and CLIP ViT-B/32.
FS3_FFHQ_1024 = (6048, 512)


def published_rows(matrix: Any, layout: Any, embed_dim: int, source: str) -> Tensor:
    """A published Rₛ in StyleCLIP's fs3 layout as (C, D) float32 rows, checked against the run's
    generator ``layout`` (a StyleLayout) and CLIP ``embed_dim``, each row normalised to unit length.

    Normalising is GetFs' last step: a no-op on StyleCLIP's own file, and it makes any other matrix follow
    the same definition (a zero row stays zero, where GetFs would give NaN). Raises CheckpointError naming
    both counts when the file does not fit the run (another resolution, toRGB rows included, another CLIP).
    """
    rows = torch.as_tensor(matrix)
    if rows.ndim != 2:
        raise CheckpointError(
            f"{source}: expected a 2-d matrix (channels × CLIP dim) as StyleCLIP's fs3.npy, "
            f"got shape {tuple(rows.shape)}"
        )
    n, dim = rows.shape
    if n != layout.conv_total:
        hint = ""
        if n == layout.conv_total + layout.rgb_total:
            hint = "; it has a row per toRGB channel too, fs3 has conv channels only"
        elif n == FS3_FFHQ_1024[0]:
            hint = "; that is StyleCLIP's FFHQ 1024 file, for a 1024 px generator"
        elif n in (prefix := list(itertools.accumulate(c.channels for c in layout.conv))):
            hint = (  # StyleCLIP's SingleChannel script stops at 11 of FFHQ 1024's 17 conv layers
                f"; that is the first {prefix.index(n) + 1} of the {len(layout.conv)} conv layers "
                "only, DeltaEdit needs them all"
            )
        raise CheckpointError(
            f"{source} has {n} rows, but the run's generator has {layout.conv_total} conv-style "
            f"channels ({len(layout.conv)} conv layers of "
            f"{', '.join(str(c.channels) for c in layout.conv)} channels, in that order){hint}; "
            "fs3.npy needs one row per conv-style channel in layer order"
        )
    if dim != embed_dim:
        raise CheckpointError(
            f"{source} has {dim} columns, but the run's CLIP embeds in {embed_dim} dimensions "
            f"(StyleCLIP's file is for ViT-B/32: {FS3_FFHQ_1024[1]})"
        )
    rows = rows.double()
    bad = (~torch.isfinite(rows).all(1)).nonzero().flatten()
    if len(bad):
        raise CheckpointError(
            f"{source}: {len(bad)} rows are not finite (first channels {bad[:5].tolist()})"
        )
    return F.normalize(rows, dim=1).float()


def read_published(uri: str, **storage_options: Any) -> Any:
    """The array of a ``.npy`` file (path or URI) such as StyleCLIP's fs3.npy; pickled objects refused."""
    import numpy as np

    data = read_bytes(uri, **storage_options)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CheckpointError(f"{uri}: not a .npy array ({exc})") from exc
