"""Shared pieces of the benchmarks: a synthetic image store, timing, and the ratio report.

Every benchmark runs our code and a plain baseline side by side in one process and prints ratios
(absolute times on shared machines mean little).
"""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from app.cli import OFFLINE_DEFAULTS  # noqa: E402

if TYPE_CHECKING:
    import torch

for _key, _value in OFFLINE_DEFAULTS.items():  # as the CLI runs: no telemetry, no downloads
    os.environ.setdefault(_key, _value)

from infra.runtime.shards import Item, plan_shards  # noqa: E402
from infra.runtime.stage import execute_shard  # noqa: E402
from infra.storage.fsio import Location  # noqa: E402
from infra.storage.store import StageStore  # noqa: E402

SHARDS = 4  # shards per store: the 2-actor comparison needs several


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
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            buf, format="PNG"
        )
        pngs[f"img_{i:06d}"] = buf.getvalue()
    store = StageStore(Location(str(root)), "images")
    for spec in plan_shards([Item(k, k) for k in pngs], shard_size):
        execute_shard(PngWriter(pngs), spec, store, "bench")
    return store


def stage_runner(processor, upstream: StageStore, tmp: Path, stage: str) -> Callable[[], None]:
    """A callable that runs ``processor`` over every shard of ``upstream`` into a fresh store each call
    (a fresh store, so no shard is skipped as done)."""
    from infra.runtime.upstream import plan_downstream

    specs = plan_downstream(upstream)
    runs = iter(range(10_000))

    def run() -> None:
        out = StageStore(Location(str(tmp / f"{stage}-{next(runs)}")), stage)
        for spec in specs:
            execute_shard(processor, spec, out, "bench")

    return run


def decoded_images(store: StageStore) -> tuple[list[bytes], torch.Tensor]:
    """The stored PNGs and the same images decoded to one (N, 3, H, W) tensor in [-1, 1]."""
    import torch

    from infra.storage.readers import decode_image, iter_image_samples

    pngs = [s["png"] for s in iter_image_samples(store)]
    return pngs, torch.stack([decode_image(p) for p in pngs])


def add_layout_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shard-batches",
        type=int,
        default=4,
        help="batches per shard (default 4: the default configs hold 256-1000 images a shard, "
        "4-16 batches); the stage reads one batch ahead within a shard",
    )
    parser.add_argument(
        "--quick", action="store_true", help="shards of 2 batches, one round (a smoke run)"
    )


def layout(args: argparse.Namespace) -> tuple[int, int]:
    """(batches per shard, timing rounds) from ``add_layout_args``' options."""
    return (2, 1) if args.quick else (args.shard_batches, 3)


def stage_ratios(
    make_processor: Callable[[StageStore], object],
    forward: Callable[[torch.Tensor], object],
    tmp: Path,
    size: int,
    batch_size: int,
    shard_batches: int,
    stage: str,
    repeat: int = 3,
) -> list[tuple[str, float, float | None]]:
    """A stage against its bare forward on pre-decoded tensors (same batches) and a one-image-at-a-time
    loop over the encoded images, on SHARDS shards of ``shard_batches`` batches. For reference: the stage on
    shards of one batch, where reading ahead has nothing to overlap, and the bare forward batched vs one
    image at a time on the decoded tensors: what batching alone gains on this machine, the ceiling of the
    naive-loop ratio short of decoding. The images stay in the run root ``tmp/src`` (for the actor
    comparison)."""
    from infra.storage.readers import decode_image

    n = SHARDS * shard_batches * batch_size
    store = image_store(tmp / "src", n, size, shard_size=shard_batches * batch_size)
    one_batch = image_store(
        tmp / "src-one-batch", n, size, shard_size=batch_size
    )  # the same images
    pngs, tensors = decoded_images(store)
    batches = tensors.split(batch_size)
    t = best_of_each(
        {  # in turn, so a change in the machine's load hits all alike
            "stage": stage_runner(make_processor(store), store, tmp / "out", stage),
            "stage_one_batch": stage_runner(
                make_processor(one_batch), one_batch, tmp / "out-one-batch", stage
            ),
            "bare": lambda: [forward(b) for b in batches],
            "naive": lambda: [forward(decode_image(p)[None]) for p in pngs],
            "bare_one": lambda: [forward(x[None]) for x in tensors],
        },
        repeat,
    )
    return [
        ("stage vs bare forward on decoded tensors", t["bare"] / t["stage"], 0.85),
        (
            "  same, shards of one batch (nothing to read ahead)",
            t["bare"] / t["stage_one_batch"],
            None,
        ),
        ("stage vs naive one-image-at-a-time loop", t["naive"] / t["stage"], 2.0),
        (
            f"  bare forward, batch {batch_size} vs batch 1 (batching's own gain)",
            t["bare_one"] / t["bare"],
            None,
        ),
    ]


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


def report(title: str, rows: list[tuple[str, float, float | None]]) -> bool:
    """Print ``name: ratio (target)`` lines (target None: for reference); returns whether every ratio with
    a target met it."""
    print(f"\n== {title}")
    ok = True
    for name, ratio, target in rows:
        met = target is None or ratio >= target
        ok &= met
        note = (
            "(for reference)"
            if target is None
            else f"(target >= {target}x)  {'ok' if met else 'BELOW TARGET'}"
        )
        print(f"  {name:58s} {ratio:6.2f}x  {note}")
    return ok
