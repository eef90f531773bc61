"""Shared pieces of the benchmarks: a synthetic image store, timing, and the ratio report.

Every benchmark runs our code and a plain baseline side by side in one process and prints ratios
(absolute times on shared machines mean little).
"""
from __future__ import annotations

import io
import time
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from infra.cli import OFFLINE_DEFAULTS  # noqa: E402

for _key, _value in OFFLINE_DEFAULTS.items():     # as the CLI runs: no telemetry, no downloads
    os.environ.setdefault(_key, _value)

from infra.fsio import Location  # noqa: E402
from infra.shards import Item, plan_shards  # noqa: E402
from infra.stage import execute_shard  # noqa: E402
from infra.store import StageStore  # noqa: E402


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


def stage_runner(processor, upstream: StageStore, tmp: Path, stage: str) -> Callable[[], None]:
    """A callable that runs ``processor`` over every shard of ``upstream`` into a fresh store each call
    (a fresh store, so no shard is skipped as done)."""
    from infra.upstream import plan_downstream

    specs = plan_downstream(upstream)
    runs = iter(range(10_000))

    def run() -> None:
        out = StageStore(Location(str(tmp / f"{stage}-{next(runs)}")), stage)
        for spec in specs:
            execute_shard(processor, spec, out, "bench")
    return run


def decoded_images(store: StageStore) -> tuple[list[bytes], "torch.Tensor"]:
    """The stored PNGs and the same images decoded to one (N, 3, H, W) tensor in [-1, 1]."""
    import torch

    from infra.readers import decode_image, iter_image_samples

    pngs = [s["png"] for s in iter_image_samples(store)]
    return pngs, torch.stack([decode_image(p) for p in pngs])


def best_of_each(fns: dict[str, Callable[[], object]], repeat: int = 3) -> dict[str, float]:
    """Fastest wall time of each callable over ``repeat`` rounds that run them in turn, so a change in
    the machine's other load hits every side alike."""
    times = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - start)
    return times


def report(title: str, rows: list[tuple[str, float, float]]) -> bool:
    """Print ``name: ratio (target)`` lines; returns whether every ratio met its target."""
    print(f"\n== {title}")
    ok = True
    for name, ratio, target in rows:
        flag = "ok" if ratio >= target else "BELOW TARGET"
        ok &= ratio >= target
        print(f"  {name:58s} {ratio:6.2f}x  (target >= {target}x)  {flag}")
    return ok
