"""DeltaEdit-D training loop: ε-prediction conditioned on the style code, EMA, checkpoints, exact resume.

DeltaSpace (TPAMI, §4.2): the U-Net ε_θ(x_t, t, s) learns to denoise images x₀ given their StyleGAN2 style
code s, with the "simple" objective |ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t, s)| (L1), AdamW (lr 1e-4, weight
decay 0.01) and an exponential moving average of the weights, which is the model that samples.

Checkpoints under ``<root>/diffusion/`` (``tasks.checkpoints``): ``step-XXXXXXXX.safetensors`` holds the
EMA model (what ``StyleUNet.from_checkpoint`` and bulk-edit load), the ``.state.pt`` sidecar the raw
weights, the optimizer and the validation history; ``diffusion.safetensors`` when training completes.
Every random draw of step k (its batch, t and ε) is a pure function of (seed, rank, k), so restoring the
step, both weight sets and the optimizer reproduces an uninterrupted run.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from infra.config import TrainDiffusionConfig
from infra.storage.fsio import Location
from models.diffusion import DiffusionConfig, StyleUNet, simple_loss
from tasks.checkpoints import Checkpointer
from tasks.diffusion_data import ImageCache
from tasks.row_cache import EpochSampler

FINAL = "diffusion.safetensors"


def model_config(dc: TrainDiffusionConfig, cache: ImageCache) -> DiffusionConfig:
    """The U-Net for the cached images and the generator that produced their codes."""
    if not cache.meta.get("layout"):
        raise ValueError(f"{cache.folder}: the codes store records no generator layout")
    channels, height, width = cache.image_shape
    if height != width:
        raise ValueError(f"{cache.folder}: images are {width}×{height}; the U-Net needs square images")
    return DiffusionConfig(layout=cache.meta["layout"], image_size=height, in_channels=channels,
                           **dc.model.model_dump())


def build_model(config: DiffusionConfig, cache: ImageCache, seed: int) -> StyleUNet:
    """A freshly initialised U-Net (the seed alone fixes its weights) that standardises s like the data."""
    torch.manual_seed(seed)
    model = StyleUNet(config)
    model.set_style_stats(*cache.style_stats())
    return model


TRAIN_STREAM, VALIDATION_STREAM = 2, 3


def step_noise(seed: int, rank: int, step: int, x0: torch.Tensor, timesteps: int, stream: int = TRAIN_STREAM
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(t (B,), ε like x₀) of one training step: a pure function of (seed, rank, step, stream)."""
    g = torch.Generator().manual_seed(int(np.random.default_rng([seed, rank, step, stream]).integers(2 ** 62)))
    return torch.randint(0, timesteps, (x0.shape[0],), generator=g), torch.randn(x0.shape, generator=g)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema ← d·ema + (1 − d)·model with d = min(decay, (1 + step)/(10 + step)): short runs average less."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1 - d)


@torch.no_grad()
def validation_loss(model: StyleUNet, cache: ImageCache, rows: np.ndarray, batch_size: int, seed: int) -> float:
    """Mean simple loss over fixed held-out images with fixed t and ε (comparable across steps and runs)."""
    device = next(model.parameters()).device
    total = 0.0
    for lo in range(0, len(rows), batch_size):
        s, x0 = cache.fetch(rows[lo:lo + batch_size])
        t, noise = step_noise(seed, 0, lo, x0, model.config.timesteps, VALIDATION_STREAM)
        loss = simple_loss(model, x0.to(device), s.to(device), t.to(device), noise.to(device))
        total += float(loss) * len(s)
    return total / max(len(rows), 1)


def run_fingerprint(dc: TrainDiffusionConfig, seed: int, config: DiffusionConfig, cache: ImageCache,
                    world: int) -> str:
    """What a resumed run must share with the run it continues (steps and intervals may change)."""
    keys = {"lr": dc.lr, "warmup": dc.warmup_steps, "wd": dc.weight_decay, "betas": list(dc.betas),
            "batch": dc.batch_size, "clip": dc.grad_clip, "ema": dc.ema_decay, "seed": seed, "world": world,
            "model": config.to_dict(), "data": cache.meta["fingerprint"]}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def fit(dc: TrainDiffusionConfig, seed: int, cache: ImageCache, out: Location, *, rank: int = 0, world: int = 1,
        wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None, stop_at: int | None = None,
        device: str = "cpu", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume) to ``dc.steps``; ``stop_at`` ends this call early without a checkpoint (a kill)."""
    if dc.threads:
        torch.set_num_threads(dc.threads)
    config = model_config(dc, cache)
    model = build_model(config, cache, seed).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=dc.lr, betas=dc.betas, weight_decay=dc.weight_decay)
    ckpt, fp = Checkpointer(out, FINAL, dc.keep_checkpoints), run_fingerprint(dc, seed, config, cache, world)
    step, history = _start(ckpt, model, ema, opt, fp)
    net = wrap(model) if wrap else model
    sampler = EpochSampler(cache.train_rows, dc.batch_size, seed, rank, world)
    val = np.random.default_rng([seed, 7919]).permutation(cache.val_rows)[:dc.val_images] if rank == 0 else None
    start, began, last, saving = step, time.perf_counter(), {}, 0.0
    with ThreadPoolExecutor(1) as pool:                 # read step+1 while step trains
        pending = pool.submit(cache.fetch, sampler.batch(step))
        while step < dc.steps and (stop_at is None or step < stop_at):
            s, x0 = pending.result()
            if step + 1 < dc.steps:
                pending = pool.submit(cache.fetch, sampler.batch(step + 1))
            t, noise = step_noise(seed, rank, step, x0, config.timesteps)
            for group in opt.param_groups:                # warm-up: a function of the step, so resume-safe
                group["lr"] = dc.lr * min(1.0, (step + 1) / dc.warmup_steps) if dc.warmup_steps else dc.lr
            loss = simple_loss(net, *(v.to(device) for v in (x0, s, t, noise)), schedule=model.schedule)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if dc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), dc.grad_clip)
            opt.step()
            update_ema(ema, model, dc.ema_decay, step)
            step += 1
            last = {"step": step, "loss": loss.item()}
            if val is not None and val.size and (step % dc.val_every == 0 or step == dc.steps):
                history.append({"step": step, "val_loss": validation_loss(ema, cache, val, dc.batch_size, seed)})
                log(f"[train-diffusion] step {step}: loss {last['loss']:.4f} "
                    f"val_loss (EMA) {history[-1]['val_loss']:.4f}")
            if rank == 0 and (step % dc.checkpoint_every == 0 or step == dc.steps):
                state = {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "sampler": sampler.state(step), "fingerprint": fp, "history": history}
                t0 = time.perf_counter()
                ema.lineage = {"trained_by": "deltaedit run train-diffusion", "step": step, "seed": seed,
                               "workers": world, "data": cache.meta["fingerprint"], "counts": cache.meta["counts"],
                               "settings": dc.model_dump(mode="json", exclude={"cache_dir", "threads"})}
                ckpt.save(step, ema, state, final=step == dc.steps)
                saving += time.perf_counter() - t0
    seconds = time.perf_counter() - began
    training = seconds - saving
    return {"start_step": start, "step": step, "ran": step - start, "done": step >= dc.steps, **last,
            "val": history[-1] if history else None, "seconds": round(seconds, 3),
            "checkpoint_seconds": round(saving, 3),
            "steps_per_s": round((step - start) / training, 3) if training > 0 else None,
            "rows": len(cache), "train_rows": int(cache.train_rows.size), "val_rows": int(cache.val_rows.size),
            "checkpoint": out.url(FINAL) if step >= dc.steps else None}


def _start(ckpt: Checkpointer, model: StyleUNet, ema: StyleUNet, opt: torch.optim.Optimizer,
           fp: str) -> tuple[int, list[dict[str, float]]]:
    """Resume from the latest checkpoint (same fingerprint) or start fresh. Returns (step, history)."""
    if ckpt.latest() is None:
        return 0, []
    step, state = ckpt.load(ema)
    if state["fingerprint"] != fp:
        raise ValueError(f"{ckpt.out.uri} holds a run with other settings or data (fingerprint "
                         f"{state['fingerprint']} ≠ {fp}); rerun with overwrite to start over")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return step, list(state["history"])
