"""Train the toy e4e-style encoder (image → W+) for a frozen toy generator.

Loss per batch of fresh renders x (Tov et al. 2021, "Designing an Encoder for StyleGAN Image
Manipulation", eq. 3–4, with the discriminator dropped):

    W+ = E(x) = w₀ + Δᵢ (+ latent_avg)
    L = |G(W+) − x|₁ + MSE(G(W+), x)                   pixels
      + λ_w · mean‖W+ − w‖²                              stay where the generator was trained: the
                                                        renders come from z ~ N(0, I) and w = mapping(z)
                                                        exactly (train_generator)
      + λ_Δ · mean‖Δᵢ‖²                                  e4e's delta regularisation: rows stay close to w₀

The w term is a distillation target the e4e recipe cannot have (a GAN has no encoder); here it makes
a few minutes of CPU enough and keeps inversions in the well-trained region of W.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from models.e4e import Encoder
from models.stylegan2 import Generator
from models.toy.domain import render_batch, to_tensor
from models.toy.train_generator import (
    RECON_SEED,
    STREAM,
    attribute_agreement,
    render_z,
    track_losses,
)


@dataclass(frozen=True)
class ToyEncoderConfig:
    backbone_blocks: tuple[int, ...] = (1, 1, 1, 1)
    widths: tuple[int, ...] = (16, 32, 32, 64)
    steps: int = 1000
    batch_size: int = 48
    lr: float = 1e-3
    lambda_w: float = 1.0  # pull towards the render's known w (per element, squared)
    lambda_delta: float = 0.05  # e4e's ‖Δᵢ‖² regulariser (per element)


def build_encoder(G: Generator, config: ToyEncoderConfig) -> Encoder:
    enc = Encoder(
        n_styles=G.n_latent,
        style_dim=G.style_dim,
        input_size=G.size,
        backbone_blocks=config.backbone_blocks,
        widths=config.widths,
        generator=G,
    )
    enc.latent_avg = G.latent_avg.detach().expand(G.n_latent, -1).clone()
    return enc


def train_encoder(
    G: Generator,
    config: ToyEncoderConfig = ToyEncoderConfig(),
    seed: int = 0,
    seconds_budget: float | None = None,
    log_every: int = 100,
    probe_every: int = 0,
    oracle: Any = None,
) -> tuple[Encoder, dict[str, Any]]:
    """Fit the encoder with G frozen; returns (Encoder with G inside, lineage).

    The renders are drawn from z ~ N(0, I) through ``render_z``, so the latent target is the exact
    w = mapping(z).
    """
    torch.manual_seed(seed)
    G.requires_grad_(False)
    G.eval()
    gen = torch.Generator().manual_seed(seed * 7919 + STREAM + 1)
    enc = build_encoder(G, config)
    net = enc.encoder.train()
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    start, step, avg = time.perf_counter(), 0, {}
    for step in range(config.steps):
        frac = min(1.0, (time.perf_counter() - start) / seconds_budget) if seconds_budget else 0.0
        progress = max(step / config.steps, frac)
        if progress >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * progress))
        with torch.no_grad():
            z = torch.randn(config.batch_size, G.style_dim, generator=gen)
            x = render_z(z)[0]  # (B, 3, 64, 64)
            w = G.mapping(z)  # (B, style_dim): exact
        offsets = net(x)  # (B, n_latent, style_dim)
        w_plus = offsets + enc.latent_avg
        x_hat = G(w_plus, noise_mode="none")
        pix = (x_hat - x).abs().mean() + F.mse_loss(x_hat, x)
        lat = (w_plus - w[:, None]).pow(2).mean()
        delta = (offsets[:, 1:] - offsets[:, :1]).pow(2).mean()
        loss = pix + config.lambda_w * lat + config.lambda_delta * delta
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        track_losses(
            avg, {"pix": pix, "lat": lat, "delta": delta}, step, log_every, "encoder", start
        )
        if probe_every and oracle is not None and (step + 1) % probe_every == 0:
            net.eval()
            with torch.no_grad():
                xp = to_tensor(render_batch(200, RECON_SEED)[0])
                agree = attribute_agreement(oracle, xp, G(enc(xp)).clamp(-1, 1))
            print(f"[encoder] step {step + 1} inversion agree {agree}", flush=True)
            net.train()
    enc.eval()
    G.requires_grad_(True)
    lineage = {
        "seed": seed,
        "steps": step + 1 if config.steps else 0,
        "config": asdict(config),
        "seconds": round(time.perf_counter() - start, 1),
        "final": {k: round(v, 5) for k, v in avg.items()},
    }
    return enc, lineage
