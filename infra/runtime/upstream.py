"""Shards of a stage that reads another stage's shards: one downstream shard per finished upstream shard.

A downstream shard keeps its upstream shard's id and lists its ok samples; its input fingerprint
covers the upstream shard's fingerprints, so redoing an upstream shard re-runs the downstream one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from infra.runtime.prefetch import prefetch
from infra.runtime.shards import Item, ShardSpec
from infra.storage.readers import encoded_batches, iter_image_samples
from infra.storage.store import StageStore
from infra.storage.tables import STATUS_OK


def plan_downstream(
    upstream: StageStore, shard_ids: Sequence[str] | None = None
) -> list[ShardSpec]:
    specs = []
    for shard_id in sorted(shard_ids if shard_ids is not None else upstream.finished()):
        marker = upstream.marker(shard_id)
        if marker is None:
            continue
        lineage = {
            "upstream": f"{upstream.stage}/{marker['input_fingerprint']}/{marker['code_fingerprint']}"
        }
        rows = upstream.manifest(shard_id).select(["key", "status"]).to_pylist()
        items = tuple(
            Item(r["key"], f"{upstream.stage}/{shard_id}", lineage)
            for r in rows
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
