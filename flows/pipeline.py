"""The whole pipeline in one flow: `deltaedit run pipeline --config FILE`, and what `make demo` runs.

    preprocess → relevance → train-mapper (the Delta Mapper; the straightforward baseline when
    bulk_edit.methods has it) → train-diffusion (when a diffusion decoder is asked for and models.diffusion
    names none) → bulk-edit → [analyze edits] → evaluate → <root>/manifest.json

Each step is the flow of its own name, run as a subflow, so finished work is skipped as each flow skips it
(done shards, finished training). The steps that are not sharded (``analyze edits``, the report) are
skipped when the manifest of the last run records the same inputs for them (``tasks.manifest.step_key``:
config, code version, the artifacts they read) and their outputs are unchanged. The manifest
(``tasks.manifest``) is written at the end: config and sha256, code version, input fingerprints, the
sha256 of every artifact; a rerun with nothing to do writes the same manifest.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import flow_config
from flows.registry import load_flow
from infra.config import RunConfig
from infra.storage.fsio import Location
from tasks import manifest as M
from tasks.layout import ANALYSIS_DIR, Stages

GENERATOR = "generator"


@flow(name="pipeline", log_prints=True)
def pipeline_flow(
    config_path: str | None = None,
    overrides: list[str] | None = None,
    redo_failed: bool = False,
    overwrite: bool = False,
    analyze_images: int = 0,
) -> dict[str, Any]:
    """Run every step the config asks for, skipping finished work; write ``<root>/manifest.json``.
    ``analyze_images`` > 0: `analyze edits` on that many images before evaluate (the report includes it).
    Returns {"steps": {label: summary}, "skipped": [labels skipped whole], "manifest": uri, "report": uri}."""
    cfg = flow_config(config_path, overrides)
    root = Location(cfg.root, cfg.storage_options)
    previous = M.read(root)
    code, cfg_sha = M.code_version(), M.config_sha256(cfg)
    exclude = _inputs_under_root(cfg)
    opts = {"redo_failed": redo_failed, "overwrite": overwrite}
    results: dict[str, Any] = {}
    for label, name, extra in plan_steps(cfg):
        for stage, summary in load_flow(name)(
            config_path, [*(overrides or []), *extra], **opts
        ).items():
            results[label if stage in ("train_mapper", "train_diffusion") else stage] = summary
    stages = Stages.of(catalog=bool(cfg.bulk_edit.catalog))
    later = {ANALYSIS_DIR, stages.metrics, cfg.evaluate.report_dir}
    steps: dict[str, str] = {}
    skipped: list[str] = []
    if analyze_images:
        steps["analysis"] = _key("analysis", cfg_sha, code, root, [*exclude, *later])
        if overwrite or not _unchanged(previous, "analysis", steps, root, ANALYSIS_DIR, exclude):
            results["analysis"] = {"uri": _analyze(cfg, config_path, analyze_images)}
        else:
            skipped.append("analysis")
    later -= {ANALYSIS_DIR}
    steps["evaluate"] = _key("evaluate", cfg_sha, code, root, [*exclude, *later])
    report_dir = cfg.evaluate.report_dir
    if overwrite or not _unchanged(previous, "evaluate", steps, root, report_dir, exclude):
        for stage, summary in load_flow("evaluate")(config_path, overrides, **opts).items():
            results[stage] = summary
    else:
        skipped.append("evaluate")
    uri = M.write(root, M.build(cfg, code, M.input_fingerprints(cfg), steps, exclude))
    print(f"pipeline: manifest {uri}" + (f"; skipped {', '.join(skipped)}" if skipped else ""))
    report = root.child(report_dir).url("index.html")
    return {"steps": results, "skipped": skipped, "manifest": uri, "report": report}


def plan_steps(cfg: RunConfig) -> list[tuple[str, str, list[str]]]:
    """(label, flow, extra overrides) of the flows this config needs before evaluate, in order."""
    be, models = cfg.bulk_edit, cfg.models
    steps: list[tuple[str, str, list[str]]] = [
        ("preprocess", "preprocess", []),
        ("relevance", "relevance", []),
    ]
    if "deltaedit" in be.methods and models.mapper is None:
        steps.append(("mapper", "train-mapper", ["train_mapper.model=delta"]))
    if "straightforward" in be.methods and be.straightforward_mapper is None:
        steps.append(("straightforward", "train-mapper", ["train_mapper.model=straightforward"]))
    if any(d != GENERATOR for d in be.decoder) and models.diffusion is None:
        steps.append(("diffusion", "train-diffusion", []))
    steps.append(("bulk-edit", "bulk-edit", []))
    return steps


def _analyze(cfg: RunConfig, config_path: str | None, n_images: int) -> str:
    """`deltaedit analyze edits` on the run (where an edit is lost); returns where it wrote it."""
    from flows.edit_analysis import analyze_edits
    from tasks.analysis import edits as EA

    result = analyze_edits(cfg, config_path or "<defaults>", n_images=n_images)
    out = Location(cfg.root, cfg.storage_options).child(ANALYSIS_DIR)
    return EA.write_outputs(out, result)[EA.JSON_FILE]


def _key(name: str, cfg_sha: str, code: dict[str, str], root: Location, exclude: list[str]) -> str:
    """The step's key: config, code and every artifact it may read (all but its own and later outputs)."""
    return M.step_key(name, cfg_sha, code, M.artifacts(root, exclude))


def _unchanged(
    previous: dict[str, Any] | None,
    step: str,
    steps: dict[str, str],
    root: Location,
    output: str,
    exclude: list[str],
) -> bool:
    """The last run recorded this step with the same key, and its outputs are as it left them."""
    if not previous or previous.get("steps", {}).get(step) != steps[step]:
        return False
    prefix = f"{output.strip('/')}/"
    before = {k: v for k, v in previous.get("artifacts", {}).items() if k.startswith(prefix)}
    now = {k: v for k, v in M.artifacts(root, exclude).items() if k.startswith(prefix)}
    return bool(before) and before == now


def _inputs_under_root(cfg: RunConfig) -> list[str]:
    """Catalog folders that lie under the run root (the toy demo renders its catalog there): inputs, not
    artifacts."""
    root = Location(cfg.root, cfg.storage_options)
    out = []
    for source in (cfg.ingest.source, cfg.bulk_edit.catalog):
        if not source:
            continue
        loc = Location(source.split("*", 1)[0].rsplit("/", 1)[0] if "*" in source else source)
        if loc.path.startswith(root.path + "/"):
            out.append(loc.path[len(root.path) + 1 :])
    return out
