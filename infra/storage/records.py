"""One sample's output as it travels from a stage to a store, and the sinks a stage writes into.

A stage only calls ``sink.add`` or ``sink.add_failure``; whether the records stream into a
shard on disk or S3 (``infra.storage.store.ShardWriter``) or stay in memory (``MemorySink``, used to redo
failed samples and in tests) is the caller's choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infra.storage.tables import STATUS_FAILED, STATUS_OK


@dataclass
class Record:
    key: str
    source: str
    status: str = STATUS_OK
    error: str | None = None
    image: bytes | None = None  # encoded image (png/jpg/webp)
    image_ext: str | None = None
    sample_meta: dict[str, Any] = field(default_factory=dict)  # stored beside the image as .json
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (D,) float32
    fields: dict[str, Any] = field(default_factory=dict)  # extra manifest columns

    def manifest_row(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "source": self.source,
            "status": self.status,
            "error": self.error,
            **self.fields,
        }


class Sink:
    """What a stage writes into. Subclasses implement ``put``."""

    def put(self, record: Record) -> None:
        raise NotImplementedError

    def add(
        self,
        key: str,
        source: str,
        *,
        image: bytes | None = None,
        image_ext: str | None = None,
        sample_meta: dict[str, Any] | None = None,
        vectors: dict[str, np.ndarray] | None = None,
        **fields: Any,
    ) -> None:
        """One successful sample: an encoded image and/or named vectors, plus extra manifest fields."""
        vecs = {k: np.asarray(v, np.float32).reshape(-1) for k, v in (vectors or {}).items()}
        self.put(
            Record(
                key,
                source,
                image=image,
                image_ext=image_ext,
                sample_meta=sample_meta or {},
                vectors=vecs,
                fields=fields,
            )
        )

    def add_failure(self, key: str, source: str, error: str, **fields: Any) -> None:
        self.put(Record(key, source, status=STATUS_FAILED, error=error, fields=fields))


class MemorySink(Sink):
    def __init__(self) -> None:
        self.records: list[Record] = []

    def put(self, record: Record) -> None:
        self.records.append(record)

    def by_key(self) -> dict[str, Record]:
        return {r.key: r for r in self.records}
