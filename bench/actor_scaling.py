"""Pool scaling: the same shards through a Ray pool of 1 actor and of 2 actors (one torch thread each)."""

from __future__ import annotations

import contextlib
import functools

import ray
from common import best_of_each

from infra.config import RayConfig
from infra.runtime.ray_pool import ActorPool
from infra.runtime.upstream import plan_downstream
from infra.storage.fsio import Location
from infra.storage.store import StageStore
from models.zoo import ModelSpec
from tasks.embed import EmbedBuilder
from tasks.invert import InvertBuilder


def _builder(kind: str, ckpt: str, root: str, batch_size: int):
    if kind == "embed":
        return EmbedBuilder(
            ModelSpec(name="open_clip", checkpoint=ckpt),
            root,
            "images",
            batch_size=batch_size,
            device="cpu",
            cpus=1,
        )
    return InvertBuilder(
        ModelSpec(name="e4e", checkpoint=ckpt),
        None,
        root,
        batch_size=batch_size,
        device="cpu",
        cpus=1,
    )


def actor_scaling(kind: str, ckpt: str, root: str, batch_size: int, repeat: int = 3) -> float:
    """Time(1 actor) / time(2 actors) for every shard of ``root``'s images store.

    Both pools live side by side and run in turn, best of ``repeat`` rounds (``best_of_each``), so a
    change in the machine's load hits both alike. Each actor reserves half a CPU so that the three fit
    on a 2-CPU cluster; each runs one torch thread, and only one pool works at a time. Both pools first
    process every shard once untimed: an actor's first shard also pays its one-time costs (pyarrow's lazy
    pandas import, the first forward's allocations), which a real run pays once per actor, not per shard.
    """
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    specs = plan_downstream(StageStore(Location(root), "images"))
    builder = _builder(kind, ckpt, root, batch_size)
    with contextlib.ExitStack() as stack:
        runs = {}
        for n in (1, 2):
            out = f"{root}-out{n}"
            pool = stack.enter_context(
                ActorPool(out, {}, RayConfig(cpus_per_actor=0.5), actors=n)
            ).load(builder)
            runs[n] = functools.partial(
                _run_all, pool, StageStore(Location(out), builder.stage), specs
            )
            runs[n]()  # warm-up
        times = best_of_each(runs, repeat)
    return times[1] / times[2]


def _run_all(pool: ActorPool, out: StageStore, specs: list) -> None:
    out.overwrite()
    reports = list(pool.map(specs))
    assert all(r.outcome == "ran" for r in reports)
