"""Training rows streamed from the stores with bounded memory, shared by the mapper and diffusion trainers.

The official DeltaEdit loader holds every style code (6.2 GB for 258k FFHQ codes) in RAM. Here a trainer
joins its stores once, shard by shard, into ONE flat local file of fixed-width byte rows:

- ``materialize`` builds that folder under a temporary name and renames it into place (a cache appears
  complete or not at all); a fingerprint of the source shards' done-markers names it, so a rerun reuses it.
- ``FlatRows`` reads rows by random access (``os.preadv``, one call per row, into one buffer): no file
  mapping and no table in RAM; the OS page cache, not the process, holds hot rows.
- ``EpochSampler`` draws the data order as a pure function of (seed, rank, step), so resuming at step k
  needs no sampler state beyond k.
- On a cluster the cache may live at a URI (``cache_dir: s3://...``): ``publish`` uploads a
  built folder (meta.json last), ``localize`` gives each node a local copy, fetched once per
  fingerprint. A shared filesystem path needs neither: every node opens it where it is.

The validation split is by key hash (deterministic, independent of sharding and order).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from infra.storage.fsio import Location
from infra.storage.store import StageStore

META = "meta.json"
# (stage A, stage B, shard id): two stores joined on key, shard by shard
ShardPair = tuple[StageStore, StageStore, str]


def is_validation(key: str, fraction: float) -> bool:
    """Deterministic split: the key's hash as a number in [0, 1) below ``fraction``."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h / 2.0**64 < fraction


def read_columns(store: StageStore, shard_id: str, columns: list[str]) -> Any:
    """Only ``columns`` of one shard's vector table."""
    with store.loc.open(f"{shard_id}.parquet") as f:
        return pq.read_table(f, columns=columns)


def shard_pairs(
    root: Location,
    pools: Sequence[str],
    stages: dict[str, tuple[str, str]],
    shards: Sequence[str] | None = None,
) -> list[ShardPair]:
    """The shards finished in both stages of each pool (``stages[pool]``), optionally only ``shards``."""
    pairs = []
    for pool in pools:
        a, b = (StageStore(root, s) for s in stages[pool])
        common = sorted(set(a.finished()) & set(b.finished()))
        pairs += [(a, b, sid) for sid in common if shards is None or sid in shards]
    return pairs


def pairs_fingerprint(pairs: list[ShardPair], *extra: Any) -> str:
    """Changes when any source shard is rewritten (its marker changes) or when ``extra`` does."""
    parts: list[Any] = list(extra)
    for a, b, sid in pairs:
        for store in {s.stage: s for s in (a, b)}.values():  # a pool may be one stage
            m = store.marker(sid) or {}
            parts.append(
                [
                    store.stage,
                    sid,
                    m.get("counts"),
                    m.get("input_fingerprint"),
                    m.get("code_fingerprint"),
                    m.get("finished_at"),
                ]
            )
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def materialize(
    cache_dir: str | Path, fingerprint: str, write: Callable[[Path], dict[str, Any]]
) -> Path:
    """Reuse ``cache_dir`` if its meta records ``fingerprint``; else ``write(tmp_folder) → meta``, then rename."""
    cache_dir = Path(cache_dir)
    meta_file = cache_dir / META
    if meta_file.exists() and json.loads(meta_file.read_text())["fingerprint"] == fingerprint:
        return cache_dir
    tmp = cache_dir.with_name(f"{cache_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    meta = write(tmp)
    (tmp / META).write_text(json.dumps({**meta, "fingerprint": fingerprint}, indent=1))
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    os.replace(tmp, cache_dir)
    return cache_dir


def stored_fingerprint(loc: Location) -> str | None:
    """The fingerprint of the cache at ``loc`` (None: no complete cache there)."""
    if not loc.exists(META):
        return None
    return json.loads(loc.read_bytes(META)).get("fingerprint")


def publish(folder: str | Path, target: Location) -> None:
    """Copy a built cache folder to ``target`` unless it holds this fingerprint already; meta.json
    goes last, so a reader finds a complete cache or none."""
    folder = Path(folder)
    meta = (folder / META).read_bytes()
    if stored_fingerprint(target) == json.loads(meta)["fingerprint"]:
        return
    target.remove(META)
    target.fs.makedirs(target.path, exist_ok=True)
    for path in sorted(p for p in folder.iterdir() if p.name != META):
        target.fs.put_file(str(path), target.full(path.name))
    target.write_bytes(META, meta)


def localize(
    uri: str, storage_options: dict[str, Any] | None = None, scratch: str | Path | None = None
) -> Path:
    """A local folder with the cache at ``uri``: the path itself when it is local (or shared),
    else a copy under ``scratch`` (the temp dir), downloaded again only when the fingerprint
    changed. Workers of one node share the copy (a lock file serialises them)."""
    loc = Location(uri, storage_options)
    if loc.is_local:
        return Path(loc.path)
    fingerprint = stored_fingerprint(loc)
    if fingerprint is None:
        raise FileNotFoundError(f"no row cache at {uri} (no {META}); the training flow writes it")
    local = local_copy_folder(loc.uri, scratch)
    local.parent.mkdir(parents=True, exist_ok=True)
    with open(local.with_name(f"{local.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return materialize(local, fingerprint, lambda tmp: _download(loc, tmp))


def local_copy_folder(uri: str, scratch: str | Path | None = None) -> Path:
    """Where a node keeps its copy of the cache at ``uri`` (the driver builds it there before
    publishing, so it never downloads what it uploaded)."""
    name = f"deltaedit-cache-{hashlib.sha256(uri.rstrip('/').encode()).hexdigest()[:12]}"
    return Path(scratch or tempfile.gettempdir()) / name


def _download(loc: Location, out: Path) -> dict[str, Any]:
    """Every file of the cache at ``loc`` but its meta (``materialize`` writes it); its meta."""
    for name in loc.listdir():
        if name != META:
            loc.fs.get_file(loc.full(name), str(out / name))
    meta = json.loads(loc.read_bytes(META))
    meta.pop("fingerprint", None)
    return meta


class SplitCache:
    """A built cache folder: its meta and the per-row validation flags (1 byte per sample in RAM)."""

    def __init__(self, folder: str | Path, split_file: str) -> None:
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META).read_text())
        self.is_val = np.load(self.folder / split_file)

    def __len__(self) -> int:
        return int(self.meta["rows"])

    @property
    def train_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.is_val)

    @property
    def val_rows(self) -> np.ndarray:
        return np.flatnonzero(self.is_val)


class FlatRows:
    """Random access to fixed-width byte rows of one file; RAM use independent of its size; picklable."""

    def __init__(self, path: str | Path, row_bytes: int) -> None:
        self.path, self.row_bytes = Path(path), row_bytes
        self.rows_read = 0  # for tests: rows fetched so far
        self._fd: int | None = os.open(self.path, os.O_RDONLY)  # preadv is thread-safe

    def fetch(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), row_bytes) uint8 array of the given row numbers, read one row at a time."""
        if self._fd is None:  # unpickled in another process
            self._fd = os.open(self.path, os.O_RDONLY)
        n = self.row_bytes
        out = np.empty((len(rows), n), dtype=np.uint8)
        view = memoryview(out).cast("B")
        for i, r in enumerate(rows):
            if os.preadv(self._fd, [view[i * n : (i + 1) * n]], int(r) * n) != n:
                raise IOError(f"{self.path}: short read at row {r}")
        self.rows_read += len(rows)
        return out

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # picklable for Ray workers: reopen there
        return {**self.__dict__, "_fd": None}


@dataclass
class EpochSampler:
    """Row numbers of each step's batch; a pure function of (seed, rank, step).

    Each worker (``rank`` of ``world``) owns a slice of the training rows and walks a fresh permutation
    of it every epoch.
    """

    train_rows: np.ndarray  # (N_train,) rows of the cache usable for training
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        self.mine = self.train_rows[self.rank :: self.world]
        if len(self.mine) < self.batch_size:
            raise ValueError(
                f"{len(self.mine)} training rows for worker {self.rank}, fewer than one batch "
                f"of {self.batch_size}"
            )
        self.steps_per_epoch = len(self.mine) // self.batch_size
        self._epoch, self._perm = -1, self.mine

    def primaries(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, self.rank, epoch]).permutation(self.mine)
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]

    def batch(self, step: int) -> np.ndarray:
        return self.primaries(step)

    def state(self, step: int) -> dict[str, int]:
        return {"seed": self.seed, "rank": self.rank, "world": self.world, "step": step}
