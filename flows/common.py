"""What every flow does first: load its config, start one pool of workers for its stages, find local scratch."""
from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from infra.config import RunConfig, load_config
from infra.fsio import Location
from infra.ray_pool import ActorPool, init_ray


def flow_config(config_path: str | None, overrides: list[str] | None) -> RunConfig:
    return load_config(config_path, overrides)


@contextlib.contextmanager
def worker_pool(cfg: RunConfig) -> Iterator[ActorPool]:
    """One pool of actors for all the stages of a flow run (stages swap processors, not processes)."""
    init_ray(cfg.ray)
    with ActorPool(cfg.root, cfg.storage_options, cfg.ray) as pool:
        yield pool


def local_cache_folder(cfg: RunConfig, configured: str | None, name: str) -> Path:
    """A trainer's local row cache: ``configured``, else ``<root>/<name>`` for a local root, else a temp dir."""
    if configured:
        return Path(configured)
    root = Location(cfg.root, cfg.storage_options)
    if root.is_local:
        return Path(root.path) / name
    return Path(tempfile.gettempdir()) / f"deltaedit-{name}-{hashlib.sha256(root.uri.encode()).hexdigest()[:12]}"
