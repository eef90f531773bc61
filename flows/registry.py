"""The user-facing flows by name: what `deltaedit run <flow>` and prefect.yaml point at.

``FLOWS`` is the source; prefect.yaml's deployments must match it (``prefect_yaml_mismatches``, checked by
tests/test_prefect_deploy.py): every flow deployed, every deployment a flow's, named after it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


@dataclass(frozen=True)
class FlowEntry:
    name: str
    entrypoint: str  # module:function, as in prefect.yaml
    summary: str


FLOWS: dict[str, FlowEntry] = {
    e.name: e
    for e in [
        FlowEntry(
            "ingest",
            "flows/ingest.py:ingest_flow",
            "decode, validate and shard a catalog of images into the images store",
        ),
        FlowEntry(
            "preprocess",
            "flows/preprocess.py:preprocess_flow",
            "ingest + invert (e4e) + sample (generator) + embed (CLIP) into the run's stores",
        ),
        FlowEntry(
            "train-mapper",
            "flows/train_mapper.py:train_mapper_flow",
            "train (or resume) the Delta Mapper on pairs from the codes + CLIP stores into <root>/mapper",
        ),
        FlowEntry(
            "train-diffusion",
            "flows/train_diffusion.py:train_diffusion_flow",
            "train (or resume) the DeltaEdit-D diffusion decoder on the images + codes stores into <root>/diffusion",
        ),
        FlowEntry(
            "relevance",
            "flows/relevance.py:relevance_flow",
            "relevance matrix Rs (conv channels x CLIP dim), by resumable blocks of channels",
        ),
        FlowEntry(
            "bulk-edit",
            "flows/bulk_edit.py:bulk_edit_flow",
            "edit every image with every prompt (DeltaEdit, baselines, sweeps) into the edits store",
        ),
        FlowEntry(
            "pipeline",
            "flows/pipeline.py:pipeline_flow",
            "every step the config needs, preprocess to evaluate, skipping finished work; writes <root>/manifest.json",
        ),
        FlowEntry(
            "evaluate",
            "flows/evaluate.py:evaluate_flow",
            "metrics of every edit (oracle, CLIP direction, PSNR/SSIM, FID/KID, ...) and the HTML report",
        ),
    ]
}


def load_flow(name: str) -> Any:
    if name not in FLOWS:
        known = ", ".join(sorted(FLOWS))
        raise KeyError(f"unknown flow '{name}'; known flows: {known}")
    path, func = FLOWS[name].entrypoint.split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, func)


def prefect_yaml_mismatches(path: Path = PREFECT_YAML) -> list[str]:
    """How prefect.yaml's deployments differ from ``FLOWS`` (none: they match). A deployment is named after
    its flow (``<flow>`` or ``<flow>-<variant>``, e.g. preprocess-nightly) and points at its entrypoint."""
    deployments = yaml.safe_load(path.read_text())["deployments"]
    by_entrypoint = {e.entrypoint: e.name for e in FLOWS.values()}
    problems = [
        f"flow '{e.name}' ({e.entrypoint}) has no deployment"
        for e in FLOWS.values()
        if e.entrypoint not in {d["entrypoint"] for d in deployments}
    ]
    for d in deployments:
        flow = by_entrypoint.get(d["entrypoint"])
        if flow is None:
            problems.append(
                f"deployment '{d['name']}': entrypoint {d['entrypoint']} is no flow of flows/registry.py"
            )
        elif d["name"] != flow and not d["name"].startswith(f"{flow}-"):
            problems.append(
                f"deployment '{d['name']}' runs flow '{flow}': name it '{flow}' or '{flow}-...'"
            )
    return problems
