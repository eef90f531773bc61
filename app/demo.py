"""`deltaedit demo` / `make demo`: the pipeline on the embedded toy domain, offline, in minutes.

It renders a small toy catalog (as a user's own image folder would be), then runs the pipeline flow
(``flows.pipeline``) with the committed toy models — preprocess (ingest, invert, sample, embed), relevance, train-mapper (the Delta
Mapper and the straightforward baseline), bulk-edit (configs/prompts/toy.yaml with DeltaEdit and both
baselines, decoded by the generator and, for DeltaEdit on a quarter of the images, by the committed
diffusion decoder, plain and mask-guided), `analyze edits` (where an edit is lost: generator, mapper or
threshold) and evaluate, then writes runs/toy/manifest.json — and ends with the path of the HTML report.
A second `make demo` finds everything finished and does no work; `deltaedit demo --overwrite` starts over.
The diffusion decoder is not retrained here (~30 min): `deltaedit run train-diffusion` does that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.pipeline import pipeline_flow
from infra.config import load_config
from infra.runtime.prefect_runtime import ensure_prefect_api
from models.toy.catalog import render_catalog

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
CATALOG_SIZE = 256
ANALYSIS_IMAGES = (
    64  # inverted images the demo's `analyze edits` step edits (of the 64 bulk-edited)
)


def run_demo(config: Path = CONFIG, overwrite: bool = False) -> int:
    """The toy catalog (rendered once), then the pipeline flow (flows/pipeline.py) with `analyze edits`;
    ``overwrite`` recomputes every stage (the pipeline's ``overwrite``)."""
    cfg = load_config(config)
    catalog = Path(cfg.ingest.source)
    if not (catalog / "attributes.jsonl").exists():
        print(f"rendering {CATALOG_SIZE} toy images into {catalog}")
        render_catalog(str(catalog), CATALOG_SIZE, seed=cfg.seed)
    ensure_prefect_api()
    out = pipeline_flow(str(config), [], overwrite=overwrite, analyze_images=ANALYSIS_IMAGES)
    results = out["steps"]
    print()
    for stage, s in results.items():
        if stage not in ("report", "analysis"):
            print(f"{stage:16s} {_line(s)}")
    if "analysis" in results:
        print(f"analysis: {results['analysis']['uri']}")
    if out["skipped"]:
        print(f"unchanged since the last run: {', '.join(out['skipped'])}")
    print(f"outputs under {cfg.root}/ (manifest: {out['manifest']})")
    print(f"report: {out['report']}")
    return 1 if any(s.get("failed_shards") for s in results.values()) else 0


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
