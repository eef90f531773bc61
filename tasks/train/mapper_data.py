"""Pairs for Delta Mapper training, streamed from the stores with bounded memory (see ``tasks.train.row_cache``).

1. ``build_row_cache`` reads each (codes, CLIP) shard pair once — only the ``key``/``s``/``embedding``
   columns, one shard at a time — joins them on key and appends ``[s | embedding]`` float32 rows to one
   flat local file.
2. ``RowCache.fetch`` reads rows by random access; in RAM stay only the per-row split flags.
3. ``PairSampler``: primaries are an epoch permutation of the worker's slice of the training rows, each
   partner is uniform over the WHOLE training pool (as the official code); a pure function of the step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from infra.storage.fsio import Location
from infra.storage.store import StageStore
from infra.storage.tables import column_to_numpy, decode_metadata
from tasks.layout import CODES, MAPPER_POOLS
from tasks.split import in_eval
from tasks.train.row_cache import (
    EpochSampler,
    FlatRows,
    ShardPair,
    SplitCache,
    is_validation,
    materialize,
    pairs_fingerprint,
    read_columns,
    shard_pairs,
)

POOLS = (
    MAPPER_POOLS  # (codes stage, CLIP stage) per pool: inverted real images and generator samples
)
ROWS = "rows.f32"
SPLIT = "val.npy"


def build_row_cache(
    root: Location,
    cache_dir: str | Path,
    *,
    pools: Sequence[str] = tuple(MAPPER_POOLS),
    shards: Sequence[str] | None = None,
    val_fraction: float = 0.01,
    eval_fraction: float = 0.0,
) -> "RowCache":
    """Join the pools' codes and CLIP shards into a flat row file under ``cache_dir`` (reused if current);
    the catalog's eval part (``split.eval_fraction``, ``tasks.split``) is left out."""
    pairs = shard_pairs(root, pools, POOLS, shards)
    if not pairs:
        raise FileNotFoundError(
            f"no finished codes+CLIP shard pairs under {root.uri} (pools {list(pools)})"
        )
    folder = materialize(
        cache_dir,
        pairs_fingerprint(
            pairs, val_fraction, *([["eval", eval_fraction]] if eval_fraction else [])
        ),
        lambda tmp: _write_rows(pairs, tmp, val_fraction, eval_fraction),
    )
    return RowCache(folder)


@dataclass
class JoinedShard:
    """One shard pair's codes and CLIP embeddings, joined on key (rows in the codes shard's order)."""

    codes: StageStore
    shard_id: str
    keys: list[str]
    s: np.ndarray  # (n, S) conv styles
    embedding: np.ndarray  # (n, D) CLIP image embeddings
    layout: dict[str, Any] | None


def joined_shards(pairs: Sequence[ShardPair], eval_fraction: float = 0.0) -> Iterator[JoinedShard]:
    """Stream the pairs shard by shard (only the key/s/embedding columns): one shard in memory at a time;
    every shard must have the first one's widths. ``eval_fraction``: the catalog's (``codes``) eval part
    is left out (``tasks.split``)."""
    dims: tuple[int, int] | None = None
    for codes, clip, sid in pairs:
        s_tab = read_columns(codes, sid, ["key", "s"])
        e_tab = read_columns(clip, sid, ["key", "embedding"])
        e_row = {k: i for i, k in enumerate(e_tab.column("key").to_pylist())}
        held_out = eval_fraction if codes.stage == CODES else 0.0
        keys = [
            k for k in s_tab.column("key").to_pylist() if k in e_row and not in_eval(k, held_out)
        ]
        s_pos = {k: i for i, k in enumerate(s_tab.column("key").to_pylist())}
        s = column_to_numpy(s_tab, "s")[[s_pos[k] for k in keys]]
        e = column_to_numpy(e_tab, "embedding")[[e_row[k] for k in keys]]
        if dims is None:
            dims = (s.shape[1], e.shape[1])
        elif dims != (s.shape[1], e.shape[1]):
            raise ValueError(
                f"{codes.stage}/{sid}: widths {(s.shape[1], e.shape[1])} differ from {dims}"
            )
        yield JoinedShard(codes, sid, keys, s, e, decode_metadata(s_tab).get("layout"))


def _write_rows(
    pairs: list[ShardPair], out: Path, val_fraction: float, eval_fraction: float = 0.0
) -> dict[str, Any]:
    """Stream shard by shard: never more than one shard's columns in memory."""
    val: list[bool] = []
    counts: dict[str, int] = {}
    dims: tuple[int, int] | None = None
    layout = None
    with open(out / ROWS, "wb") as f:
        for shard in joined_shards(pairs, eval_fraction):
            codes, keys, s, e = shard.codes, shard.keys, shard.s, shard.embedding
            if dims is None:
                dims, layout = (s.shape[1], e.shape[1]), shard.layout
            f.write(np.ascontiguousarray(np.concatenate([s, e], axis=1), np.float32).tobytes())
            val += [is_validation(k, val_fraction) for k in keys]
            counts[codes.stage] = counts.get(codes.stage, 0) + len(keys)
    np.save(out / SPLIT, np.asarray(val, dtype=bool))
    return {
        "rows": len(val),
        "style_dim": dims[0],
        "clip_dim": dims[1],
        "layout": layout,
        "counts": counts,
        "validation": int(sum(val)),
    }


class RowCache(SplitCache):
    """Random access to the ``[s | embedding]`` rows of a built cache; RAM use independent of its size."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__(folder, SPLIT)
        self.style_dim, self.clip_dim = self.meta["style_dim"], self.meta["clip_dim"]
        self.rows = FlatRows(self.folder / ROWS, 4 * (self.style_dim + self.clip_dim))

    @property
    def rows_read(self) -> int:
        return self.rows.rows_read

    def fetch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(s (B, S), embedding (B, D)) of the given row numbers."""
        t = torch.from_numpy(self.rows.fetch(rows).view(np.float32))
        return t[:, : self.style_dim], t[:, self.style_dim :]


@dataclass
class PairSampler(EpochSampler):
    """(primary, partner) row numbers for any step: partners are uniform over the whole training pool
    (as the official code), except a ``local_fraction`` of them drawn from the primary's ``neighbours``."""

    neighbours: np.ndarray | None = (
        None  # (N_train, k) positions in train_rows of each row's nearest
    )
    local_fraction: float = 0.0

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        primary = self.primaries(step)
        epoch, pos = divmod(step, self.steps_per_epoch)
        rng = np.random.default_rng([self.seed, self.rank, epoch, pos, 1])
        partner = self.train_rows[rng.integers(0, len(self.train_rows), self.batch_size)]
        if self.neighbours is None or not self.local_fraction:
            return primary, partner
        at = np.searchsorted(self.train_rows, primary)  # train_rows is sorted
        local = self.train_rows[
            self.neighbours[at, rng.integers(0, self.neighbours.shape[1], len(at))]
        ]
        return primary, np.where(rng.random(len(at)) < self.local_fraction, local, partner)


@torch.no_grad()
def nearest_rows(cache: RowCache, k: int, chunk: int = 4096) -> np.ndarray:
    """(N_train, k): for each training row, the positions (in ``cache.train_rows``) of the k rows whose
    CLIP image embeddings are closest in cosine, itself excluded. Pairs of near neighbours differ in few
    attributes, so their Δi look like a one-attribute Δt; uniform pairs differ in nearly everything.
    Memory: the embeddings (N × D) and one chunk × N block of similarities."""
    rows = cache.train_rows
    if len(rows) <= k:
        raise ValueError(f"{len(rows)} training rows: too few for {k} neighbours each")
    emb = torch.cat(
        [
            F.normalize(cache.fetch(rows[i : i + chunk])[1], dim=1)
            for i in range(0, len(rows), chunk)
        ]
    )
    out = np.empty((len(rows), k), dtype=np.int64)
    for start in range(0, len(rows), chunk):
        sim = emb[start : start + chunk] @ emb.T
        sim[torch.arange(len(sim)), torch.arange(start, start + len(sim))] = -2.0  # not itself
        out[start : start + len(sim)] = sim.topk(k, dim=1).indices.numpy()
    return out


def validation_pairs(val_rows: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed set of up to ``n`` validation pairs, both members from the held-out rows."""
    rng = np.random.default_rng([seed, 7919])
    primary = rng.permutation(val_rows)[:n]
    return primary, val_rows[rng.integers(0, len(val_rows), len(primary))]
