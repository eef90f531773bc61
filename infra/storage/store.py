"""Stage stores: per-shard WebDataset tars, Parquet vector tables, Parquet manifests and done-markers.

Layout of one stage under a run root (local path or any fsspec URI)::

    <root>/<stage>/<shard>.tar               images (WebDataset: <key>.png + <key>.json)
    <root>/<stage>/<shard>.parquet           vectors (key + fixed_size_list<float32> columns)
    <root>/<stage>/<shard>.manifest.parquet  every sample: key, source, status, error, extras
    <root>/<stage>/<shard>.done.json         written LAST: counts, timings, fingerprints
    <root>/<stage>/_current.json             the stage's current plan: shard ids → input fingerprints

A shard counts as finished only when its done-marker exists and its fingerprints match; everything is
written under temporary names and committed atomically (``infra.storage.fsio``), so a killed writer leaves no
visible shard and no marker. Rewriting a shard removes its old marker first, so a marker always
describes the files beside it. Each manifest row carries its item's input fingerprint
(``item_fingerprint``), which lets a rewritten shard reuse the outputs of unchanged items.

A shard with a marker that the current plan does not list is *stale* (its inputs were removed): readers
skip it (``finished``), ``deltaedit store ls`` counts it and ``deltaedit store prune`` deletes it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import webdataset as wds

from infra.runtime.shards import ShardSpec
from infra.storage.fsio import Location
from infra.storage.records import Record, Sink
from infra.storage.tables import (
    STATUS_FAILED,
    STATUS_OK,
    column_to_numpy,
    decode_metadata,
    manifest_table,
    parquet_bytes_to_table,
    table_to_parquet_bytes,
    vector_table,
)
from infra.storage.tarstream import tar_members

TAR, VECTORS, MANIFEST, DONE = ".tar", ".parquet", ".manifest.parquet", ".done.json"
CURRENT = "_current.json"  # the stage's current plan (``StageStore.set_current``)
ITEM_FP = "item_fingerprint"  # manifest column: the input fingerprint of each sample's item


class StageStore:
    """The outputs of one stage of one run."""

    def __init__(self, root: Location, stage: str):
        self.stage = stage
        self.loc = root.child(stage)

    def marker(self, shard_id: str) -> dict[str, Any] | None:
        if not self.loc.exists(shard_id + DONE):
            return None
        return json.loads(self.loc.read_bytes(shard_id + DONE))

    def all_finished(self) -> list[str]:
        """Ids of shards whose done-marker exists, stale ones included."""
        return [n[: -len(DONE)] for n in self.loc.listdir() if n.endswith(DONE)]

    def finished(self) -> list[str]:
        """Ids of finished shards of the current plan (every finished shard if none is recorded)."""
        done = self.all_finished()
        current = self.current()
        return done if current is None else [s for s in done if s in current["shards"]]

    def stale(self) -> list[str]:
        """Finished shards the current plan no longer lists (outputs of removed inputs)."""
        current = self.current()
        if current is None:
            return []
        return [s for s in self.all_finished() if s not in current["shards"]]

    def current(self) -> dict[str, Any] | None:
        """The current plan: ``{"shards": {id: input fingerprint}, "code_fingerprint": ...}``, or None
        when this stage never recorded one."""
        if not self.loc.exists(CURRENT):
            return None
        return json.loads(self.loc.read_bytes(CURRENT))

    def set_current(self, specs: Sequence[ShardSpec], code_fingerprint: str) -> None:
        """Record ``specs`` (the stage's whole plan, not just the shards run now) as current."""
        record = {
            "shards": {s.shard_id: s.fingerprint for s in specs},
            "code_fingerprint": code_fingerprint,
        }
        data = json.dumps(record, indent=0, sort_keys=True).encode()
        if not self.loc.exists(CURRENT) or self.loc.read_bytes(CURRENT) != data:
            self.loc.write_bytes(CURRENT, data)

    def is_current(self, shard_id: str) -> bool:
        """Finished with the inputs and code the current plan lists (True when no plan is recorded)."""
        marker, current = self.marker(shard_id), self.current()
        if marker is None:
            return False
        return current is None or (
            current["shards"].get(shard_id) == marker["input_fingerprint"]
            and current["code_fingerprint"] == marker["code_fingerprint"]
        )

    def prune(self, dry_run: bool = False) -> list[str]:
        """Delete every file of the stale shards (marker first); returns their ids."""
        stale = self.stale()
        if not dry_run:
            for shard_id in stale:
                for suffix in (DONE, MANIFEST, VECTORS, TAR):
                    self.loc.remove(shard_id + suffix)
        return stale

    def assignment(self) -> dict[str, str]:
        """key → shard id over every finished shard (stale ones too; the lowest id wins a duplicate):
        where this stage put each key, for ``plan_shards(previous=...)``."""
        where: dict[str, str] = {}
        for shard_id in sorted(self.all_finished()):
            for key in self.manifest(shard_id).column("key").to_pylist():
                where.setdefault(key, shard_id)
        return where

    def reusable(self, spec: ShardSpec, code_fingerprint: str, redo_failed: bool) -> set[str]:
        """Keys of ``spec`` whose outputs in this shard's finished files came from the same item inputs
        (``item_fingerprint``) and the same code+config; failed ones too unless ``redo_failed``."""
        marker = self.marker(spec.shard_id)
        if marker is None or marker["code_fingerprint"] != code_fingerprint:
            return set()
        table = self.manifest(spec.shard_id)
        if ITEM_FP not in table.column_names:
            return set()
        rows = table.select(["key", "status", ITEM_FP]).to_pylist()
        old = {r["key"]: r[ITEM_FP] for r in rows if r["status"] == STATUS_OK or not redo_failed}
        return {i.key for i in spec.items if old.get(i.key) == i.fingerprint}

    def is_done(self, spec: ShardSpec, code_fingerprint: str) -> bool:
        """Finished with the same inputs and the same code+config."""
        m = self.marker(spec.shard_id)
        return bool(
            m
            and m["input_fingerprint"] == spec.fingerprint
            and m["code_fingerprint"] == code_fingerprint
        )

    def manifest(self, shard_id: str) -> pa.Table:
        return parquet_bytes_to_table(self.loc.read_bytes(shard_id + MANIFEST))

    def vectors(self, shard_id: str) -> pa.Table:
        return parquet_bytes_to_table(self.loc.read_bytes(shard_id + VECTORS))

    def tar_url(self, shard_id: str) -> str:
        return self.loc.url(shard_id + TAR)

    def failed_items(self, spec: ShardSpec) -> ShardSpec:
        """The part of ``spec`` whose samples failed last time (all of it if the shard never finished)."""
        if self.marker(spec.shard_id) is None:
            return spec
        status = dict(
            zip(*(self.manifest(spec.shard_id).column(c).to_pylist() for c in ("key", "status")))
        )
        return ShardSpec(
            spec.shard_id, tuple(i for i in spec.items if status.get(i.key) != STATUS_OK)
        )

    def records(self, shard_id: str) -> Iterator[Record]:
        """Read a finished shard back as records (in stored order), for merging a redo or reusing
        unchanged samples. Streams the tar: one sample's image in memory at a time."""
        rows = self.manifest(shard_id).to_pylist()
        images = self._tar_images(shard_id) if self.loc.exists(shard_id + TAR) else iter(())
        vecs = self._vector_rows(shard_id) if self.loc.exists(shard_id + VECTORS) else {}
        ahead: dict[str, tuple[bytes, str, dict]] = {}
        for row in rows:
            base = {k: row.pop(k) for k in ("key", "source", "status", "error")}
            image = _image_for(base["key"], images, ahead) if base["status"] == STATUS_OK else None
            image = image or (None, None, {})
            yield Record(
                **base,
                image=image[0],
                image_ext=image[1],
                sample_meta=image[2],
                vectors=vecs.get(base["key"], {}),
                fields=row,
            )

    def writer(self, shard_id: str, vector_metadata: dict[str, Any] | None = None) -> "ShardWriter":
        return ShardWriter(self, shard_id, vector_metadata)

    def overwrite(self) -> None:
        """Delete every output of this stage."""
        self.loc.remove_all()

    def _tar_images(self, shard_id: str) -> Iterator[tuple[str, tuple[bytes, str, dict]]]:
        """(key, (image bytes, ext, sample meta)) per sample, in stored order (a sample's members are
        consecutive)."""
        with self.loc.open(shard_id + TAR) as f:
            key, parts = None, {}
            for name, data in tar_members(f):
                k, ext = name.split(".", 1)
                if k != key and parts:
                    yield key, _sample(parts)
                    parts = {}
                key = k
                parts[ext] = data
            if parts:
                yield key, _sample(parts)

    def _vector_rows(self, shard_id: str) -> dict[str, dict[str, np.ndarray]]:
        table = self.vectors(shard_id)
        names = [n for n in table.column_names if n != "key"]
        arrays = {n: column_to_numpy(table, n) for n in names}
        return {
            k: {n: arrays[n][i] for n in names}
            for i, k in enumerate(table.column("key").to_pylist())
        }


def _sample(parts: dict[str, bytes]) -> tuple[bytes, str, dict]:
    meta = json.loads(parts.pop("json", b"{}"))
    ext, data = next(iter(parts.items()))
    return data, ext, meta


def _image_for(
    key: str,
    images: Iterator[tuple[str, tuple[bytes, str, dict]]],
    ahead: dict[str, tuple[bytes, str, dict]],
) -> tuple[bytes, str, dict] | None:
    """The tar sample of ``key``: read on until it comes (samples read past are kept in ``ahead``)."""
    if key in ahead:
        return ahead.pop(key)
    for k, sample in images:
        if k == key:
            return sample
        ahead[k] = sample
    return None


class ShardWriter(Sink):
    """Streams one shard's images into a temporary tar and buffers manifest rows and vectors;
    ``commit`` makes data visible, then the manifest, then the done-marker."""

    def __init__(
        self, store: StageStore, shard_id: str, vector_metadata: dict[str, Any] | None = None
    ):
        self.store, self.shard_id = store, shard_id
        self.vector_metadata = vector_metadata or {}
        self.rows: list[dict[str, Any]] = []
        self.vector_keys: list[str] = []
        self.vector_cols: dict[str, list[np.ndarray]] = {}
        self.reused = 0  # records copied from the shard's previous outputs (``put_reused``)
        self._stack = contextlib.ExitStack()
        self._tar: wds.TarWriter | None = None
        self._started = time.perf_counter()

    def put(self, record: Record) -> None:
        if record.image is not None:
            self._tar_writer().write(
                {
                    "__key__": record.key,
                    record.image_ext: record.image,
                    "json": json.dumps(record.sample_meta, sort_keys=True).encode(),
                }
            )
        if record.vectors and record.status == STATUS_OK:
            self.vector_keys.append(record.key)
            for name, vec in record.vectors.items():
                self.vector_cols.setdefault(name, []).append(vec)
        self.rows.append(record.manifest_row())

    def put_reused(self, record: Record) -> None:
        """A record copied unchanged from this shard's previous outputs (counted apart from seen)."""
        self.reused += 1
        self.put(record)

    def commit(
        self, *, input_fingerprint: str, code_fingerprint: str, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Publish the shard: the old marker goes first (a marker always describes the files beside
        it), then data files, manifest, and the new done-marker last. Returns the marker."""
        loc = self.store.loc
        loc.remove(self.shard_id + DONE)
        if self._tar is not None:
            self._tar.close()
            self._stack.close()  # atomic rename / upload of the tar
        else:
            loc.remove(self.shard_id + TAR)  # a previous version's images
        if self.vector_keys:
            table = vector_table(
                self.vector_keys,
                {n: np.stack(v) for n, v in self.vector_cols.items()},
                self.vector_metadata,
            )
            loc.write_bytes(self.shard_id + VECTORS, table_to_parquet_bytes(table))
        else:
            loc.remove(self.shard_id + VECTORS)
        loc.write_bytes(self.shard_id + MANIFEST, table_to_parquet_bytes(manifest_table(self.rows)))
        marker = self._marker(input_fingerprint, code_fingerprint, extra or {})
        loc.write_bytes(self.shard_id + DONE, json.dumps(marker, indent=1, sort_keys=True).encode())
        return marker

    def abort(self) -> None:
        """Drop everything written so far (temporary files are removed). The tar writer is closed
        first: left open, its finaliser later writes to the closed temporary file (a spurious
        "write to closed file" traceback in the worker's log after a failed shard)."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def _tar_writer(self) -> wds.TarWriter:
        if self._tar is None:
            f = self._stack.enter_context(self.store.loc.atomic_writer(self.shard_id + TAR))
            self._tar = wds.TarWriter(
                f, mtime=0
            )  # fixed mtime: identical inputs give identical bytes
        return self._tar

    def _marker(self, input_fp: str, code_fp: str, extra: dict[str, Any]) -> dict[str, Any]:
        ok = sum(r["status"] == STATUS_OK for r in self.rows)
        failed = sum(r["status"] == STATUS_FAILED for r in self.rows)
        seconds = time.perf_counter() - self._started
        return {
            "stage": self.store.stage,
            "shard_id": self.shard_id,
            "counts": {
                "seen": len(self.rows) - self.reused,
                "ok": ok,
                "failed": failed,
                **({"reused": self.reused} if self.reused else {}),
            },
            "timings": {
                "seconds": round(seconds, 4),
                "samples_per_s": round((len(self.rows) - self.reused) / seconds, 3)
                if seconds > 0
                else None,
            },
            "input_fingerprint": input_fp,
            "code_fingerprint": code_fp,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        }


def vector_metadata(table: pa.Table) -> dict[str, Any]:
    """What produced a vector table (model, preprocessing, normalisation)."""
    return decode_metadata(table)
