"""Train the attribute oracle on fresh renders: ``python -m models.toy.train_oracle --out PATH --steps N``.

Every step renders a new batch (no dataset to store), then blurs, adds noise and shifts brightness
at random so the oracle reads a generator's imperfect outputs as well as clean renders. One CPU
thread, seeded torch and numpy: the same seed gives the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.toy.domain import NAMES, render_batch, render_random, to_tensor
from models.toy.oracle import DEFAULT_PATH, HELD_OUT_SEED, Oracle, OracleConfig, evaluate

_STREAM = 0x7E41  # numpy stream tag of training renders: [seed, _STREAM, 1] never equals a render_batch seed


def augment(
    x: torch.Tensor, gen: torch.Generator, max_blur: float = 1.2, max_noise: float = 0.08
) -> torch.Tensor:
    """Per image, each with probability 1/2: gaussian blur (σ ≤ max_blur px), gaussian noise, brightness/contrast.

    x: float (B, 3, H, W) in [-1, 1]; returns the same shape, clamped to [-1, 1].
    """
    b = len(x)
    coin = torch.rand(b, 3, generator=gen) < 0.5  # which images get which augmentation
    sigma = torch.rand(b, generator=gen) * max_blur * coin[:, 0]
    x = _blur(x, sigma)
    noise = torch.rand(b, 1, 1, 1, generator=gen) * max_noise * coin[:, 1, None, None, None]
    x = x + noise * torch.randn(x.shape, generator=gen)
    gain = 1 + 0.1 * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1) * coin[:, 2, None, None, None]
    shift = 0.05 * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1) * coin[:, 2, None, None, None]
    return (x * gain + shift).clamp(-1, 1)


def _blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Separable gaussian blur with one σ per image (σ = 0 leaves the image unchanged)."""
    b, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B·C, 2r+1)
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def train_oracle(
    steps: int = 1500,
    batch_size: int = 128,
    seed: int = 0,
    out_path: str | None = DEFAULT_PATH,
    lr: float = 3e-3,
    config: OracleConfig = OracleConfig(),
    eval_n: int = 1000,
    log_every: int = 100,
) -> dict[str, Any]:
    """Train from scratch, evaluate on held-out renders, save to ``out_path`` (None: don't save).

    Returns metrics: ``accuracy`` (clean held-out renders), ``accuracy_augmented`` (the same renders
    blurred/noised), ``train_seconds``, ``steps``, ``batch_size``, ``seed``, ``final_loss``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model: one core is enough and leaves the rest free
    try:
        torch.manual_seed(seed)
        oracle = Oracle(config)
        start = time.perf_counter()
        loss = _fit(oracle, steps, batch_size, seed, lr, log_every)
        seconds = time.perf_counter() - start
        oracle.eval()
        metrics = {
            "accuracy": evaluate(oracle, eval_n),
            "accuracy_augmented": _evaluate_augmented(oracle, eval_n),
            "train_seconds": round(seconds, 1),
            "steps": steps,
            "batch_size": batch_size,
            "seed": seed,
            "final_loss": round(loss, 5),
            "held_out_seed": HELD_OUT_SEED,
            "eval_n": eval_n,
        }
        if out_path:
            oracle.save(out_path, lineage=metrics | {"lr": lr})
        return metrics
    finally:
        torch.set_num_threads(threads)


def _fit(
    oracle: Oracle, steps: int, batch_size: int, seed: int, lr: float, log_every: int
) -> float:
    """Adam with a cosine learning-rate decay; the loss is the sum of one cross-entropy per attribute."""
    rng = np.random.default_rng([seed, _STREAM, 1])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(oracle.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))
    )
    oracle.train()
    running = 0.0
    for step in range(steps):
        images, labels = render_random(rng, batch_size)
        x, y = augment(to_tensor(images), gen), torch.from_numpy(labels)
        logits = oracle(x)
        loss = sum(F.cross_entropy(logits[n], y[:, k]) for k, n in enumerate(NAMES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {running:.4f}", flush=True)
    return running


def _evaluate_augmented(oracle: Oracle, n: int) -> dict[str, float]:
    """Held-out accuracy after the training augmentations: robustness to generator-like blur and noise."""
    images, truth = render_batch(n, HELD_OUT_SEED)
    x = augment(to_tensor(images), torch.Generator().manual_seed(HELD_OUT_SEED))
    return oracle.accuracy(x, truth)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_PATH, help="checkpoint path or fsspec URI")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    metrics = train_oracle(args.steps, args.batch_size, args.seed, args.out, lr=args.lr)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
