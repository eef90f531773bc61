"""Train the DeltaEdit-D decoder from the run's stores: `deltaedit run train-diffusion --config FILE`.

    images + codes  ┐
                    ├─ row cache (one pass, shard by shard) ─ fit (ε-prediction, EMA) ─► <root>/diffusion/
    samples         ┘

A rerun continues from the last checkpoint; ``overwrite`` starts over. With ``train_diffusion.workers > 1``
the same ``fit`` runs on Ray Train (TorchTrainer, DDP; gloo on CPU, nccl on GPUs), each worker on its
own slice of the images.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import cache_scratch, flow_config, prepare_cache
from infra.config import RunConfig, TrainDiffusionConfig
from infra.storage.fsio import Location
from infra.runtime.ray_train import train_data_parallel
from models.device import pick_device
from tasks.diffusion_data import ImageCache, build_image_cache
from tasks.row_cache import localize
from tasks.train_diffusion import fit

OUT_DIR = "diffusion"


@flow(name="train-diffusion", log_prints=True)
def train_diffusion_flow(config_path: str | None = None, overrides: list[str] | None = None,
                         redo_failed: bool = False, overwrite: bool = False,
                         shards: list[str] | None = None) -> dict[str, Any]:
    """Train (or resume) the diffusion decoder; ``shards`` limits the shards used (``redo_failed``: no-op)."""
    cfg = flow_config(config_path, overrides)
    out = Location(cfg.root, cfg.storage_options).child(OUT_DIR)
    if overwrite:
        out.remove_all()
    cache_dir = prepare_images(cfg, shards)
    if cfg.train_diffusion.workers > 1:
        summary = fit_distributed(cfg, cache_dir, out)
    else:
        summary = train_single(cfg, cache_dir, out)
    print(f"train-diffusion: steps {summary['start_step']}→{summary['step']} ({summary['ran']} run, "
          f"{summary['steps_per_s']} steps/s), loss {summary.get('loss')}, val {summary.get('val')}, "
          f"{summary['rows']} images")
    return {"train_diffusion": summary}


@task(name="diffusion-rows", cache_policy=NO_CACHE)
def prepare_images(cfg: RunConfig, shards: list[str] | None) -> str:
    """Build (or reuse) the local (image, code) cache of the configured pools; returns its folder."""
    dc = cfg.train_diffusion
    root = Location(cfg.root, cfg.storage_options)
    where, cache = prepare_cache(cfg, dc.cache_dir, "diffusion_cache", lambda folder:
                                 build_image_cache(root, folder, pools=dc.pools, shards=shards,
                                                   val_fraction=dc.val_fraction))
    print(f"diffusion rows: {len(cache)} images {cache.image_shape} ({cache.meta['counts']}), "
          f"{cache.meta['validation']} held out")
    return where


@task(name="diffusion-fit", cache_policy=NO_CACHE)
def train_single(cfg: RunConfig, cache_dir: str, out: Location) -> dict[str, Any]:
    cache = ImageCache(localize(cache_dir, cfg.storage_options))
    return fit(cfg.train_diffusion, cfg.seed, cache, out, device=pick_device(cfg.device))


def _fit_worker(args: dict[str, Any], *, rank: int, world: int, wrap: Any, device: str) -> dict[str, Any]:
    """One Ray Train worker: its rank's slice of the images, DDP-averaged gradients."""
    dc = TrainDiffusionConfig.model_validate(args["train_diffusion"])
    cache = ImageCache(localize(args["cache_dir"], args["storage_options"]))
    return fit(dc, args["seed"], cache, Location(args["out"], args["storage_options"]),
               rank=rank, world=world, wrap=wrap, device=device)


@task(name="diffusion-fit-distributed", cache_policy=NO_CACHE)
def fit_distributed(cfg: RunConfig, cache_dir: str, out: Location) -> dict[str, Any]:
    """The same ``fit`` on ``train_diffusion.workers`` Ray Train workers (the cache: a shared path
    or a URI)."""
    cache = Location(cache_dir, cfg.storage_options)   # workers run elsewhere: absolute paths
    args = {"train_diffusion": cfg.train_diffusion.model_dump(mode="json"), "seed": cfg.seed,
            "cache_dir": cache.absolute_uri, "out": out.absolute_uri,
            "storage_options": out.storage_options}
    return train_data_parallel("train-diffusion", _fit_worker, args, workers=cfg.train_diffusion.workers,
                               ray_config=cfg.ray, use_gpu=pick_device(cfg.device) == "cuda", out=out,
                               scratch=cache_scratch(cache_dir, cfg.storage_options))
