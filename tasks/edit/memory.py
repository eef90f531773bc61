"""The image-embedding memory of ``bulk_edit.condition: retrieved`` (``edit_directions.retrieved_direction``).

It holds the CLIP image embeddings the Delta Mapper was trained on — the run's ``clip_samples`` and
``clip_images`` stores (those of ``train_mapper.pools``) — so a retrieved direction is one between images
of the mapper's own training distribution: the catalog's eval part (``split.eval_fraction``,
``tasks.split``), which the mapper never saw and bulk-edit edits, is left out, so an edited image never
retrieves itself or another test image. Only the ``key`` and ``embedding`` columns are read, shard by
shard; past ``max_rows`` a seeded, evenly spread subset is kept (a 65,536 × 512 float32 memory is 128 MB).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from infra.storage.fsio import Location
from infra.storage.store import StageStore
from infra.storage.tables import column_to_numpy
from tasks.layout import CLIP_IMAGES
from tasks.split import in_eval
from tasks.train.row_cache import read_columns


def memory_shards(root: Location, stages: Sequence[str]) -> list[tuple[StageStore, str]]:
    """(store, shard id) of every finished shard of the memory stages, in a fixed order."""
    stores = [StageStore(root, stage) for stage in stages]
    return [
        (store, sid)
        for store in stores
        for sid in sorted(store.finished())
        if store.loc.exists(f"{sid}.parquet")
    ]


def load_memory(
    root: Location,
    stages: Sequence[str],
    retrieve_k: int,
    max_rows: int,
    seed: int = 0,
    eval_fraction: float = 0.0,
) -> Tensor:
    """(P ≤ max_rows, D) unit-norm CLIP image embeddings of the stages' finished shards, the catalog's
    eval part left out; no more rows than ``retrieve_k`` (it averages that many, besides the image's
    own) is an error that says so."""
    shards = memory_shards(root, stages)
    rows = (
        np.concatenate([_training_rows(store, sid, eval_fraction) for store, sid in shards])
        if shards
        else np.zeros((0, 0), np.float32)
    )
    if len(rows) <= retrieve_k:
        raise ValueError(
            f"bulk_edit.retrieve_k={retrieve_k} needs more than that many CLIP image embeddings in "
            f"{', '.join(stages)} under {root.uri}; found {len(rows)} (run preprocess, lower "
            "retrieve_k, or set bulk_edit.condition=text bulk_edit.mask=text)"
        )
    if len(rows) > max_rows:
        keep = np.sort(
            np.random.default_rng([seed, 0x3E3]).choice(len(rows), max_rows, replace=False)
        )
        rows = rows[keep]
    return F.normalize(torch.from_numpy(np.ascontiguousarray(rows, np.float32)), dim=1)


def _training_rows(store: StageStore, shard_id: str, eval_fraction: float) -> np.ndarray:
    """One shard's embeddings, without the catalog's eval part (generator samples are all training)."""
    table = read_columns(store, shard_id, ["key", "embedding"])
    rows = column_to_numpy(table, "embedding")
    if store.stage != CLIP_IMAGES or eval_fraction <= 0:
        return rows
    train = [not in_eval(k, eval_fraction) for k in table.column("key").to_pylist()]
    return rows[np.asarray(train, bool)]


def memory_identity(root: Location, stages: Sequence[str]) -> list[Any]:
    """What the memory depends on, for an edit stage's fingerprint: each shard's done-marker identity."""
    return [
        [
            store.stage,
            sid,
            (m := store.marker(sid) or {}).get("input_fingerprint"),
            m.get("code_fingerprint"),
        ]
        for store, sid in memory_shards(root, stages)
    ]
