"""Shards of a stage that reads another stage's shards: one downstream shard per current upstream shard.

A downstream shard keeps its upstream shard's id and lists its ok samples. Each item's lineage is its
upstream sample's item fingerprint and the upstream code fingerprint, so a rewritten upstream shard
changes only the downstream items whose inputs changed (the others are reused, ``infra.runtime.stage``).
Only upstream shards that are finished for the upstream stage's current plan are planned: outputs of
removed inputs (stale shards) and shards not yet rewritten for the current plan are never fed on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from infra.runtime.prefetch import prefetch
from infra.runtime.shards import Item, ShardSpec
from infra.storage.readers import encoded_batches, iter_image_samples
from infra.storage.store import ITEM_FP, StageStore
from infra.storage.tables import STATUS_OK


def plan_downstream(
    upstream: StageStore, shard_ids: Sequence[str] | None = None
) -> list[ShardSpec]:
    specs = []
    for shard_id in sorted(shard_ids if shard_ids is not None else upstream.finished()):
        if not upstream.is_current(shard_id):
            continue
        marker = upstream.marker(shard_id)
        table = upstream.manifest(shard_id)
        columns = ["key", "status"] + ([ITEM_FP] if ITEM_FP in table.column_names else [])
        code_fp = marker["code_fingerprint"]
        items = tuple(
            Item(
                r["key"],
                f"{upstream.stage}/{shard_id}",
                {
                    "upstream": f"{upstream.stage}/"
                    f"{r.get(ITEM_FP) or marker['input_fingerprint']}/{code_fp}"
                },
            )
            for r in table.select(columns).to_pylist()
            if r["status"] == STATUS_OK
        )
        specs.append(ShardSpec(shard_id, items))
    return specs


def spec_batches(
    upstream: StageStore, spec: ShardSpec, batch_size: int
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(keys, images in [-1, 1]) batches of the spec's samples, read from the upstream image shard.

    Only the keys the spec lists are decoded and returned (a redo lists only the failed ones). The next
    batch is read and decoded in a background thread while the caller's model runs on this one.
    """
    wanted = {i.key for i in spec.items}
    samples = (s for s in iter_image_samples(upstream, [spec.shard_id]) if s["__key__"] in wanted)
    return prefetch(encoded_batches(samples, batch_size))
