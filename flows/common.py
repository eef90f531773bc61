"""What every flow does first: load its config, start one pool of workers for its stages, find local scratch."""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from infra.config import RunConfig, load_config
from infra.runtime.ray_pool import ActorPool, init_ray
from infra.storage.fsio import Location
from tasks.train.row_cache import SplitCache, local_copy_folder, publish

Cache = TypeVar("Cache", bound=SplitCache)


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
    return (
        Path(tempfile.gettempdir())
        / f"deltaedit-{name}-{hashlib.sha256(root.uri.encode()).hexdigest()[:12]}"
    )


def prepare_cache(
    cfg: RunConfig, configured: str | None, name: str, build: Callable[[Path], Cache]
) -> tuple[str, Cache]:
    """Build a trainer's row cache; returns (where workers open it, the cache). For a URI
    ``configured`` (s3://...) it is built in this node's local copy folder and published there
    (``localize`` fetches it on the other nodes); a local or shared path is built in place."""
    target = Location(configured, cfg.storage_options) if configured else None
    if target is None or target.is_local:
        cache = build(local_cache_folder(cfg, configured, name))
        return str(cache.folder.resolve()), cache
    cache = build(local_copy_folder(target.uri))
    publish(cache.folder, target)
    return target.uri, cache


def cache_scratch(cache_dir: str, storage_options: dict) -> Path:
    """A local folder beside a cache (Ray Train's storage unless ray.train_storage): the cache's
    parent, or the temp dir for a cache at a URI."""
    loc = Location(cache_dir, storage_options)
    return Path(loc.path).parent if loc.is_local else Path(tempfile.gettempdir())
