"""Pairs for Delta Mapper training, streamed from the stores with bounded memory.

The official loader holds every style code (6.2 GB for 258k FFHQ codes) and W+ in RAM. Here:

1. ``build_row_cache`` reads each (codes, CLIP) shard pair once — only the ``key``/``s``/``embedding``
   columns, one shard at a time — joins them on key and appends ``[s | embedding]`` float32 rows to one
   flat local file. A fingerprint of the shards' done-markers names the cache, so a rerun reuses it.
2. ``RowCache.fetch`` reads rows by random access (``os.pread``, one call per row, into one reused
   buffer): no file mapping, no table in RAM. In RAM stay only the per-row split flags and the index
   arrays (a few bytes per sample); the OS page cache, not the process, holds hot rows.
3. ``PairSampler`` draws the data order as a pure function of (seed, rank, step): primaries are an
   epoch permutation of the worker's slice of the training rows, each partner is uniform over the
   WHOLE training pool (as the official code). Resuming at step k needs no sampler state beyond k.

The validation split is by key hash (deterministic, independent of sharding and order).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from infra.fsio import Location
from infra.store import StageStore
from infra.tables import column_to_numpy, decode_metadata

# (codes stage, CLIP stage) per pool: inverted real images and generator samples
POOLS: dict[str, tuple[str, str]] = {"codes": ("codes", "clip_images"), "samples": ("samples", "clip_samples")}
META = "meta.json"
ROWS = "rows.f32"
SPLIT = "val.npy"


def is_validation(key: str, fraction: float) -> bool:
    """Deterministic split: the key's hash as a number in [0, 1) below ``fraction``."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h / 2.0 ** 64 < fraction


def _read_columns(store: StageStore, shard_id: str, columns: list[str]) -> Any:
    with store.loc.open(f"{shard_id}.parquet") as f:
        return pq.read_table(f, columns=columns)


def _shard_pairs(root: Location, pools: Sequence[str], shards: Sequence[str] | None
                 ) -> list[tuple[StageStore, StageStore, str]]:
    pairs = []
    for pool in pools:
        codes, clip = (StageStore(root, s) for s in POOLS[pool])
        common = sorted(set(codes.finished()) & set(clip.finished()))
        pairs += [(codes, clip, sid) for sid in common if shards is None or sid in shards]
    return pairs


def _fingerprint(pairs: list[tuple[StageStore, StageStore, str]], val_fraction: float) -> str:
    parts: list[Any] = [val_fraction]
    for codes, clip, sid in pairs:
        for store in (codes, clip):
            m = store.marker(sid) or {}
            parts.append([store.stage, sid, m.get("counts"), m.get("input_fingerprint"),
                          m.get("code_fingerprint"), m.get("finished_at")])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def build_row_cache(root: Location, cache_dir: str | Path, *, pools: Sequence[str] = ("codes", "samples"),
                    shards: Sequence[str] | None = None, val_fraction: float = 0.01) -> "RowCache":
    """Join the pools' codes and CLIP shards into a flat row file under ``cache_dir`` (reused if current)."""
    cache_dir = Path(cache_dir)
    pairs = _shard_pairs(root, pools, shards)
    if not pairs:
        raise FileNotFoundError(f"no finished codes+CLIP shard pairs under {root.uri} (pools {list(pools)})")
    fp = _fingerprint(pairs, val_fraction)
    if (cache_dir / META).exists() and json.loads((cache_dir / META).read_text())["fingerprint"] == fp:
        return RowCache(cache_dir)
    tmp = cache_dir.with_name(f"{cache_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    meta = _write_rows(pairs, tmp, val_fraction)
    (tmp / META).write_text(json.dumps({**meta, "fingerprint": fp}, indent=1))
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    os.replace(tmp, cache_dir)                 # the cache appears complete or not at all
    return RowCache(cache_dir)


def _write_rows(pairs: list[tuple[StageStore, StageStore, str]], out: Path, val_fraction: float
                ) -> dict[str, Any]:
    """Stream shard by shard: never more than one shard's columns in memory."""
    val: list[bool] = []
    counts: dict[str, int] = {}
    dims: tuple[int, int] | None = None
    layout = None
    with open(out / ROWS, "wb") as f:
        for codes, clip, sid in pairs:
            s_tab = _read_columns(codes, sid, ["key", "s"])
            e_tab = _read_columns(clip, sid, ["key", "embedding"])
            e_row = {k: i for i, k in enumerate(e_tab.column("key").to_pylist())}
            keys = [k for k in s_tab.column("key").to_pylist() if k in e_row]
            s_pos = {k: i for i, k in enumerate(s_tab.column("key").to_pylist())}
            s = column_to_numpy(s_tab, "s")[[s_pos[k] for k in keys]]           # (n, S)
            e = column_to_numpy(e_tab, "embedding")[[e_row[k] for k in keys]]   # (n, D)
            if dims is None:
                dims, layout = (s.shape[1], e.shape[1]), decode_metadata(s_tab).get("layout")
            elif dims != (s.shape[1], e.shape[1]):
                raise ValueError(f"{codes.stage}/{sid}: widths {(s.shape[1], e.shape[1])} differ from {dims}")
            f.write(np.ascontiguousarray(np.concatenate([s, e], axis=1), np.float32).tobytes())
            val += [is_validation(k, val_fraction) for k in keys]
            counts[codes.stage] = counts.get(codes.stage, 0) + len(keys)
    np.save(out / SPLIT, np.asarray(val, dtype=bool))
    return {"rows": len(val), "style_dim": dims[0], "clip_dim": dims[1], "layout": layout,
            "counts": counts, "validation": int(sum(val))}


class RowCache:
    """Random access to the ``[s | embedding]`` rows of a built cache; RAM use independent of its size."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META).read_text())
        self.style_dim, self.clip_dim = self.meta["style_dim"], self.meta["clip_dim"]
        self.width = self.style_dim + self.clip_dim
        self.is_val = np.load(self.folder / SPLIT)                     # (N,) bool, 1 byte per sample
        self.rows_read = 0                                             # for tests: rows fetched so far
        self._fd: int | None = os.open(self.folder / ROWS, os.O_RDONLY)   # preadv is thread-safe

    def __len__(self) -> int:
        return int(self.meta["rows"])

    @property
    def train_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.is_val)

    @property
    def val_rows(self) -> np.ndarray:
        return np.flatnonzero(self.is_val)

    def fetch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(s (B, S), embedding (B, D)) of the given row numbers, read one row at a time."""
        if self._fd is None:                                           # unpickled in another process
            self._fd = os.open(self.folder / ROWS, os.O_RDONLY)
        out = np.empty((len(rows), self.width), dtype=np.float32)
        nbytes = self.width * 4
        view = memoryview(out).cast("B")
        for i, r in enumerate(rows):
            got = os.preadv(self._fd, [view[i * nbytes:(i + 1) * nbytes]], int(r) * nbytes)
            if got != nbytes:
                raise IOError(f"{self.folder / ROWS}: short read at row {r}")
        self.rows_read += len(rows)
        t = torch.from_numpy(out)
        return t[:, :self.style_dim], t[:, self.style_dim:]

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:          # picklable for Ray workers: reopen there
        return {**self.__dict__, "_fd": None}


@dataclass
class PairSampler:
    """Row numbers of (primary, partner) for any step; a pure function of (seed, rank, step)."""
    train_rows: np.ndarray     # (N_train,) rows of the cache usable for training
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        self.mine = self.train_rows[self.rank::self.world]          # this worker's slice of primaries
        if len(self.mine) < self.batch_size:
            raise ValueError(f"{len(self.mine)} training rows for worker {self.rank}, fewer than one batch "
                             f"of {self.batch_size}")
        self.steps_per_epoch = len(self.mine) // self.batch_size
        self._epoch, self._perm = -1, self.mine

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, self.rank, epoch]).permutation(self.mine)
        primary = self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, self.rank, epoch, pos, 1])
        partner = self.train_rows[rng.integers(0, len(self.train_rows), self.batch_size)]
        return primary, partner

    def state(self, step: int) -> dict[str, int]:
        return {"seed": self.seed, "rank": self.rank, "world": self.world, "step": step}


def validation_pairs(val_rows: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed set of up to ``n`` validation pairs, both members from the held-out rows."""
    rng = np.random.default_rng([seed, 7919])
    primary = rng.permutation(val_rows)[:n]
    return primary, val_rows[rng.integers(0, len(val_rows), len(primary))]
