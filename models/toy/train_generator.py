"""Train the toy StyleGAN2 generator on a CPU: as the decoder of a variational autoencoder.

A GAN needs tens of thousands of steps and a discriminator; on two CPU cores that is hours. A VAE whose
decoder is the StyleGAN2 generator trains in minutes and gives what the pipeline needs: a synthesis
network with a real S space, and a mapping network that turns z ~ N(0, I) into domain samples.

    x ──ZEncoder──▶ (μ, log σ²) ──z = μ + σ·ε──▶ G.mapping(z) = w ──G──▶ x̂
    loss = |x̂ − x|₁ + MSE(x̂, x) + β · KL(q(z|x) ‖ N(0, I))          (Kingma & Welling 2014, eq. 10)

The KL term makes the encoded z fill the prior, so ``G(G.mapping(randn))`` samples the domain; the
mapping network is trained end to end (built with ``lr_mlp=1`` so Adam moves it at the full rate).
Every step renders a fresh batch; nothing is stored. Also tried: regressing G directly on the renderer's
own uniform draws (z[:13] = Φ⁻¹(u)): exact prior by construction, but the mapping network must learn
the value bins as step functions and after 150 steps had learnt almost nothing (MSE 0.44 vs 0.07).
The z-encoder is a training aid; its posterior means also supervise the e4e encoder (train_encoder).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.stylegan2 import Generator
from models.toy.domain import ATTRIBUTES, NAMES, render_batch, render_random, to_tensor
from models.toy.oracle import Oracle

STREAM = 0x6E47                 # numpy stream tag of training renders: default_rng([seed, STREAM, phase])
RECON_SEED = 7_700_101          # render_batch seed of held-out reconstruction checks (never trained on)


@dataclass(frozen=True)
class ToyGeneratorConfig:
    """Architecture and schedule of the toy generator run."""

    style_dim: int = 64                       # width of z, w and every modulation input
    n_mlp: int = 4                            # mapping layers
    channels: dict[int, int] = field(default_factory=lambda: {4: 128, 8: 128, 16: 64, 32: 32, 64: 16})
    enc_width: int = 32                       # first conv width of the z-encoder (doubles twice)
    steps: int = 2500                         # optimiser steps (fewer if the time budget runs out)
    batch_size: int = 32
    lr: float = 2e-3
    beta: float = 1e-4                        # KL weight per nat, against per-pixel mean losses
    warmup: int = 200                         # steps over which β ramps up from 0


class ZEncoder(nn.Module):
    """Four stride-2 convs (64 → 4 px), flatten, linear → (μ, log σ²) of z, (B, style_dim) each."""

    def __init__(self, style_dim: int, width: int = 32, image_size: int = 64) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        self.features = nn.Sequential(*[layer for cin, cout in zip(chans[:-1], chans[1:])
                                        for layer in (nn.Conv2d(cin, cout, 3, 2, 1), nn.SiLU())])
        side = image_size // 16
        self.head = nn.Linear(chans[-1] * side * side, 2 * style_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.features(x).flatten(1)).chunk(2, dim=1)
        return mu, logvar.clamp(-12, 4)


def build_generator(config: ToyGeneratorConfig) -> Generator:
    return Generator(64, style_dim=config.style_dim, n_mlp=config.n_mlp, channels=config.channels, lr_mlp=1.0)


def train_generator(config: ToyGeneratorConfig = ToyGeneratorConfig(), seed: int = 0,
                    seconds_budget: float | None = None, log_every: int = 100
                    ) -> tuple[Generator, ZEncoder, dict[str, Any]]:
    """Fit G and the z-encoder; set ``G.latent_avg`` to the mean mapped w. Returns (G, zenc, lineage)."""
    torch.manual_seed(seed)
    G, zenc = build_generator(config), ZEncoder(config.style_dim, config.enc_width)
    rng = np.random.default_rng([seed, STREAM, 0])
    opt = torch.optim.Adam(list(G.parameters()) + list(zenc.parameters()), lr=config.lr, betas=(0.5, 0.99))
    steps, start, step, avg = config.steps, time.perf_counter(), 0, {}
    G.train(), zenc.train()
    for step in range(steps):
        frac = min(1.0, (time.perf_counter() - start) / seconds_budget) if seconds_budget else 0.0
        progress = max(step / steps, frac)
        if progress >= 1.0:
            break
        for g in opt.param_groups:   # cosine decay over whichever of steps / time runs out first
            g["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * progress))
        x = to_tensor(render_random(rng, config.batch_size)[0])                 # (B, 3, 64, 64)
        mu, logvar = zenc(x)                                                     # (B, D) each
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        x_hat = G(G.mapping(z), noise_mode="none")
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()        # nats per image
        l1, l2 = (x_hat - x).abs().mean(), F.mse_loss(x_hat, x)
        beta = config.beta * min(1.0, step / max(config.warmup, 1))
        opt.zero_grad(set_to_none=True)
        (l1 + l2 + beta * kl).backward()
        opt.step()
        track_losses(avg, {"l1": l1, "mse": l2, "kl": kl}, step, log_every, "generator", start)
    G.eval(), zenc.eval()
    G.latent_avg = G.mean_latent(4096, seed=seed)
    lineage = {"method": "vae_decoder", "seed": seed, "steps": step + 1 if steps else 0,
               "seconds": round(time.perf_counter() - start, 1), "config": _jsonable(asdict(config)),
               "final": {k: round(v, 5) for k, v in avg.items()}}
    return G, zenc, lineage


@torch.no_grad()
def sample_images(G: Generator, n: int, seed: int, batch_size: int = 256) -> torch.Tensor:
    """G(mapping(z)) for n z ~ N(0, I) drawn from ``seed``: (n, 3, 64, 64), clamped to [-1, 1]."""
    z = torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(seed))
    return torch.cat([G(G.mapping(z[i:i + batch_size])).clamp(-1, 1) for i in range(0, n, batch_size)])


def marginals(oracle: Oracle, images: torch.Tensor) -> dict[str, list[float]]:
    """Per attribute, the fraction of images the oracle reads as each value (``ATTRIBUTES`` order)."""
    pred = oracle.predict(images)
    return {a: (torch.bincount(pred[a], minlength=len(v)).float() / len(images)).tolist()
            for a, v in ATTRIBUTES.items()}


def total_variation_from_uniform(freqs: dict[str, list[float]]) -> dict[str, float]:
    """½ Σ |p − 1/k| per attribute: 0 = exactly the renderer's uniform distribution."""
    return {a: round(0.5 * sum(abs(p - 1 / len(f)) for p in f), 4) for a, f in freqs.items()}


@torch.no_grad()
def evaluate_samples(G: Generator, oracle: Oracle, n: int = 1000, seed: int = 1234) -> dict[str, Any]:
    """Coverage and marginals of random samples as read by the oracle."""
    freqs = marginals(oracle, sample_images(G, n, seed))
    return {"n": n, "seed": seed, "tv": total_variation_from_uniform(freqs),
            "min_freq": {a: round(min(f), 4) for a, f in freqs.items()},
            "freqs": {a: [round(p, 4) for p in f] for a, f in freqs.items()}}


@torch.no_grad()
def attribute_agreement(oracle: Oracle, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Per attribute, the fraction of pairs on which the oracle reads the same value in x and y."""
    px, py = oracle.predict(x), oracle.predict(y)
    return {a: round(float((px[a] == py[a]).float().mean()), 4) for a in NAMES}


@torch.no_grad()
def evaluate_vae(G: Generator, zenc: ZEncoder, oracle: Oracle, n: int = 500) -> dict[str, float]:
    """Oracle agreement between held-out renders and their VAE reconstructions G(mapping(mu))."""
    x = to_tensor(render_batch(n, RECON_SEED)[0])
    return attribute_agreement(oracle, x, G(G.mapping(zenc(x)[0])).clamp(-1, 1))


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: ({str(a): b for a, b in v.items()} if isinstance(v, dict) else v) for k, v in d.items()}


def track_losses(avg: dict[str, float], losses: dict[str, torch.Tensor], step: int, log_every: int,
                 tag: str, start: float) -> None:
    """Update exponential moving averages of the losses in ``avg``; print them every ``log_every`` steps."""
    for k, v in losses.items():
        avg[k] = 0.9 * avg.get(k, v.item()) + 0.1 * v.item()
    if log_every and (step + 1) % log_every == 0:
        print(f"[{tag}] step {step + 1} " + " ".join(f"{k} {v:.4f}" for k, v in avg.items())
              + f" {time.perf_counter() - start:.0f}s", flush=True)
