"""What every flow does first: load its config and start one pool of workers for its stages."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from infra.config import RunConfig, load_config
from infra.ray_pool import ActorPool, init_ray


def flow_config(config_path: str | None, overrides: list[str] | None) -> RunConfig:
    return load_config(config_path, overrides)


@contextlib.contextmanager
def worker_pool(cfg: RunConfig) -> Iterator[ActorPool]:
    """One pool of actors for all the stages of a flow run (stages swap processors, not processes)."""
    init_ray(cfg.ray)
    with ActorPool(cfg.root, cfg.storage_options, cfg.ray) as pool:
        yield pool
