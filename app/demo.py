"""`deltaedit demo` / `make demo`: the pipeline on the embedded toy domain, offline, in minutes.

It renders a small toy catalog (as a user's own image folder would be), then runs the pipeline with the
committed toy models — preprocess (ingest, invert, sample, embed), relevance, train-mapper (the Delta
Mapper and the straightforward baseline), bulk-edit (configs/prompts/toy.yaml with DeltaEdit and both
baselines, decoded by the generator and, for DeltaEdit on a quarter of the images, by the committed
diffusion decoder, plain and mask-guided), `analyze edits` (where an edit is lost: generator, mapper or
threshold) and evaluate — and ends with the path of the HTML report.
The diffusion decoder is not retrained here (~30 min): `deltaedit run train-diffusion` does that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.edit_analysis import analyze_edits
from flows.registry import load_flow
from infra.config import load_config
from infra.runtime.prefect_runtime import ensure_prefect_api
from infra.storage.fsio import Location
from models.toy.catalog import render_catalog
from tasks.analysis import edits as EA
from tasks.layout import ANALYSIS_DIR

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
CATALOG_SIZE = 256
ANALYSIS_IMAGES = (
    64  # inverted images the demo's `analyze edits` step edits (of the 64 bulk-edited)
)
DEMO_STEPS: tuple[tuple[str, str, list[str]], ...] = (  # (label, flow, overrides)
    ("preprocess", "preprocess", []),
    ("relevance", "relevance", []),
    ("mapper", "train-mapper", []),
    ("straightforward", "train-mapper", ["train_mapper.model=straightforward"]),
    ("bulk-edit", "bulk-edit", []),
    ("evaluate", "evaluate", []),
)


def run_demo(config: Path = CONFIG) -> int:
    cfg = load_config(config)
    catalog = Path(cfg.ingest.source)
    if not (catalog / "attributes.jsonl").exists():
        print(f"rendering {CATALOG_SIZE} toy images into {catalog}")
        render_catalog(str(catalog), CATALOG_SIZE, seed=cfg.seed)
    ensure_prefect_api()
    results: dict[str, Any] = {}
    for label, name, overrides in DEMO_STEPS:
        if name == "evaluate":  # the report includes the analysis when it exists
            print(f"analysis: {analyze_run(cfg, str(config))}")
        for stage, summary in load_flow(name)(str(config), overrides).items():
            results[label if stage == "train_mapper" else stage] = summary
    print()
    for stage, s in results.items():
        if stage != "report":
            print(f"{stage:16s} {_line(s)}")
    print(f"outputs under {cfg.root}/")
    print(f"report: {results['report']['uri']}")
    return 1 if any(s.get("failed_shards") for s in results.values()) else 0


def analyze_run(cfg: Any, config: str) -> str:
    """`deltaedit analyze edits` on the run (where an edit is lost); returns where it wrote it."""
    result = analyze_edits(cfg, config, n_images=ANALYSIS_IMAGES)
    return EA.write_outputs(Location(cfg.root, cfg.storage_options).child(ANALYSIS_DIR), result)[
        EA.JSON_FILE
    ]


def _line(summary: dict[str, Any]) -> str:
    if "seen" in summary:
        return (
            f"{summary['seen']:5d} seen = {summary['ok']} ok + {summary['failed']} failed; "
            f"{summary['shards']} shards (ran {summary['ran']}, skipped {summary['skipped']})"
        )
    val = summary.get("val") or {}
    return (
        f"steps {summary.get('start_step')} -> {summary.get('step')}, validation loss "
        f"{val.get('val_loss', float('nan')):.3f} cos {val.get('val_cos', float('nan')):.3f}, "
        f"checkpoint {summary.get('checkpoint')}"
    )
