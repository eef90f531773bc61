"""Delta Mapper training data path (issue: mapper training, memory-bounded). Two ratios, one process each:

1. throughput: ``tasks.train.mapper.fit`` (row cache → pread pairs → step, prefetch thread) against a plain
   loop with the same model, batch and optimiser on in-memory tensors                    → ≥ 0.9
2. peak RSS at N samples: our loader (cache build, then pair batches) against the in-memory approach
   (read every shard into one tensor, as the official loader does), each in its own subprocess.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/mapper_bench.py [--quick] [--rows 50000] [--layout small|256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infra.config import load_config  # noqa: E402
from infra.storage.fsio import Location  # noqa: E402
from infra.storage.readers import read_vectors, vectors_tensor  # noqa: E402
from infra.storage.store import StageStore  # noqa: E402
from infra.storage.tables import table_to_parquet_bytes, vector_table  # noqa: E402
from models.layout import StyleLayout  # noqa: E402
from tasks.train.mapper import build_model, fit, mapper_config, mapper_inputs, pair_loss  # noqa: E402
from tasks.train.mapper_data import POOLS, build_row_cache  # noqa: E402

LAYOUTS = {
    "small": (32, {4: 256, 8: 256, 16: 128, 32: 64}, 64),  # 1344 style channels, CLIP 64
    "256": (256, None, 512),
}  # 5760 style channels, CLIP 512


def write_store(root: Path, rows: int, layout: str, shard_size: int = 1000) -> None:
    """Synthetic codes/clip_images and samples/clip_samples stores (half the rows each), shard by shard."""
    size, channels, clip_dim = LAYOUTS[layout]
    lay = StyleLayout.for_generator(size, channels=channels)
    rng = np.random.default_rng(0)
    for pool, (codes, clip) in POOLS.items():
        for lo in range(0, rows // 2, shard_size):
            sid = f"{lo // shard_size:05d}"
            keys = [f"{pool}_{i:07d}" for i in range(lo, min(rows // 2, lo + shard_size))]
            s = rng.normal(size=(len(keys), lay.conv_total)).astype(np.float32)
            e = rng.normal(size=(len(keys), clip_dim)).astype(np.float32)
            for stage, cols, meta in (
                (codes, {"s": s}, {"layout": lay.to_dict()}),
                (clip, {"embedding": e}, {}),
            ):
                loc = StageStore(Location(str(root)), stage).loc
                loc.write_bytes(
                    f"{sid}.parquet", table_to_parquet_bytes(vector_table(keys, cols, meta))
                )
                loc.write_bytes(
                    f"{sid}.done.json", json.dumps({"counts": {"ok": len(keys)}}).encode()
                )


def plain_loop(
    model: torch.nn.Module, s: torch.Tensor, e: torch.Tensor, steps: int, batch: int
) -> float:
    """Steps/s of the same training step on in-memory tensors with random pairs."""
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    began = time.perf_counter()
    for _ in range(steps):
        a, b = (
            torch.randint(0, len(s), (batch,), generator=g),
            torch.randint(0, len(s), (batch,), generator=g),
        )
        loss, _ = pair_loss(model(*mapper_inputs("delta", s[a], e[a], e[b])), s[b] - s[a])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - began)


def throughput(root: Path, steps: int, batch: int) -> tuple[float, float]:
    cache = build_row_cache(Location(str(root)), root / "cache", val_fraction=0.0)
    tm = load_config(
        None,
        [
            f"train_mapper.steps={steps}",
            f"train_mapper.batch_size={batch}",
            "train_mapper.val_fraction=0",
            f"train_mapper.checkpoint_every={10**9}",
        ],
    ).train_mapper
    rows = cache.fetch(np.arange(min(len(cache), 4096)))
    ours, plain = [], []
    for trial in range(2):  # interleaved, best of two
        out = Location(str(root / f"out{trial}"))
        out.remove_all()
        ours.append(fit(tm, 0, cache, out, log=lambda _: None)["steps_per_s"])
        plain.append(plain_loop(build_model("delta", mapper_config(cache), 0), *rows, steps, batch))
    return max(ours), max(plain)


def child(mode: str, root: Path, batches: int) -> None:
    """One approach alone in this process; prints its peak RSS (MB) after ``batches`` pair batches."""
    StageStore(Location(str(root)), "codes").vectors(
        "00000"
    )  # warm up Arrow/Parquet for both modes
    base = _reset_peak()
    rng = np.random.default_rng(0)
    if mode == "ours":
        cache = build_row_cache(Location(str(root)), root / "cache_rss", val_fraction=0.01)
        built = _peak()
        for _ in range(batches):
            (
                cache.fetch(rng.integers(0, len(cache), 64)),
                cache.fetch(rng.integers(0, len(cache), 64)),
            )
    else:

        def load(stage: str, column: str) -> torch.Tensor:
            return vectors_tensor(read_vectors(StageStore(Location(str(root)), stage)), column)

        s = torch.cat([load(c, "s") for c, _ in POOLS.values()])  # (N, S) all in RAM
        e = torch.cat([load(c, "embedding") for _, c in POOLS.values()])  # (N, D)
        built = _peak()
        for _ in range(batches):
            a, b = rng.integers(0, len(s), 64), rng.integers(0, len(s), 64)
            s[a], e[a], s[b], e[b]
    print(json.dumps({"base_mb": base, "after_load_mb": built, "peak_mb": _peak()}))


def _peak() -> float:
    """Peak resident set (MB) since the last reset: VmHWM from /proc (Linux), else ru_maxrss."""
    try:
        line = next(
            row
            for row in Path("/proc/self/status").read_text().splitlines()
            if row.startswith("VmHWM")
        )
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> float:
    """Forget the peak of the imports (Linux: clear_refs 5 resets VmHWM); returns the RSS now (MB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _peak()


def rss(root: Path, mode: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--root", str(root)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="small")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--child", choices=["ours", "memory"])
    p.add_argument("--root")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.child:
        return child(args.child, Path(args.root), 200)
    rows, steps = (4000, 15) if args.quick else (args.rows, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        t0 = time.perf_counter()
        write_store(root, rows, args.layout)
        print(
            f"synthetic store: {rows} rows, layout {args.layout}, written in {time.perf_counter() - t0:.1f} s"
        )
        ours, plain = throughput(root, steps, 64)
        print(
            f"1. throughput  flow data path + step {ours:.2f} it/s vs in-memory loop {plain:.2f} it/s "
            f"→ ratio {ours / plain:.2f} (target ≥ 0.9)"
        )
        mine, theirs = rss(root, "ours"), rss(root, "memory")
        ours_mb, theirs_mb = (r["peak_mb"] - r["base_mb"] for r in (mine, theirs))
        print(
            f"2. peak RSS at {rows} rows: our loader {mine['peak_mb']:.0f} MB (baseline {mine['base_mb']:.0f}) "
            f"vs in-memory {theirs['peak_mb']:.0f} MB (baseline {theirs['base_mb']:.0f}) → above baseline "
            f"{ours_mb:.0f} vs {theirs_mb:.0f} MB, ratio {theirs_mb / max(ours_mb, 1):.1f}×"
        )


if __name__ == "__main__":
    main()
