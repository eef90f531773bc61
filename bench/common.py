"""Shared pieces of the benchmarks: a synthetic image store, timing, and the ratio report.

Every benchmark runs our code and a plain baseline side by side in one process and prints ratios
(absolute times on shared machines mean little).
"""
from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from infra.fsio import Location
from infra.shards import Item, plan_shards
from infra.stage import execute_shard
from infra.store import StageStore


class PngWriter:
    """A trivial processor that stores given PNGs: builds the upstream image store for a benchmark."""
    output_metadata: dict = {}

    def __init__(self, pngs: dict[str, bytes]):
        self.pngs = pngs

    def __call__(self, spec, sink) -> None:
        for item in spec.items:
            sink.add(item.key, item.source, image=self.pngs[item.key], image_ext="png")


def image_store(root: Path, n: int, size: int, shard_size: int, seed: int = 0) -> StageStore:
    """An images store of n random size×size PNGs in shards of shard_size."""
    rng = np.random.default_rng(seed)
    pngs = {}
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        pngs[f"img_{i:06d}"] = buf.getvalue()
    store = StageStore(Location(str(root)), "images")
    for spec in plan_shards([Item(k, k) for k in pngs], shard_size):
        execute_shard(PngWriter(pngs), spec, store, "bench")
    return store


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """Fastest wall time of ``repeat`` runs (the least disturbed by other load)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def report(title: str, rows: list[tuple[str, float, float]]) -> bool:
    """Print ``name: ratio (target)`` lines; returns whether every ratio met its target."""
    print(f"\n== {title}")
    ok = True
    for name, ratio, target in rows:
        flag = "ok" if ratio >= target else "BELOW TARGET"
        ok &= ratio >= target
        print(f"  {name:58s} {ratio:6.2f}x  (target >= {target}x)  {flag}")
    return ok
