"""Running one stage over one shard, outside any framework: skip, run, or redo failed samples.

A *builder* is a small picklable object that knows how to construct a stage's processor where it runs
(an actor loads its model once, in ``build()``). A processor is ``processor(spec, sink)``: it writes one
record per item of the shard into the sink. ``execute_shard`` is what Ray actors and tests call.

When a shard must be rewritten (its inputs changed), the outputs of the items whose own fingerprint and
the code+config fingerprint are unchanged are copied from the shard's previous files and the processor
runs only on the others. A processor opts in with ``reuse_items = True`` (its records depend only on
their own items).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from infra.runtime.shards import ShardSpec
from infra.storage.fsio import Location
from infra.storage.records import MemorySink, Record, Sink
from infra.storage.store import ITEM_FP, ShardWriter, StageStore


class Processor(Protocol):
    output_metadata: dict[str, Any]
    # optional ``reuse_items = True``: each record depends only on its own item, so unchanged items'
    # outputs may be copied into a rewritten shard

    def __call__(self, spec: ShardSpec, sink: Sink) -> None: ...


class StageBuilder(Protocol):
    stage: str  # name of the output store

    def build(self) -> Processor: ...

    def fingerprint(self) -> str: ...


def code_fingerprint(*objects: Any, config: Any = None) -> str:
    """Hash of the source of the modules defining ``objects`` plus the JSON of ``config``."""
    h = hashlib.sha256()
    for obj in objects:
        h.update(inspect.getsource(inspect.getmodule(obj)).encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


Outcome = Literal["ran", "redone", "skipped"]


@dataclass
class ShardReport:
    stage: str
    shard_id: str
    outcome: Outcome
    counts: dict[str, int] = field(default_factory=lambda: {"seen": 0, "ok": 0, "failed": 0})
    seconds: float = 0.0
    processed: int = 0  # samples the processor ran on in this call (0 when skipped)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def execute_shard(
    processor: Processor,
    spec: ShardSpec,
    store: StageStore,
    code_fp: str,
    redo_failed: bool = False,
) -> ShardReport:
    """Run ``processor`` on ``spec`` unless its done-marker matches; with ``redo_failed``, rerun only the
    failed samples of a finished shard and merge them into it (same sample order as a clean run).

    A shard whose inputs changed is rewritten: items whose outputs in the shard's previous files have
    the same item fingerprint and code fingerprint are copied (``reused`` in the marker's counts), the
    processor runs on the rest, and records are written in the spec's order."""
    start = time.perf_counter()
    done = store.is_done(spec, code_fp)
    if done and not redo_failed:
        return _report(store, spec, "skipped", start, 0)
    if done:
        todo = store.failed_items(spec)
        if not todo.items:
            return _report(store, spec, "skipped", start, 0)
        _redo(processor, spec, todo, store, code_fp)
        return _report(store, spec, "redone", start, len(todo.items))
    reuse = (
        store.reusable(spec, code_fp, redo_failed)
        if getattr(processor, "reuse_items", False)
        else set()
    )
    todo = ShardSpec(spec.shard_id, tuple(i for i in spec.items if i.key not in reuse))
    writer = store.writer(spec.shard_id, processor.output_metadata)
    try:
        sink = _MergeSink(writer, spec, store.records(spec.shard_id) if reuse else iter(()), reuse)
        if todo.items:
            processor(todo, sink)
        sink.finish()
    except BaseException:
        writer.abort()
        raise
    writer.commit(input_fingerprint=spec.fingerprint, code_fingerprint=code_fp)
    return _report(store, spec, "ran", start, len(todo.items))


class _MergeSink(Sink):
    """Stamps each record with its item's fingerprint and writes the processor's records interleaved
    with the reused ones, in the spec's order (the processor writes its items in that order; a record
    out of order is written where it comes, never twice or lost)."""

    def __init__(
        self, writer: ShardWriter, spec: ShardSpec, old: Iterator[Record], reuse: set[str]
    ) -> None:
        self.writer, self.old, self.ahead = writer, old, {}
        self.fps = {i.key: i.fingerprint for i in spec.items}
        self.pending = [i.key for i in spec.items if i.key in reuse]  # reused keys, in spec order
        self.position = {k: n for n, k in enumerate(self.fps)}
        self.next = 0  # index into pending

    def put(self, record: Record) -> None:
        self._flush(self.position.get(record.key, -1))
        self.writer.put(self._stamped(record))

    def finish(self) -> None:
        self._flush(len(self.position))
        missing = self.pending[self.next :]
        if missing:
            raise RuntimeError(f"reused samples missing from the previous outputs: {missing[:5]}")

    def _flush(self, before: int) -> None:
        """Write the reused records that come before spec position ``before``."""
        while self.next < len(self.pending) and self.position[self.pending[self.next]] < before:
            key = self.pending[self.next]
            record = self.ahead.pop(key, None) or self._read_until(key)
            if record is None:
                return
            self.writer.put_reused(self._stamped(record))
            self.next += 1

    def _read_until(self, key: str) -> Record | None:
        for record in self.old:
            if record.key == key:
                return record
            self.ahead[record.key] = record
        return None

    def _stamped(self, record: Record) -> Record:
        record.fields = {**record.fields, ITEM_FP: self.fps.get(record.key)}
        return record


def _redo(
    processor: Processor, spec: ShardSpec, todo: ShardSpec, store: StageStore, code_fp: str
) -> None:
    fresh = MemorySink()
    processor(todo, fresh)
    new = fresh.by_key()
    fps = {i.key: i.fingerprint for i in spec.items}
    writer = store.writer(spec.shard_id, processor.output_metadata)
    try:
        for old in store.records(spec.shard_id):
            record = new.pop(old.key, old)
            record.fields = {**record.fields, ITEM_FP: fps.get(record.key)}
            writer.put(record)
    except BaseException:
        writer.abort()
        raise
    writer.commit(input_fingerprint=spec.fingerprint, code_fingerprint=code_fp)


def _report(
    store: StageStore, spec: ShardSpec, outcome: Outcome, start: float, processed: int
) -> ShardReport:
    marker = store.marker(spec.shard_id) or {}
    counts = marker.get("counts", {"seen": 0, "ok": 0, "failed": 0})
    return ShardReport(
        store.stage,
        spec.shard_id,
        outcome,
        counts,
        round(time.perf_counter() - start, 4),
        processed,
    )


def open_store(root_uri: str, storage_options: dict[str, Any], stage: str) -> StageStore:
    return StageStore(Location(root_uri, storage_options), stage)
