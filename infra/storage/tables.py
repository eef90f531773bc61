"""Arrow schemas and Parquet helpers: per-shard manifests and vector tables.

Vectors are ``fixed_size_list<float32>`` columns; the table's metadata records what produced them
(model name, preprocessing, normalisation), so a reader never has to guess.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

STATUS_OK, STATUS_FAILED = "ok", "failed"

# Every manifest starts with these columns; stages may add more (sizes, scores, timings).
MANIFEST_BASE = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)


def manifest_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """A manifest from row dicts; base columns first, extra columns (in first-seen order) after."""
    extra: list[str] = []
    for row in rows:
        extra += [k for k in row if k not in MANIFEST_BASE.names and k not in extra]
    columns = {name: [r.get(name) for r in rows] for name in MANIFEST_BASE.names + extra}
    base = {f.name: pa.array(columns[f.name], type=f.type) for f in MANIFEST_BASE}
    return pa.table({**base, **{k: pa.array(columns[k]) for k in extra}})


def vector_table(
    keys: Sequence[str],
    vectors: Mapping[str, np.ndarray],
    metadata: Mapping[str, Any] | None = None,
) -> pa.Table:
    """A table with ``key`` and one fixed_size_list<float32> column per named (N, D) array."""
    cols: dict[str, pa.Array] = {"key": pa.array(list(keys), type=pa.string())}
    for name, arr in vectors.items():
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] != len(keys):
            raise ValueError(f"vector column '{name}': expected ({len(keys)}, D), got {arr.shape}")
        flat = pa.array(arr.reshape(-1), type=pa.float32())
        cols[name] = pa.FixedSizeListArray.from_arrays(flat, arr.shape[1])
    table = pa.table(cols)
    return table.replace_schema_metadata(encode_metadata(metadata or {}))


def column_to_numpy(table: pa.Table, name: str) -> np.ndarray:
    """A fixed_size_list<float32> column as an (N, D) array, without a per-row Python loop."""
    col = table.column(name).combine_chunks()
    width = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, width)


def encode_metadata(meta: Mapping[str, Any]) -> dict[bytes, bytes]:
    return {b"deltaedit": json.dumps(dict(meta), sort_keys=True, default=str).encode()}


def decode_metadata(table_or_schema: pa.Table | pa.Schema) -> dict[str, Any]:
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    raw = (schema.metadata or {}).get(b"deltaedit")
    return json.loads(raw) if raw else {}


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def parquet_bytes_to_table(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))
