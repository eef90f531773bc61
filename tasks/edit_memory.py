"""The image-embedding memory of ``bulk_edit.condition: retrieved`` (``edit_directions.retrieved_direction``).

It holds the CLIP image embeddings the Delta Mapper was trained on — the run's ``clip_samples`` and
``clip_images`` stores (those of ``train_mapper.pools``) — so a retrieved direction is one between images
of the mapper's own training distribution. Only the ``embedding`` column is read, shard by shard; past
``max_rows`` a seeded, evenly spread subset is kept (a 65,536 × 512 float32 memory is 128 MB).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from infra.fsio import Location
from infra.store import StageStore
from infra.tables import column_to_numpy
from tasks.row_cache import read_columns


def memory_shards(root: Location, stages: Sequence[str]) -> list[tuple[StageStore, str]]:
    """(store, shard id) of every finished shard of the memory stages, in a fixed order."""
    stores = [StageStore(root, stage) for stage in stages]
    return [(store, sid) for store in stores for sid in sorted(store.finished())
            if store.loc.exists(f"{sid}.parquet")]


def load_memory(root: Location, stages: Sequence[str], max_rows: int, seed: int = 0) -> Tensor:
    """(P ≤ max_rows, D) unit-norm CLIP image embeddings of the stages' finished shards."""
    shards = memory_shards(root, stages)
    if not shards:
        raise FileNotFoundError(f"bulk_edit.condition=retrieved needs CLIP image embeddings in {root.uri}/"
                           f"{{{','.join(stages)}}}: none finished (run preprocess first, or set "
                           "bulk_edit.condition=text bulk_edit.mask=text)")
    rows = np.concatenate([column_to_numpy(read_columns(store, sid, ["embedding"]), "embedding")
                           for store, sid in shards])
    if len(rows) > max_rows:
        keep = np.sort(np.random.default_rng([seed, 0x3E3]).choice(len(rows), max_rows, replace=False))
        rows = rows[keep]
    return F.normalize(torch.from_numpy(np.ascontiguousarray(rows, np.float32)), dim=1)


def memory_identity(root: Location, stages: Sequence[str]) -> list[Any]:
    """What the memory depends on, for an edit stage's fingerprint: each shard's done-marker identity."""
    return [[store.stage, sid, (m := store.marker(sid) or {}).get("input_fingerprint"),
             m.get("code_fingerprint")] for store, sid in memory_shards(root, stages)]
