"""The flow both trainers share: config → output folder → (overwrite) → row cache → fit → summary.

``training_flow`` makes one trainer's Prefect flow from its declaration (``TrainingFlow``: the flow's name,
its config section, the cache builder and opener, the trainer whose ``fit`` runs, the output folder). A rerun
continues from the last checkpoint; ``overwrite`` starts over. With ``<section>.workers > 1`` the same
``fit`` runs on Ray Train (TorchTrainer, DDP; gloo on CPU, nccl on GPUs), each worker on its own slice of
the rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prefect import Flow, flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import cache_scratch, flow_config, prepare_cache
from infra.config import RunConfig
from infra.runtime.ray_train import train_data_parallel
from infra.storage.fsio import Location
from models.device import pick_device
from tasks.train.row_cache import SplitCache, localize
from tasks.train.trainer import Trainer


class CacheBuilder(Protocol):
    """``build_row_cache`` / ``build_image_cache``: the pools' rows joined into a cache folder (reused if current)."""

    def __call__(
        self,
        root: Location,
        cache_dir: str | Path,
        *,
        pools: Sequence[str],
        shards: Sequence[str] | None,
        val_fraction: float,
        eval_fraction: float,
    ) -> SplitCache: ...


def no_cache_options(cfg: RunConfig) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class TrainingFlow:
    """What one training flow declares; the rest is this module's."""

    name: str  # the flow's name: "train-mapper"
    section: str  # its RunConfig section: "train_mapper"
    tag: str  # task names "<tag>-rows", "<tag>-fit"…; cache "<root>/<tag>_cache"
    build_cache: CacheBuilder
    open_cache: Callable[[Path], SplitCache]  # a built cache folder → the cache ``fit`` reads
    trainer: type[Trainer]  # its ``fit`` trains (a class: Ray pickles it by reference)
    out_dir: Callable[[Any], str]  # the section's settings → its folder under the run root
    cache_options: Callable[[RunConfig], dict[str, Any]] = no_cache_options  # more cache arguments


def training_flow(spec: TrainingFlow) -> Flow:
    """The Prefect flow ``spec.name`` that trains (or resumes) ``spec``'s model; returns {section: summary}."""

    @flow(name=spec.name, log_prints=True)
    def train(
        config_path: str | None = None,
        overrides: list[str] | None = None,
        redo_failed: bool = False,
        overwrite: bool = False,
        shards: list[str] | None = None,
    ) -> dict[str, Any]:
        """Train (or resume) to the configured steps; ``shards`` limits the shards the cache reads
        (``redo_failed``: no-op)."""
        cfg = flow_config(config_path, overrides)
        settings = getattr(cfg, spec.section)
        out = Location(cfg.root, cfg.storage_options).child(spec.out_dir(settings))
        if overwrite:
            out.remove_all()
        cache_dir = prepare_rows.with_options(name=f"{spec.tag}-rows")(spec, cfg, shards)
        if settings.workers > 1:
            summary = fit_distributed.with_options(name=f"{spec.tag}-fit-distributed")(
                spec, cfg, cache_dir, out
            )
        else:
            summary = fit_single.with_options(name=f"{spec.tag}-fit")(spec, cfg, cache_dir, out)
        print(
            f"{spec.name}: steps {summary['start_step']}→{summary['step']} ({summary['ran']} run, "
            f"{summary['steps_per_s']} steps/s), loss {summary.get('loss')}, val {summary.get('val')}, "
            f"{summary['rows']} rows"
        )
        return {spec.section: summary}

    return train


@task(cache_policy=NO_CACHE)
def prepare_rows(spec: TrainingFlow, cfg: RunConfig, shards: list[str] | None) -> str:
    """Build (or reuse) the row cache of the configured pools; returns where the fit opens it."""
    settings = getattr(cfg, spec.section)
    root = Location(cfg.root, cfg.storage_options)
    where, cache = prepare_cache(
        cfg,
        settings.cache_dir,
        f"{spec.tag}_cache",
        lambda folder: spec.build_cache(
            root,
            folder,
            pools=settings.pools,
            shards=shards,
            val_fraction=settings.val_fraction,
            eval_fraction=cfg.split.eval_fraction,  # the catalog's eval part never trains
            **spec.cache_options(cfg),
        ),
    )
    print(
        f"{spec.tag} rows: {len(cache)} ({cache.meta['counts']}), {cache.meta['validation']} held out"
    )
    return where


@task(cache_policy=NO_CACHE)
def fit_single(spec: TrainingFlow, cfg: RunConfig, cache_dir: str, out: Location) -> dict[str, Any]:
    """``fit`` in this process."""
    cache = spec.open_cache(localize(cache_dir, cfg.storage_options))
    return spec.trainer.fit(
        getattr(cfg, spec.section), cfg.seed, cache, out, device=pick_device(cfg.device)
    )


def _fit_worker(
    args: dict[str, Any], *, rank: int, world: int, wrap: Any, device: str
) -> dict[str, Any]:
    """One Ray Train worker: its rank's slice of the rows, DDP-averaged gradients."""
    settings = args["settings_type"].model_validate(args["settings"])
    cache = args["open_cache"](localize(args["cache_dir"], args["storage_options"]))
    return args["trainer"].fit(
        settings,
        args["seed"],
        cache,
        Location(args["out"], args["storage_options"]),
        rank=rank,
        world=world,
        wrap=wrap,
        device=device,
    )


@task(cache_policy=NO_CACHE)
def fit_distributed(
    spec: TrainingFlow, cfg: RunConfig, cache_dir: str, out: Location
) -> dict[str, Any]:
    """The same ``fit`` on ``<section>.workers`` Ray Train workers (the cache: a shared path or a URI)."""
    settings = getattr(cfg, spec.section)
    cache = Location(cache_dir, cfg.storage_options)  # workers run elsewhere: absolute paths
    args = {
        "trainer": spec.trainer,
        "open_cache": spec.open_cache,
        "settings_type": type(settings),
        "settings": settings.model_dump(mode="json"),
        "seed": cfg.seed,
        "cache_dir": cache.absolute_uri,
        "out": out.absolute_uri,
        "storage_options": out.storage_options,
    }
    return train_data_parallel(
        spec.name,
        _fit_worker,
        args,
        workers=settings.workers,
        ray_config=cfg.ray,
        use_gpu=pick_device(cfg.device) == "cuda",
        out=out,
        scratch=cache_scratch(cache_dir, cfg.storage_options),
    )
