"""Train the Delta Mapper from the run's stores: `deltaedit run train-mapper --config FILE`.

    codes + clip_images ┐
                        ├─ row cache (one pass, shard by shard) ─ pairs ─ fit ─► <root>/mapper/
    samples + clip_samples ┘                          (the straightforward baseline: <root>/mapper_straightforward/)

A rerun continues from the last checkpoint; ``overwrite`` starts over. With ``train_mapper.workers > 1``
the same ``fit`` runs on Ray Train (torch DDP; gloo on CPU), each worker on its own slice of the data.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import cache_scratch, flow_config, prepare_cache
from infra.config import RunConfig, TrainMapperConfig
from infra.storage.fsio import Location
from infra.runtime.ray_train import train_data_parallel
from models.device import pick_device
from tasks.mapper_data import RowCache, build_row_cache
from tasks.row_cache import localize
from tasks.train_mapper import fit


@flow(name="train-mapper", log_prints=True)
def train_mapper_flow(config_path: str | None = None, overrides: list[str] | None = None,
                      redo_failed: bool = False, overwrite: bool = False,
                      shards: list[str] | None = None) -> dict[str, Any]:
    """Train (or resume) the mapper; ``shards`` limits the codes/CLIP shards used (``redo_failed``: no-op)."""
    cfg = flow_config(config_path, overrides)
    out = Location(cfg.root, cfg.storage_options).child(mapper_dir(cfg.train_mapper.model))
    if overwrite:
        out.remove_all()
    cache_dir = prepare_rows(cfg, shards)
    if cfg.train_mapper.workers > 1:
        summary = fit_distributed(cfg, cache_dir, out)
    else:
        summary = train_single(cfg, cache_dir, out)
    print(f"train-mapper: steps {summary['start_step']}→{summary['step']} ({summary['ran']} run), "
          f"loss {summary.get('loss')}, val {summary.get('val')}, {summary['rows']} rows")
    return {"train_mapper": summary}


def mapper_dir(model: str) -> str:
    """Where train-mapper writes a model under the run root: ``mapper`` (Delta Mapper) or ``mapper_<model>``."""
    return "mapper" if model == "delta" else f"mapper_{model}"


@task(name="mapper-rows", cache_policy=NO_CACHE)
def prepare_rows(cfg: RunConfig, shards: list[str] | None) -> str:
    """Build (or reuse) the local row cache of the configured pools; returns its folder."""
    tm = cfg.train_mapper
    root = Location(cfg.root, cfg.storage_options)
    where, cache = prepare_cache(cfg, tm.cache_dir, "mapper_cache", lambda folder: build_row_cache(
        root, folder, pools=tm.pools, shards=shards, val_fraction=tm.val_fraction))
    print(f"mapper rows: {len(cache)} ({cache.meta['counts']}), {cache.meta['validation']} held out")
    return where


@task(name="mapper-fit", cache_policy=NO_CACHE)
def train_single(cfg: RunConfig, cache_dir: str, out: Location) -> dict[str, Any]:
    cache = RowCache(localize(cache_dir, cfg.storage_options))
    return fit(cfg.train_mapper, cfg.seed, cache, out, device=pick_device(cfg.device))


def _fit_worker(args: dict[str, Any], *, rank: int, world: int, wrap: Any, device: str) -> dict[str, Any]:
    """One Ray Train worker: its rank's slice of the primaries, DDP-averaged gradients."""
    tm = TrainMapperConfig.model_validate(args["train_mapper"])
    cache = RowCache(localize(args["cache_dir"], args["storage_options"]))
    return fit(tm, args["seed"], cache, Location(args["out"], args["storage_options"]),
               rank=rank, world=world, wrap=wrap, device=device)


@task(name="mapper-fit-distributed", cache_policy=NO_CACHE)
def fit_distributed(cfg: RunConfig, cache_dir: str, out: Location) -> dict[str, Any]:
    """The same ``fit`` on ``train_mapper.workers`` Ray Train workers (the cache: a shared path or
    a URI)."""
    cache = Location(cache_dir, cfg.storage_options)   # workers run elsewhere: absolute paths
    args = {"train_mapper": cfg.train_mapper.model_dump(mode="json"), "seed": cfg.seed,
            "cache_dir": cache.absolute_uri, "out": out.absolute_uri,
            "storage_options": out.storage_options}
    return train_data_parallel("train-mapper", _fit_worker, args, workers=cfg.train_mapper.workers,
                               ray_config=cfg.ray, use_gpu=pick_device(cfg.device) == "cuda", out=out,
                               scratch=cache_scratch(cache_dir, cfg.storage_options))
