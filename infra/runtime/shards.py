"""Deterministic sharding: the same input listing always maps to the same shards and keys.

Shard ids (``00000``, ``00001``, ...) come from the sorted listing, not from write order, so a rerun
— or a resumed run — sends every input to the shard it went to before.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


@dataclass(frozen=True)
class Item:
    """One input sample: a stable key (no dots) and where it comes from."""

    key: str
    source: str
    meta: dict = field(
        default_factory=dict, hash=False, compare=False
    )  # e.g. size/etag for fingerprints

    @property
    def fingerprint(self) -> str:
        """Hash of this item's inputs (key, source, metadata): recorded per sample in the manifest, so a
        rewritten shard can reuse the outputs of the items that did not change."""
        return _digest([self.key, self.source, self.meta])


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work for a stage: a shard id and its items."""

    shard_id: str
    items: tuple[Item, ...]

    @property
    def fingerprint(self) -> str:
        """Hash of the shard's inputs: keys, sources and their metadata (sizes, etags)."""
        return _digest([[i.key, i.source, i.meta] for i in self.items])

    def to_dict(self) -> dict:
        return {"shard_id": self.shard_id, "items": [asdict(i) for i in self.items]}

    @classmethod
    def from_dict(cls, data: dict) -> "ShardSpec":
        return cls(data["shard_id"], tuple(Item(**i) for i in data["items"]))


def plan_shards(
    items: Iterable[Item], shard_size: int, previous: Mapping[str, str] | None = None
) -> list[ShardSpec]:
    """Sort items by key and cut them into shards of ``shard_size``; keys must be unique.

    ``previous``: where a stage put each key before (key → shard id, from its finished shards'
    manifests, ``StageStore.assignment``). A key found there stays in its shard; the keys that are not
    (sorted) are cut into new shards of ``shard_size``, numbered from the lowest ids no finished shard
    holds. So new inputs never move old ones, and a rerun after a crash plans the same shards (the
    remaining new keys are whole chunks of the same cut). Without ``previous``: contiguous ranges.
    """
    ordered = sorted(items, key=lambda i: i.key)
    seen: set[str] = set()
    for item in ordered:
        if item.key in seen:
            raise ValueError(f"duplicate sample key '{item.key}' (source {item.source})")
        seen.add(item.key)
    by_key = {i.key: i for i in ordered}
    groups = assign([i.key for i in ordered], shard_size, previous or {})
    return [ShardSpec(sid, tuple(by_key[k] for k in keys)) for sid, keys in sorted(groups.items())]


def assign(
    keys: Sequence[str],
    size: int,
    previous: Mapping[str, str],
    shard_id: Callable[[int], str] = "{:05d}".format,
) -> dict[str, list[str]]:
    """Group ``keys`` (in their order) into shards: a key of ``previous`` stays in its shard, the
    others are cut into chunks of ``size`` given the lowest ids ``shard_id(0), shard_id(1), ...`` that
    no previous shard holds (see ``plan_shards``)."""
    groups: dict[str, list[str]] = {}
    new = []
    for key in keys:
        if key in previous:
            groups.setdefault(previous[key], []).append(key)
        else:
            new.append(key)
    taken = set(previous.values())
    free = (sid for sid in map(shard_id, itertools.count()) if sid not in taken)
    for start in range(0, len(new), size):
        groups[next(free)] = new[start : start + size]
    return groups


def key_for(source: str, root: str = "") -> str:
    """A stable, dot-free, ASCII sample key for a source path: readable stem + short hash of the full path.

    A dot would split a WebDataset key; the hash keeps keys unique when two sources share a stem
    (``a/cat.png`` and ``b/cat.png``, or ``cat.png`` and ``cat.jpg``).
    """
    rel = source[len(root) :].lstrip("/") if root and source.startswith(root) else source
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_stem).strip("_")[-48:] or "x"
    digest = hashlib.sha1(rel.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slug}_{digest}"


def select(shards: Sequence[ShardSpec], wanted: Sequence[str] | None) -> list[ShardSpec]:
    """Only the shards whose ids are in ``wanted`` (all when None); unknown ids are an error."""
    if not wanted:
        return list(shards)
    ids = {s.shard_id for s in shards}
    unknown = sorted(set(wanted) - ids)
    if unknown:
        raise ValueError(f"unknown shard ids {unknown}; this run has {len(shards)} shards")
    return [s for s in shards if s.shard_id in set(wanted)]
