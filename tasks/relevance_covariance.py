"""Rₛ from data: each channel's row is the direction in CLIP space along which images move when that
channel moves, measured over the run's own generator samples (codes and CLIP embeddings already in the
``samples``/``clip_samples`` stores) instead of by pushing the channel alone ±5σ off its samples.

    row_c = normalise( Σ_n (s_nc − s̄_c) · (i_n − ī) ),   i_n the unit-norm CLIP embedding of sample n

It is the cross-covariance of the channel with the embedding: on-manifold, where StyleCLIP's definition
(``tasks.relevance``) renders codes no sample has. Measured on the toy generator (whose conv channels
each carry one attribute, docs/relevance.md): for a single-attribute prompt the mean |cos(row, Δt)| of
the attribute's own channels is 0.40–0.66 against 0.01–0.09 for the other channels; with the exact
definition 0.09–0.37 against 0.08–0.29, so no threshold separates them. Cost: one pass over the stores
(the sums are streamed shard by shard, memory C × D), no rendering.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from infra.storage.fsio import Location
from tasks.train.mapper_data import POOLS, joined_shards
from tasks.train.row_cache import ShardPair, shard_pairs


def covariance_pairs(root: Location, pools: Sequence[str]) -> list[ShardPair]:
    """The finished (codes, CLIP) shard pairs the rows are computed from; an error if there are none."""
    pairs = shard_pairs(root, pools, POOLS)
    if not pairs:
        raise FileNotFoundError(
            f"covariance relevance needs finished codes + CLIP shards of the pools "
            f"{list(pools)} under {root.uri}: run `deltaedit run preprocess` first"
        )
    return pairs


def covariance_rows(pairs: Sequence[ShardPair]) -> Tensor:
    """Rₛ (C, D), unit rows, from the streamed cross-covariance of the conv styles and the unit-norm
    CLIP embeddings (float64 sums: 200k samples of 6048 × 512 stay exact)."""
    n, s_sum, e_sum, cross = 0, None, None, None
    for shard in joined_shards(pairs):
        s = torch.from_numpy(np.asarray(shard.s, np.float64))
        e = F.normalize(torch.from_numpy(np.asarray(shard.embedding, np.float64)), dim=1)
        if cross is None:
            s_sum, e_sum = (
                torch.zeros(s.shape[1], dtype=torch.float64),
                torch.zeros(e.shape[1], dtype=torch.float64),
            )
            cross = torch.zeros(s.shape[1], e.shape[1], dtype=torch.float64)
        n += len(s)
        s_sum += s.sum(0)
        e_sum += e.sum(0)
        cross += s.T @ e
    if not n:
        raise ValueError("covariance relevance: the stores hold no rows")
    cov = cross / n - torch.outer(s_sum / n, e_sum / n)
    return F.normalize(cov, dim=1).float()
