"""Train the toy StyleGAN2 generator on a CPU, without a discriminator.

A GAN needs tens of thousands of steps and a discriminator; on two CPU cores that is hours. Two
supervised routes train in minutes and give what the pipeline needs: a synthesis network with a real S
space, and a mapping network that turns z ~ N(0, I) into domain samples.

``method="prior"`` (default, the shipped weights): a fitted prior. The renderer draws from 13 uniforms;
``z_to_uniforms`` reads them off z ~ N(0, I) (attribute a = angle of the pair z[2a:2a+2] as a fraction of
the turn, which PixelNorm leaves unchanged; jitter j = Φ(z[10+j]); z[18:] unused), so x = render(z) and

    loss = w_fg · (|G(mapping(z)) − x|₁ + (G(mapping(z)) − x)²)          per pixel, shape pixels ×(1+fg_weight)
         + λ_w · (Σ CE(head(w), attribute) / 5 + MSE(head(w), jitter))    linear heads on w, discarded

Sampling z ~ N(0, I) is the domain's distribution by construction, and the encoder gets the exact
w = mapping(z) of every training render as supervision. Three aids were needed (measured, 64 px, batch 32):
the first mapping layer's weights on z[18:] are zero and kept zero (else after 750 steps the samples
were at chance on every attribute, the mapping busy suppressing 46 nuisance dims); the mapping gets
lr 1e-2 (equalised-lr weights move slowly); the heads on w (without them the mapping carried the attributes
but G after 1000 steps still drew only the background: a saddle, the synthesis ignoring w). Even so
the synthesis learns slowly: after 5000 steps (25 min, one thread) colour, background and position are
drawn, shape and size mostly not.

``method="vae"`` (the earlier route): the decoder of a VAE. x ──ZEncoder──▶ (μ, log σ²) ──z──▶
G(mapping(z)); loss |x̂ − x|₁ + MSE + β·KL (Kingma & Welling 2014, eq. 10). Its KL settled at ~140 nats,
far from the prior, so prior samples were colour blobs (sample TV up to 0.64).
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
from models.toy.domain import _N_UNIFORMS, ATTRIBUTES, NAMES, _params, _rasterize, render_batch, render_random, \
    to_tensor, uniforms_to_indices
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
    steps: int = 5000                         # optimiser steps (fewer if the time budget runs out)
    batch_size: int = 32
    lr: float = 3e-3                          # synthesis (and, for "vae", everything); 2e-3 was used for vae
    beta: float = 1e-4                        # KL weight per nat, against per-pixel mean losses
    warmup: int = 200                         # steps over which β ramps up from 0
    method: str = "prior"                     # "prior": regress on the renderer's own draws; "vae": VAE decoder
    lr_mapping: float = 1e-2                  # prior method: Adam lr of the mapping network
    lambda_w: float = 1.0                     # prior method: weight of the attribute heads on w (training aid)
    fg_weight: float = 4.0                    # prior method: extra pixel-loss weight on the shape's pixels


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


N_ATTR_DIMS = 2 * len(NAMES)             # z dims read as (cos, sin) pairs: one angle per attribute
N_PRIOR_DIMS = N_ATTR_DIMS + _N_UNIFORMS - len(NAMES)   # + one dim per jitter uniform; the rest is ignored


def z_to_uniforms(z: torch.Tensor) -> np.ndarray:
    """z (B, D ≥ 18) → the renderer's uniforms (B, 13): where z ~ N(0, I) they are i.i.d. U[0, 1).

    Attribute a is the angle of the pair (z[2a], z[2a+1]) as a fraction of the turn: uniform, and
    unchanged by the mapping network's PixelNorm (which rescales z), so value bins are sectors (rays through
    the origin) that a bias-free leaky-ReLU MLP draws easily. Jitter uniform j is Φ(z[10 + j]).
    """
    z = z.detach().double()
    pairs = z[:, :N_ATTR_DIMS].reshape(len(z), len(NAMES), 2)
    angle = torch.atan2(pairs[..., 1], pairs[..., 0])                     # (-π, π]
    u_attr = ((angle + math.pi) / (2 * math.pi)).clamp(0, 1 - 1e-9)
    u_jit = 0.5 * (1 + torch.erf(z[:, N_ATTR_DIMS:N_PRIOR_DIMS] / math.sqrt(2)))
    return torch.cat([u_attr, u_jit], 1).numpy()


def render_uniforms(u: np.ndarray, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The renderer on given uniforms (B, 13): images uint8 (B, size, size, 3) and labels (B, 5)."""
    idx = uniforms_to_indices(u)
    return _rasterize(_params(idx, u[:, len(NAMES):]), size), idx


def render_z(z: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """The render G(mapping(z)) should reproduce: float (B, 3, 64, 64) in [-1, 1], and its labels."""
    images, idx = render_uniforms(z_to_uniforms(z))
    return to_tensor(images), idx


def train_generator(config: ToyGeneratorConfig = ToyGeneratorConfig(), seed: int = 0,
                    seconds_budget: float | None = None, log_every: int = 100, probe_every: int = 0,
                    oracle: Oracle | None = None) -> tuple[Generator, ZEncoder | None, dict[str, Any]]:
    """Fit G (and for ``method="vae"`` the z-encoder); set ``G.latent_avg``. Returns (G, zenc, lineage)."""
    if config.method == "prior":
        return train_generator_prior(config, seed, seconds_budget, log_every, probe_every, oracle)
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


def train_generator_prior(config: ToyGeneratorConfig = ToyGeneratorConfig(), seed: int = 0,
                          seconds_budget: float | None = None, log_every: int = 100, probe_every: int = 0,
                          oracle: Oracle | None = None) -> tuple[Generator, None, dict[str, Any]]:
    """Supervised regression on the renderer's own draws: z ~ N(0, I), x = render(z_to_uniforms(z)),
    loss |G(mapping(z)) − x|₁ + MSE. The prior is the domain's distribution by construction."""
    torch.manual_seed(seed)
    G = build_generator(config)
    # z[N_PRIOR_DIMS:] does not change the render: the first mapping layer ignores it (zero weights, kept
    # zero), so the network need not learn to suppress a 46-dim nuisance subspace first.
    first = G.style[1].weight
    with torch.no_grad():
        first[:, N_PRIOR_DIMS:] = 0
    first.register_hook(lambda g: torch.cat([g[:, :N_PRIOR_DIMS], torch.zeros_like(g[:, N_PRIOR_DIMS:])], 1))
    gen = torch.Generator().manual_seed(seed * 7919 + STREAM)
    # Training aid, not saved: linear heads on w that read the attributes (cross-entropy) and the jitter
    # uniforms (MSE). They make the mapping compute the value bins from the start; without them the
    # synthesis sees uninformative w, learns the mean image, and gives the mapping no signal (a saddle).
    n_values = [len(ATTRIBUTES[n]) for n in NAMES]
    heads = nn.Linear(config.style_dim, sum(n_values) + N_PRIOR_DIMS - N_ATTR_DIMS)
    mapping = list(G.style.parameters()) + list(heads.parameters())
    synthesis = [p for n, p in G.named_parameters() if not n.startswith("style.")]
    opt = torch.optim.Adam([{"params": synthesis, "lr": config.lr, "base": config.lr},
                            {"params": mapping, "lr": config.lr_mapping, "base": config.lr_mapping}],
                           betas=(0.5, 0.99))
    steps, start, step, avg = config.steps, time.perf_counter(), 0, {}
    G.train()
    for step in range(steps):
        frac = min(1.0, (time.perf_counter() - start) / seconds_budget) if seconds_budget else 0.0
        progress = max(step / steps, frac)
        if progress >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = g["base"] * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * progress))
        z = torch.randn(config.batch_size, config.style_dim, generator=gen)
        u = z_to_uniforms(z)
        images, idx = render_uniforms(u)
        x = to_tensor(images)
        w = G.mapping(z)
        x_hat = G(w, noise_mode="none")
        # the shape covers 4–17 % of the image: weight its pixels up (background = the corner pixel's colour)
        fg = ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.1).float()
        weight = (1 + config.fg_weight * fg) / (1 + config.fg_weight * fg.mean())
        err = x_hat - x
        l1, l2 = (weight * err.abs()).mean(), (weight * err.pow(2)).mean()
        out, k, ce = heads(w), 0, 0.0
        for a, n in enumerate(n_values):
            ce = ce + F.cross_entropy(out[:, k:k + n], torch.from_numpy(idx[:, a])) / len(n_values)
            k += n
        jit = F.mse_loss(out[:, k:], torch.from_numpy(2 * u[:, len(NAMES):] - 1).float())
        opt.zero_grad(set_to_none=True)
        (l1 + l2 + config.lambda_w * (ce + jit)).backward()
        opt.step()
        track_losses(avg, {"l1": l1, "mse": l2, "ce_w": ce, "jit_w": jit}, step, log_every, "generator", start)
        if probe_every and oracle is not None and (step + 1) % probe_every == 0:
            G.eval()
            print(f"[generator] step {step + 1} samples agree {evaluate_prior_fit(G, oracle, 256)}", flush=True)
            G.train()
    G.eval()
    G.latent_avg = G.mean_latent(4096, seed=seed)
    lineage = {"method": "fitted_prior", "seed": seed, "steps": step + 1 if steps else 0,
               "seconds": round(time.perf_counter() - start, 1), "config": _jsonable(asdict(config)),
               "final": {k: round(v, 5) for k, v in avg.items()}}
    return G, None, lineage


@torch.no_grad()
def evaluate_prior_fit(G: Generator, oracle: Oracle, n: int = 500, seed: int = 4321) -> dict[str, float]:
    """Oracle agreement between G(mapping(z)) and the render G was fitted to, for n held-out z."""
    z = torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(seed))
    return attribute_agreement(oracle, render_z(z)[0], G(G.mapping(z)).clamp(-1, 1))


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
