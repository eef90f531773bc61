"""A run's manifest (``<root>/manifest.json``): what produced the run and what it holds, reproducibly.

It records the config (and its sha256), the code version (the git commit when the code is a git checkout,
else the package version and a sha256 of its source), the inputs' fingerprints (the catalog listing, the
prompts file, the configured model files) and the sha256 of every artifact under the root: model
checkpoints, store data files (tars, vector and manifest Parquet), the report. A done-marker is recorded by
what makes it a marker (its counts and fingerprints), not by its bytes: it also holds timings. Nothing in a
manifest depends on when or how fast the run went, so the same config, seed and code give the same
manifest, and a rerun that finds everything finished writes the manifest it found.

``step_key`` names what a step that is not a sharded stage (an analysis, the report) was computed from, so
a pipeline rerun skips it when its inputs have not changed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from infra.config import RunConfig
from infra.storage.catalog import list_catalog
from infra.storage.fsio import TMP_MARK, Location, open_uri
from infra.storage.store import DONE
from models import zoo

MANIFEST = "manifest.json"
REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("app", "flows", "tasks", "models", "infra")
SKIPPED_PARTS = ("_prefect",)  # Prefect's result storage: run ids, not outputs
SKIPPED_SUFFIXES = ("_cache",)  # trainers' row caches: rebuilt from the stores, not outputs


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_sha256(cfg: RunConfig) -> str:
    return sha256_bytes(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())


def code_version() -> dict[str, str]:
    """The git commit of this checkout, else the package version and a sha256 of its Python source."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        if commit:
            return {"git_commit": commit}
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        version = metadata.version("deltaedit-pipeline")
    except metadata.PackageNotFoundError:
        version = "unknown"
    h = hashlib.sha256()
    for path in sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py")):
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return {"version": version, "source_sha256": h.hexdigest()}


def input_fingerprints(cfg: RunConfig) -> dict[str, Any]:
    """The catalogs' listings (keys, sources, sizes), the prompts file and the configured model files."""
    opts = cfg.storage_options
    out: dict[str, Any] = {}
    for name, source in (("catalog", cfg.ingest.source), ("edit_catalog", cfg.bulk_edit.catalog)):
        if source:
            items = [
                [i.key, _relative(i.source, source), i.meta] for i in list_catalog(source, opts)
            ]
            out[name] = {
                "items": len(items),
                "sha256": sha256_bytes(json.dumps(items, sort_keys=True, default=str).encode()),
            }
    if cfg.bulk_edit.prompts:
        with open_uri(cfg.bulk_edit.prompts, "rb", opts) as f:
            out["prompts"] = sha256_bytes(f.read())
    specs = {role: getattr(cfg.models, role) for role in type(cfg.models).model_fields}
    out["models"] = {role: zoo.identity(s, opts) for role, s in specs.items() if s is not None}
    return out


def artifacts(root: Location, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """Relative path → sha256 of every file under ``root`` (done-markers: their counts and fingerprints),
    leaving out temporaries, Prefect's result storage, row caches, the manifest and ``exclude`` folders."""
    skip = [e.strip("/") for e in exclude]
    try:
        found = sorted(root.fs.find(root.path))
    except FileNotFoundError:
        return {}
    out: dict[str, Any] = {}
    for path in found:
        rel = path[len(root.path) :].lstrip("/")
        parts = rel.split("/")
        if (
            rel == MANIFEST
            or any(rel == e or rel.startswith(f"{e}/") for e in skip)
            or TMP_MARK in parts[-1]
            or any(p in SKIPPED_PARTS or p.endswith(SKIPPED_SUFFIXES) for p in parts[:-1])
        ):
            continue
        data = root.read_bytes(rel)
        if rel.endswith(DONE):
            marker = json.loads(data)
            out[rel] = {
                k: marker.get(k) for k in ("counts", "input_fingerprint", "code_fingerprint")
            }
        else:
            out[rel] = sha256_bytes(data)
    return out


def step_key(name: str, cfg_sha: str, code: dict[str, str], inputs: dict[str, Any]) -> str:
    """What a step was computed from: its name, the config, the code and its inputs' artifacts."""
    payload = {"step": name, "config": cfg_sha, "code": code, "inputs": inputs}
    return sha256_bytes(json.dumps(payload, sort_keys=True).encode())


def build(
    cfg: RunConfig,
    code: dict[str, str],
    inputs: dict[str, Any],
    steps: dict[str, str],
    exclude: Iterable[str] = (),
) -> dict[str, Any]:
    """The manifest of the run under ``cfg.root`` as it is now."""
    return {
        "config": cfg.model_dump(mode="json"),
        "config_sha256": config_sha256(cfg),
        "seed": cfg.seed,
        "code": code,
        "inputs": inputs,
        "steps": steps,
        "artifacts": artifacts(Location(cfg.root, cfg.storage_options), exclude),
    }


def read(root: Location) -> dict[str, Any] | None:
    return json.loads(root.read_bytes(MANIFEST)) if root.exists(MANIFEST) else None


def write(root: Location, manifest: dict[str, Any]) -> str:
    root.write_bytes(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return root.url(MANIFEST)


def _relative(source: str, root: str) -> str:
    """A catalog source relative to the catalog's root (a moved catalog keeps its fingerprint)."""
    base = root.split("*", 1)[0].rstrip("/")
    return source[len(base) :].lstrip("/") if source.startswith(base) else source
