"""Delta Mapper training loop: pairs → Δs regression, validation, checkpoints, exact resume.

DeltaEdit (CVPR 2023, §3.3): for two codes s₁, s₂ with CLIP image embeddings i₁, i₂ the mapper sees
(s₁, i₁, Δi = i₂ − i₁) and regresses Δs = s₂ − s₁ (unnormalised) with
    loss = w_mse · MSE(Δŝ, Δs) + w_cos · (1 − cos(Δŝ, Δs))            (official: both weights 1)
and Adam at lr 0.5 (EqualLinear's lr_mul 0.01 makes the effective step 0.005). The "straightforward"
baseline sees (s₁, i₁, i₂) instead.

Checkpoints under ``<root>/mapper/``: ``step-XXXXXXXX.safetensors`` (weights + config, loadable by
``DeltaMapper.from_checkpoint``), ``step-XXXXXXXX.state.pt`` (optimizer, every RNG, sampler position,
validation history; tensors and plain values only, so ``torch.load(weights_only=True)`` reads it),
``latest.json`` written last, and ``mapper.safetensors`` when training completes. The data order is a
function of the step, so restoring the step, weights, optimizer and RNGs reproduces an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from infra.config import TrainMapperConfig
from infra.storage.fsio import Location
from models.delta_mapper import DeltaMapper, MapperConfig, StraightforwardMapper
from tasks.checkpoints import Checkpointer, rng_state, seed_everything, set_rng_state
from tasks.mapper_data import PairSampler, RowCache, nearest_rows, validation_pairs

MODELS: dict[str, type[DeltaMapper]] = {"delta": DeltaMapper, "straightforward": StraightforwardMapper}
FINAL = "mapper.safetensors"


def build_model(kind: str, config: MapperConfig, seed: int) -> DeltaMapper:
    """A freshly initialised mapper; the seed alone fixes its weights."""
    torch.manual_seed(seed)
    return MODELS[kind](config)


def mapper_config(cache: RowCache) -> MapperConfig:
    """The mapper for the generator that produced the cached codes (layout from the store metadata)."""
    if not cache.meta.get("layout"):
        raise ValueError(f"{cache.folder}: the codes store records no generator layout")
    return MapperConfig(layout=cache.meta["layout"], clip_dim=cache.clip_dim)


def mapper_inputs(kind: str, s1: torch.Tensor, i1: torch.Tensor, i2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(s₁, i₁, Δi) for the Delta Mapper, (s₁, i₁, i₂) for the straightforward baseline."""
    return (s1, i1, i2 - i1) if kind == "delta" else (s1, i1, i2)


def pair_loss(pred: torch.Tensor, target: torch.Tensor, mse_weight: float = 1.0,
              cos_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean cosine) of predicted vs true Δs, both (B, S)."""
    cos = F.cosine_similarity(pred, target, dim=1).mean()
    return mse_weight * F.mse_loss(pred, target) + cos_weight * (1 - cos), cos


def run_fingerprint(tm: TrainMapperConfig, seed: int, config: MapperConfig, cache: RowCache, world: int) -> str:
    """What a resumed run must share with the run it continues (steps and intervals may change)."""
    keys = {"model": tm.model, "lr": tm.lr, "betas": list(tm.betas), "batch": tm.batch_size,
            "mse": tm.mse_weight, "cos": tm.cos_weight, "seed": seed, "world": world,
            "local_partners": tm.local_partners, "neighbours": tm.neighbours if tm.local_partners else None,
            "mapper": config.to_dict(), "data": cache.meta["fingerprint"]}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


# --- training ------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: DeltaMapper, kind: str, cache: RowCache, pairs: tuple[np.ndarray, np.ndarray],
             batch_size: int, mse_weight: float = 1.0, cos_weight: float = 1.0) -> dict[str, float]:
    """Mean loss and cosine over fixed validation pairs."""
    total = {"val_loss": 0.0, "val_cos": 0.0}
    n = len(pairs[0])
    for lo in range(0, n, batch_size):
        device = next(model.parameters()).device
        s1, i1, s2, i2 = (t.to(device) for t in (*cache.fetch(pairs[0][lo:lo + batch_size]),
                                                 *cache.fetch(pairs[1][lo:lo + batch_size])))
        loss, cos = pair_loss(model(*mapper_inputs(kind, s1, i1, i2)), s2 - s1, mse_weight, cos_weight)
        total["val_loss"] += float(loss) * len(s1)
        total["val_cos"] += float(cos) * len(s1)
    return {k: v / max(n, 1) for k, v in total.items()}


def _fetch_pair(cache: RowCache, sampler: PairSampler, step: int) -> tuple[torch.Tensor, ...]:
    primary, partner = sampler.batch(step)
    return (*cache.fetch(primary), *cache.fetch(partner))


def fit(tm: TrainMapperConfig, seed: int, cache: RowCache, out: Location, *, rank: int = 0, world: int = 1,
        wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None, stop_at: int | None = None,
        device: str = "cpu", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume) to ``tm.steps``; ``stop_at`` ends this call early without a checkpoint (a kill)."""
    if tm.threads:
        torch.set_num_threads(tm.threads)
    config = mapper_config(cache)
    model = build_model(tm.model, config, seed).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tm.lr, betas=tm.betas)
    ckpt, fp = Checkpointer(out, FINAL, tm.keep_checkpoints), run_fingerprint(tm, seed, config, cache, world)
    step, history = _start(ckpt, model, opt, fp, seed, rank)
    net = wrap(model) if wrap else model
    neighbours = nearest_rows(cache, tm.neighbours) if tm.local_partners else None
    sampler = PairSampler(cache.train_rows, tm.batch_size, seed, rank, world, neighbours, tm.local_partners)
    val = validation_pairs(cache.val_rows, tm.val_pairs, seed) if rank == 0 and cache.val_rows.size else None
    start, began, last, saving = step, time.perf_counter(), {}, 0.0
    with ThreadPoolExecutor(1) as pool:                 # read step+1 while step trains
        pending = pool.submit(_fetch_pair, cache, sampler, step)
        while step < tm.steps and (stop_at is None or step < stop_at):
            s1, i1, s2, i2 = (t.to(device, non_blocking=True) for t in pending.result())
            if step + 1 < tm.steps:
                pending = pool.submit(_fetch_pair, cache, sampler, step + 1)
            loss, cos = pair_loss(net(*mapper_inputs(tm.model, s1, i1, i2)), s2 - s1, tm.mse_weight, tm.cos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            last = {"step": step, "loss": loss.item(), "cos": cos.item()}
            if val is not None and (step % tm.val_every == 0 or step == tm.steps):
                history.append({"step": step, **evaluate(model, tm.model, cache, val, tm.batch_size,
                                                         tm.mse_weight, tm.cos_weight)})
                log(f"[train-mapper] step {step}: loss {last['loss']:.4f} cos {last['cos']:.3f} "
                    f"val_loss {history[-1]['val_loss']:.4f} val_cos {history[-1]['val_cos']:.3f}")
            if rank == 0 and (step % tm.checkpoint_every == 0 or step == tm.steps):
                state = {"step": step, "optimizer": opt.state_dict(), "rng": rng_state(),
                         "sampler": sampler.state(step), "fingerprint": fp, "history": history}
                t0 = time.perf_counter()
                ckpt.save(step, model, state, final=step == tm.steps)
                saving += time.perf_counter() - t0
    seconds = time.perf_counter() - began
    training = seconds - saving                          # steps/s of data + step, checkpoint I/O apart
    return {"start_step": start, "step": step, "ran": step - start, "done": step >= tm.steps, **last,
            "val": history[-1] if history else None, "seconds": round(seconds, 3),
            "checkpoint_seconds": round(saving, 3),
            "steps_per_s": round((step - start) / training, 3) if training > 0 else None,
            "rows": len(cache), "train_rows": int(cache.train_rows.size), "val_rows": int(cache.val_rows.size),
            "checkpoint": out.url(FINAL) if step >= tm.steps else None}


def _start(ckpt: Checkpointer, model: DeltaMapper, opt: torch.optim.Optimizer, fp: str, seed: int,
           rank: int) -> tuple[int, list[dict[str, float]]]:
    """Resume from the latest checkpoint (same fingerprint) or seed a fresh run. Returns (step, history)."""
    if ckpt.latest() is None:
        seed_everything(seed + rank)
        return 0, []
    step, state = ckpt.load(model)
    if state["fingerprint"] != fp:
        raise ValueError(f"{ckpt.out.uri} holds a run with other settings or data (fingerprint "
                         f"{state['fingerprint']} ≠ {fp}); rerun with overwrite to start over")
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    if rank:
        seed_everything(seed + rank + step)             # only rank 0's RNGs are saved; the loop draws none
    return step, list(state["history"])
