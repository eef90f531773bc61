"""Train the Delta Mapper from the run's stores: `deltaedit run train-mapper --config FILE`.

    codes + clip_images ┐
                        ├─ row cache (one pass, shard by shard) ─ pairs ─ fit ─► <root>/mapper/
    samples + clip_samples ┘                          (the straightforward baseline: <root>/mapper_straightforward/)

A rerun continues from the last checkpoint; ``overwrite`` starts over. With ``train_mapper.workers > 1``
the same ``fit`` runs on Ray Train (torch DDP; gloo on CPU), each worker on its own slice of the data.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import flow_config
from infra.config import RunConfig, TrainMapperConfig
from infra.fsio import Location
from models.device import pick_device
from tasks.mapper_data import RowCache, build_row_cache
from tasks.train_mapper import fit

SUMMARY = "distributed_summary.json"


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


def cache_folder(cfg: RunConfig) -> Path:
    """``train_mapper.cache_dir``, else ``<root>/mapper_cache`` for a local root, else a local temp dir."""
    if cfg.train_mapper.cache_dir:
        return Path(cfg.train_mapper.cache_dir)
    root = Location(cfg.root, cfg.storage_options)
    if root.is_local:
        return Path(root.path) / "mapper_cache"
    return Path(tempfile.gettempdir()) / f"deltaedit-mapper-{hashlib.sha256(root.uri.encode()).hexdigest()[:12]}"


@task(name="mapper-rows", cache_policy=NO_CACHE)
def prepare_rows(cfg: RunConfig, shards: list[str] | None) -> str:
    """Build (or reuse) the local row cache of the configured pools; returns its folder."""
    tm = cfg.train_mapper
    cache = build_row_cache(Location(cfg.root, cfg.storage_options), cache_folder(cfg), pools=tm.pools,
                            shards=shards, val_fraction=tm.val_fraction)
    print(f"mapper rows: {len(cache)} ({cache.meta['counts']}), {cache.meta['validation']} held out")
    return str(cache.folder)


@task(name="mapper-fit", cache_policy=NO_CACHE)
def train_single(cfg: RunConfig, cache_dir: str, out: Location) -> dict[str, Any]:
    return fit(cfg.train_mapper, cfg.seed, RowCache(cache_dir), out, device=pick_device(cfg.device))


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: its rank's slice of the primaries, DDP-averaged gradients."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    tm = TrainMapperConfig.model_validate(config["train_mapper"])
    out = Location(config["out"], config["storage_options"])
    summary = fit(tm, config["seed"], RowCache(config["cache_dir"]), out, rank=ctx.get_world_rank(),
                  world=ctx.get_world_size(), wrap=ray.train.torch.prepare_model,
                  device=str(ray.train.torch.get_device()))
    if ctx.get_world_rank() == 0:                      # Ray Train v2 keeps no metrics without a checkpoint
        out.write_bytes(SUMMARY, json.dumps(summary).encode())
    ray.train.report({"step": summary["step"]})


@task(name="mapper-fit-distributed", cache_policy=NO_CACHE)
def fit_distributed(cfg: RunConfig, cache_dir: str, out: Location) -> dict[str, Any]:
    """The same ``fit`` on ``train_mapper.workers`` Ray Train workers (the cache must be on a shared path)."""
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from infra.ray_pool import init_ray

    init_ray(cfg.ray)
    use_gpu = pick_device(cfg.device) == "cuda"
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"train_mapper": cfg.train_mapper.model_dump(mode="json"), "seed": cfg.seed,
                           "cache_dir": cache_dir, "out": out.uri, "storage_options": out.storage_options},
        scaling_config=ScalingConfig(num_workers=cfg.train_mapper.workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RayRunConfig(name="train-mapper", storage_path=str(Path(cache_dir).parent / "ray_train")),
    )
    trainer.fit()
    return json.loads(out.read_bytes(SUMMARY))
