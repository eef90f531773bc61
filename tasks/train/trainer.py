"""The training loop both trainers share: resume, prefetched steps, validation and checkpoint cadence, summary.

A trainer (a ``Trainer`` subclass: ``tasks.train.mapper``, ``tasks.train.diffusion``) brings its own pieces:
the model and optimizer, the batch of a step, the loss of a batch, validation, and what its checkpoint holds
beyond the common state. ``Trainer.fit`` drives them. Checkpoints (``tasks.train.checkpoints``) hold the saved
model's weights and a sidecar with the step, optimizer, every global RNG (rank 0's), the sampler position,
the run fingerprint and the validation history; the batch of a step is a function of the step, so
restoring these reproduces an uninterrupted run bit for bit.

Data-parallel (Ray Train, ``infra.runtime.ray_train``): every rank runs ``fit`` on its slice of the rows;
``wrap`` (DDP) wraps the model that steps, rank 0 alone validates and writes checkpoints, and on resume the
other ranks reseed their RNGs from (seed, rank, step).
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch

from infra.storage.fsio import Location
from tasks.train.checkpoints import (
    Checkpointer,
    SavableModel,
    rng_state,
    seed_everything,
    set_rng_state,
)
from tasks.train.row_cache import EpochSampler, SplitCache


class LoopSettings(Protocol):
    """The fields of a trainer's config section that the loop reads."""

    steps: int
    lr: float
    val_every: int
    checkpoint_every: int
    keep_checkpoints: int
    threads: int | None


Settings = TypeVar("Settings", bound=LoopSettings)
Cache = TypeVar("Cache", bound=SplitCache)


def run_fingerprint(keys: dict[str, Any]) -> str:
    """A short hash of what a resumed run must share with the run it continues."""
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


class Trainer(ABC, Generic[Settings, Cache]):
    """One trainer's pieces. A subclass's ``__init__`` builds ``model``, ``optimizer``, ``sampler`` and
    ``fingerprint``; the loop calls the rest."""

    name: ClassVar[str]  # the log prefix, e.g. "train-mapper"
    final: ClassVar[str]  # the weights file of a finished run, e.g. "mapper.safetensors"
    grad_clip: float | None = None  # max gradient norm of ``model`` (None: off)
    model: torch.nn.Module  # the model that steps (wrapped for DDP)
    optimizer: torch.optim.Optimizer
    sampler: EpochSampler  # the rows of each step; its ``state(step)`` goes in the sidecar
    fingerprint: str  # ``run_fingerprint`` of the settings and data a resume must match

    def __init__(
        self,
        settings: Settings,
        seed: int,
        cache: Cache,
        *,
        rank: int = 0,
        world: int = 1,
        device: str = "cpu",
    ) -> None:
        self.settings, self.seed, self.cache = settings, seed, cache
        self.rank, self.world, self.device = rank, world, device

    @property
    def saved(self) -> SavableModel:
        """The model a checkpoint's weights file holds and a resume restores."""
        return self.model

    def lr(self, step: int) -> float:
        """The learning rate of ``step`` (a function of the step, so resume-safe)."""
        return self.settings.lr

    @abstractmethod
    def fetch(self, step: int) -> tuple[torch.Tensor, ...]:
        """The batch of ``step`` (CPU tensors; runs in the prefetch thread)."""

    @abstractmethod
    def loss(
        self, net: torch.nn.Module, batch: tuple[torch.Tensor, ...], step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to minimise, other metrics to report) of ``net`` (``model``, maybe wrapped) on a batch."""

    def after_step(self, step: int) -> None:
        """Called after the optimizer stepped on ``step``."""

    @abstractmethod
    def validate(self) -> dict[str, float]:
        """Metrics on the fixed held-out rows (called on rank 0 when the cache holds some)."""

    def state(self) -> dict[str, Any]:
        """What the checkpoint's sidecar holds beyond the common state."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Load back what ``state`` added, after ``saved`` and the optimizer are restored."""

    def lineage(self, step: int) -> dict[str, Any] | None:
        """The lineage written with the weights of ``step`` (None: the model's own)."""
        return None

    @classmethod
    def fit(
        cls,
        settings: Settings,
        seed: int,
        cache: Cache,
        out: Location,
        *,
        rank: int = 0,
        world: int = 1,
        wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        stop_at: int | None = None,
        device: str = "cpu",
        log: Callable[[str], None] = print,
    ) -> dict[str, Any]:
        """Train (or resume) to ``settings.steps``; ``stop_at`` ends this call early without a checkpoint
        (a kill). Returns the summary of this call."""
        if settings.threads:
            torch.set_num_threads(settings.threads)
        return _run(
            cls(settings, seed, cache, rank=rank, world=world, device=device),
            out,
            wrap,
            stop_at,
            log,
        )


def _run(
    trainer: Trainer,
    out: Location,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None,
    stop_at: int | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    steps = trainer.settings.steps
    ckpt = Checkpointer(out, trainer.final, trainer.settings.keep_checkpoints)
    step, history = _start(trainer, ckpt)
    net = wrap(trainer.model) if wrap else trainer.model
    validates = trainer.rank == 0 and trainer.cache.val_rows.size > 0
    start, began, last, saving = step, time.perf_counter(), {}, 0.0
    with ThreadPoolExecutor(1) as pool:  # read step+1 while step trains
        pending = pool.submit(trainer.fetch, step)
        while step < steps and (stop_at is None or step < stop_at):
            batch = tuple(t.to(trainer.device, non_blocking=True) for t in pending.result())
            if step + 1 < steps:
                pending = pool.submit(trainer.fetch, step + 1)
            last = {"step": step + 1, **_train_step(trainer, net, batch, step)}
            step += 1
            if validates and (step % trainer.settings.val_every == 0 or step == steps):
                history.append({"step": step, **trainer.validate()})
                log(
                    f"[{trainer.name}] step {step}: "
                    + " ".join(
                        f"{k} {v:.4f}" for k, v in {**last, **history[-1]}.items() if k != "step"
                    )
                )
            if trainer.rank == 0 and (
                step % trainer.settings.checkpoint_every == 0 or step == steps
            ):
                t0 = time.perf_counter()
                _save(trainer, ckpt, step, history)
                saving += time.perf_counter() - t0
    seconds = time.perf_counter() - began
    training = seconds - saving  # steps/s of data + step, checkpoint I/O apart
    return {
        "start_step": start,
        "step": step,
        "ran": step - start,
        "done": step >= steps,
        **last,
        "val": history[-1] if history else None,
        "seconds": round(seconds, 3),
        "checkpoint_seconds": round(saving, 3),
        "steps_per_s": round((step - start) / training, 3) if training > 0 else None,
        "rows": len(trainer.cache),
        "train_rows": int(trainer.cache.train_rows.size),
        "val_rows": int(trainer.cache.val_rows.size),
        "checkpoint": out.url(trainer.final) if step >= steps else None,
    }


def _train_step(
    trainer: Trainer, net: torch.nn.Module, batch: tuple[torch.Tensor, ...], step: int
) -> dict[str, float]:
    """One optimizer step; the loss and the trainer's other metrics."""
    opt = trainer.optimizer
    for group in opt.param_groups:
        group["lr"] = trainer.lr(step)
    loss, metrics = trainer.loss(net, batch, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if trainer.grad_clip:
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.grad_clip)
    opt.step()
    trainer.after_step(step)
    return {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}}


def _save(trainer: Trainer, ckpt: Checkpointer, step: int, history: list[dict[str, float]]) -> None:
    state = {
        "step": step,
        **trainer.state(),
        "optimizer": trainer.optimizer.state_dict(),
        "rng": rng_state(),
        "sampler": trainer.sampler.state(step),
        "fingerprint": trainer.fingerprint,
        "history": history,
    }
    ckpt.save(
        step,
        trainer.saved,
        state,
        final=step == trainer.settings.steps,
        lineage=trainer.lineage(step),
    )


def _start(trainer: Trainer, ckpt: Checkpointer) -> tuple[int, list[dict[str, float]]]:
    """Resume from the latest checkpoint (same fingerprint) or seed a fresh run. Returns (step, history)."""
    if ckpt.latest() is None:
        seed_everything(trainer.seed + trainer.rank)
        return 0, []
    step, state = ckpt.load(trainer.saved)
    if state["fingerprint"] != trainer.fingerprint:
        raise ValueError(
            f"{ckpt.out.uri} holds a run with other settings or data (fingerprint "
            f"{state['fingerprint']} ≠ {trainer.fingerprint}); rerun with --overwrite to start over "
            "(deltaedit run <flow> --overwrite; for the demo: deltaedit demo --overwrite)"
        )
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.restore(state)
    if "rng" in state:  # diffusion checkpoints from before the shared loop have none
        set_rng_state(state["rng"])
    if trainer.rank:
        seed_everything(trainer.seed + trainer.rank + step)  # only rank 0's RNGs are saved
    return step, list(state["history"])
