"""Incremental preprocessing (issue 25): a catalog grows by 10 %; how many samples does each stage redo?
                                                                                          → ≤ 15 %

OURS: the preprocess stages as the flow plans them (``flows.stages.catalog_plan``: files already ingested
keep their shard, new files go to new shards; downstream shards follow their upstream shard; per-item
reuse when a shard is rewritten), run shard by shard in this process with the toy models (zoo/toy):
ingest → invert (e4e) and embed (CLIP). The figure is the samples each stage processed on the second
run over the samples in the grown catalog.
BASELINE, the planning the stages had before: contiguous ranges of the sorted keys
(``plan_shards`` without the earlier assignment) and a shard redone whole when its inputs changed. It
is counted from the two plans (the samples in shards whose input fingerprint changed), not run.

The new files are spread through the sorted order (every 11th name of the grown catalog), as a nightly
crawl's would be. Run: .venv/bin/python bench/incremental_bench.py [--images N] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (offline defaults, as the CLI runs)

from flows.stages import catalog_plan  # noqa: E402
from infra.config import RunConfig, load_config  # noqa: E402
from infra.runtime.shards import ShardSpec, plan_shards  # noqa: E402
from infra.runtime.stage import StageBuilder, execute_shard, open_store  # noqa: E402
from infra.runtime.upstream import plan_downstream  # noqa: E402
from infra.storage.catalog import list_catalog  # noqa: E402
from models.toy.catalog import render_catalog  # noqa: E402
from tasks.embed import EmbedBuilder  # noqa: E402
from tasks.ingest import IngestBuilder  # noqa: E402
from tasks.invert import InvertBuilder  # noqa: E402
from tasks.layout import CODES, IMAGES, clip_stage  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
TARGET = 0.15  # at most this fraction of the grown catalog re-processed per stage
NEW_EVERY = 11  # every 11th file of the grown catalog is new: 1 in 11 ≈ 10 % more files


def run_stage_here(builder: StageBuilder, plan: list[ShardSpec], root: str) -> int:
    """One stage over its plan in this process (as ``run_stage`` does on actors); samples processed."""
    store = open_store(root, {}, builder.stage)
    code_fp = builder.fingerprint()
    store.set_current(plan, code_fp)
    processor = builder.build()
    return sum(execute_shard(processor, spec, store, code_fp).processed for spec in plan)


def preprocess(cfg: RunConfig, source: str) -> dict[str, int]:
    """ingest → invert, embed of ``source``; samples processed per stage."""
    processed = {
        IMAGES: run_stage_here(
            IngestBuilder.from_config(cfg), catalog_plan(cfg, source, IMAGES, False), cfg.root
        )
    }
    images = open_store(cfg.root, {}, IMAGES)
    processed[CODES] = run_stage_here(
        InvertBuilder.from_config(cfg), plan_downstream(images), cfg.root
    )
    processed[clip_stage(IMAGES)] = run_stage_here(
        EmbedBuilder.from_config(cfg, IMAGES), plan_downstream(images), cfg.root
    )
    return processed


def contiguous_redone(before: list, after: list, shard_size: int) -> int:
    """Samples the old contiguous planning would redo: those in shards whose inputs changed."""
    old = {s.shard_id: s.fingerprint for s in plan_shards(before, shard_size)}
    return sum(
        len(s.items) for s in plan_shards(after, shard_size) if old.get(s.shard_id) != s.fingerprint
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images", type=int, default=1000, help="files in the catalog before it grows"
    )
    parser.add_argument("--quick", action="store_true", help="200 files (a smoke run)")
    args = parser.parse_args()
    n_old = 200 if args.quick else args.images
    n_all = n_old * NEW_EVERY // (NEW_EVERY - 1)
    work = Path(tempfile.mkdtemp(prefix="incremental-bench-"))
    rendered, catalog = work / "rendered", work / "catalog"
    render_catalog(str(rendered), n_all, seed=0)
    files = sorted(p for p in rendered.glob("toy_*.png"))
    new = [f for i, f in enumerate(files) if i % NEW_EVERY == NEW_EVERY // 2]
    catalog.mkdir()
    for f in files:
        if f not in new:
            (catalog / f.name).symlink_to(f)
    cfg = load_config(CONFIG, [f"root={work / 'run'}", f"ingest.source={catalog}", "device=cpu"])
    print(
        f"catalog of {len(files) - len(new)} toy images grows by {len(new)} (every {NEW_EVERY}th name); "
        f"ingest shards of {cfg.ingest.shard_size}"
    )
    before = list_catalog(str(catalog), {})
    first = preprocess(cfg, str(catalog))
    for f in new:
        (catalog / f.name).symlink_to(f)
    after = list_catalog(str(catalog), {})
    second = preprocess(cfg, str(catalog))
    baseline = contiguous_redone(before, after, cfg.ingest.shard_size)
    total = len(after)
    print(f"\n== samples re-processed after the catalog grew, of {total} (target <= {TARGET:.0%})")
    ok = True
    for stage, done in second.items():
        met = done / total <= TARGET
        ok &= met
        print(
            f"  {stage:12s} first run {first[stage]:5d}; second run ours {done:5d} ({done / total:6.1%}), "
            f"contiguous planning {baseline:5d} ({baseline / total:6.1%}); "
            f"ours / contiguous {done / max(baseline, 1):5.2f}x  {'ok' if met else 'ABOVE TARGET'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
