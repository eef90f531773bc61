"""Running one stage over one shard, outside any framework: skip, run, or redo failed samples.

A *builder* is a small picklable object that knows how to construct a stage's processor where it runs
(an actor loads its model once, in ``build()``). A processor is ``processor(spec, sink)``: it writes one
record per item of the shard into the sink. ``execute_shard`` is what Ray actors and tests call.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from infra.runtime.shards import ShardSpec
from infra.storage.fsio import Location
from infra.storage.records import MemorySink, Sink
from infra.storage.store import StageStore


class Processor(Protocol):
    output_metadata: dict[str, Any]

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
    failed samples of a finished shard and merge them into it (same sample order as a clean run)."""
    start = time.perf_counter()
    done = store.is_done(spec, code_fp)
    if done and not redo_failed:
        return _report(store, spec, "skipped", start)
    if done:
        todo = store.failed_items(spec)
        if not todo.items:
            return _report(store, spec, "skipped", start)
        _redo(processor, spec, todo, store, code_fp)
        return _report(store, spec, "redone", start)
    writer = store.writer(spec.shard_id, processor.output_metadata)
    try:
        processor(spec, writer)
    except BaseException:
        writer.abort()
        raise
    writer.commit(input_fingerprint=spec.fingerprint, code_fingerprint=code_fp)
    return _report(store, spec, "ran", start)


def _redo(
    processor: Processor, spec: ShardSpec, todo: ShardSpec, store: StageStore, code_fp: str
) -> None:
    fresh = MemorySink()
    processor(todo, fresh)
    new = fresh.by_key()
    writer = store.writer(spec.shard_id, processor.output_metadata)
    try:
        for old in store.records(spec.shard_id):
            writer.put(new.pop(old.key, old))
    except BaseException:
        writer.abort()
        raise
    writer.commit(input_fingerprint=spec.fingerprint, code_fingerprint=code_fp)


def _report(store: StageStore, spec: ShardSpec, outcome: Outcome, start: float) -> ShardReport:
    marker = store.marker(spec.shard_id) or {}
    counts = marker.get("counts", {"seen": 0, "ok": 0, "failed": 0})
    return ShardReport(
        store.stage, spec.shard_id, outcome, counts, round(time.perf_counter() - start, 4)
    )


def open_store(root_uri: str, storage_options: dict[str, Any], stage: str) -> StageStore:
    return StageStore(Location(root_uri, storage_options), stage)
