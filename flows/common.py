"""What every flow does first: load the config, then hand Prefect the run's concurrency."""
from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner

from infra.config import RunConfig, load_config


def flow_config(config_path: str | None, overrides: list[str] | None) -> RunConfig:
    return load_config(config_path, overrides)


def task_runner(cfg: RunConfig) -> ThreadPoolTaskRunner:
    return ThreadPoolTaskRunner(max_workers=cfg.prefect.concurrency)
