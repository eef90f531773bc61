"""Data-parallel training on Ray Train: the same ``fit`` function on N workers (torch DDP).

``train_data_parallel`` runs ``worker_fit(args, rank=, world=, wrap=, device=)`` in every worker of a
``TorchTrainer`` (gloo on CPU, nccl on GPU); ``wrap`` is Ray's ``prepare_model`` (DDP). Rank 0's returned
summary is written to ``<out>/distributed_summary.json`` (Ray Train v2 keeps no reported metrics without a
checkpoint, and ``out`` is where the trainer's checkpoints live anyway) and returned. Workers run in a
directory of Ray's own, so every local path in ``args`` must be absolute (``Location.absolute_uri``).
Ray Train's own storage is ``ray.train_storage`` (a shared path, or a URI opened with the run's
storage options: what a multi-node run needs), else a local scratch folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infra.config import RayConfig
from infra.runtime.ray_pool import init_ray
from infra.storage.fsio import Location

SUMMARY = "distributed_summary.json"
WorkerFit = Callable[..., dict[str, Any]]


def _worker_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    summary = config["fit"](
        config["args"],
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        wrap=ray.train.torch.prepare_model,
        device=str(ray.train.torch.get_device()),
    )
    if ctx.get_world_rank() == 0:
        Location(config["out"], config["storage_options"]).write_bytes(
            SUMMARY, json.dumps(summary).encode()
        )
    ray.train.report({"step": summary["step"]})


def train_storage(ray_config: RayConfig, out: Location, scratch: Path) -> tuple[str, Any]:
    """Ray Train's (storage_path, storage_filesystem): ``ray.train_storage`` (a path as it is, a
    URI through fsspec with ``out``'s storage options), else ``<scratch>/ray_train`` here."""
    if ray_config.train_storage is None:
        return str(scratch / "ray_train"), None
    loc = Location(ray_config.train_storage, out.storage_options)
    if loc.is_local:
        return loc.path, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return loc.path, PyFileSystem(FSSpecHandler(loc.fs))


def train_data_parallel(
    name: str,
    worker_fit: WorkerFit,
    args: dict[str, Any],
    *,
    workers: int,
    ray_config: RayConfig,
    use_gpu: bool,
    out: Location,
    scratch: Path,
) -> dict[str, Any]:
    """Run ``worker_fit`` (a module-level function) on ``workers`` Ray Train workers; rank 0's summary."""
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(ray_config)
    storage_path, storage_fs = train_storage(ray_config, out, scratch)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "fit": worker_fit,
            "args": args,
            "out": out.absolute_uri,
            "storage_options": out.storage_options,
        },
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RayRunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs
        ),
    )
    trainer.fit()
    return json.loads(out.read_bytes(SUMMARY))
