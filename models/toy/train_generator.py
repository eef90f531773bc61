"""Train the toy StyleGAN2 generator on a CPU, without a discriminator: a fitted mapping, then a decoder.

A GAN needs tens of thousands of steps and a discriminator; on two CPU cores that is hours. Two supervised
fits give what the pipeline needs, a synthesis network with a real S space and a mapping network that turns
z ~ N(0, I) into domain samples:

1. **mapping** (z → w). ``z_to_uniforms`` reads the renderer's 13 uniforms off z ~ N(0, I) (attribute a =
   angle of the pair z[2a:2a+2] as a fraction of the turn, which PixelNorm leaves unchanged; jitter j =
   Φ(z[10+j]); z[18:] unused), so render(z) follows the domain's distribution by construction. The code of z
   is fixed: ``code(z) = [one-hot of each attribute value, jitter in [-1, 1]] · C``, C a seeded random
   (30, style_dim) matrix. The mapping network regresses code(z) (MSE, batches of 512, a few seconds per
   thousand steps).
2. **synthesis** (w → image), the mapping frozen: G(mapping(z)) regresses render(z) with L1 + MSE per pixel,
   the shape's pixels weighted ×(1 + fg_weight).

Sampling z ~ N(0, I) then samples the domain, and the encoder gets the exact w = mapping(z) of every training
render as a target. Why two fits (measured, 64 px, batch 32, one thread): trained jointly from pixels (the
earlier route, with linear attribute heads on w as a training aid) the mapping found the value sectors
slowly and the synthesis waited for it. After 500 steps the oracle read background, colour and position
right in 0.70 / 0.38 / 0.31 of samples; after 5000 steps shape and size were still at chance (0.26 / 0.43).
On exact codes the synthesis had 0.99 / 1.00 / 1.00 after 750 steps, and shape and size followed. The first
mapping layer's weights on z[18:] are zero and kept zero: those dims do not change the render.
(A VAE decoder was tried before that: its KL settled at ~140 nats, so prior samples were colour blobs.)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.stylegan2 import Generator
from models.toy.domain import (
    _N_UNIFORMS,
    ATTRIBUTES,
    NAMES,
    _params,
    _rasterize,
    to_tensor,
    uniforms_to_indices,
)
from models.toy.oracle import Oracle

STREAM = 0x6E47  # seed tag of training draws
RECON_SEED = 7_700_101  # render_batch seed of held-out reconstruction checks (never trained on)


@dataclass(frozen=True)
class ToyGeneratorConfig:
    """Architecture and schedule of the toy generator run."""

    style_dim: int = 64  # width of z, w and every modulation input
    n_mlp: int = 4  # mapping layers
    channels: dict[int, int] = field(
        default_factory=lambda: {4: 128, 8: 128, 16: 64, 32: 32, 64: 16}
    )
    mapping_steps: int = 6000  # mapping fit: Adam steps on code(z)
    mapping_batch_size: int = 512
    mapping_lr: float = 3e-2
    code_scale: float = 1 / 3  # C ~ N(0, code_scale²): w of unit-ish scale
    steps: int = 4000  # synthesis: optimiser steps (fewer if the time budget runs out)
    batch_size: int = 32
    lr: float = 1e-2
    fg_weight: float = 4.0  # extra pixel-loss weight on the shape's pixels
    exact_fraction: float = (
        0.5  # of each batch decoded from code(z) itself, the rest from mapping(z)
    )
    attribute_channels: bool = True  # each attribute owns a block of w and of every conv layer's
    #                                           channels; toRGB styles are constant (see style_blocks)


def build_generator(config: ToyGeneratorConfig) -> Generator:
    return Generator(
        64, style_dim=config.style_dim, n_mlp=config.n_mlp, channels=config.channels, lr_mlp=1.0
    )


N_ATTR_DIMS = 2 * len(NAMES)  # z dims read as (cos, sin) pairs: one angle per attribute
N_PRIOR_DIMS = (
    N_ATTR_DIMS + _N_UNIFORMS - len(NAMES)
)  # + one dim per jitter uniform; the rest is ignored
N_VALUES = [len(ATTRIBUTES[n]) for n in NAMES]


def z_to_uniforms(z: torch.Tensor) -> np.ndarray:
    """z (B, D ≥ 18) → the renderer's uniforms (B, 13): where z ~ N(0, I) they are i.i.d. U[0, 1).

    Attribute a is the angle of the pair (z[2a], z[2a+1]) as a fraction of the turn: uniform, and
    unchanged by the mapping network's PixelNorm (which rescales z), so value bins are sectors (rays through
    the origin) that a leaky-ReLU MLP draws easily. Jitter uniform j is Φ(z[10 + j]).
    """
    z = z.detach().double()
    pairs = z[:, :N_ATTR_DIMS].reshape(len(z), len(NAMES), 2)
    angle = torch.atan2(pairs[..., 1], pairs[..., 0])  # (-π, π]
    u_attr = ((angle + math.pi) / (2 * math.pi)).clamp(0, 1 - 1e-9)
    u_jit = 0.5 * (1 + torch.erf(z[:, N_ATTR_DIMS:N_PRIOR_DIMS] / math.sqrt(2)))
    return torch.cat([u_attr, u_jit], 1).numpy()


def render_uniforms(u: np.ndarray, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The renderer on given uniforms (B, 13): images uint8 (B, size, size, 3) and labels (B, 5)."""
    idx = uniforms_to_indices(u)
    return _rasterize(_params(idx, u[:, len(NAMES) :]), size), idx


def render_z(z: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """The render G(mapping(z)) should reproduce: float (B, 3, 64, 64) in [-1, 1], and its labels."""
    images, idx = render_uniforms(z_to_uniforms(z))
    return to_tensor(images), idx


# The jitter uniforms (dx, dy, scale, rot, fg r/g/b, bg) belong to the attribute whose look they vary.
JITTER_ATTRIBUTE = (
    "position",
    "position",
    "size",
    "shape",
    "shape_color",
    "shape_color",
    "shape_color",
    "background",
)


def code_matrix(config: ToyGeneratorConfig, seed: int) -> torch.Tensor:
    """C (Σ values + jitter uniforms, style_dim): row k is the w direction of one-hot entry k (or jitter k).

    With ``attribute_channels`` the rows of attribute a (its values and its jitter) are zero outside a's
    block of w (``w_blocks``), so w is the concatenation of one code per attribute.
    """
    gen = torch.Generator().manual_seed(seed * 7919 + STREAM + 2)
    rows = sum(N_VALUES) + N_PRIOR_DIMS - N_ATTR_DIMS
    matrix = config.code_scale * torch.randn(rows, config.style_dim, generator=gen)
    if config.attribute_channels:
        owner = [a for a, n in enumerate(N_VALUES) for _ in range(n)] + [
            NAMES.index(a) for a in JITTER_ATTRIBUTE
        ]
        blocks = w_blocks(config.style_dim)
        mask = torch.zeros_like(matrix)
        for row, a in enumerate(owner):
            mask[row, blocks[a]] = 1
        matrix = matrix * mask * math.sqrt(len(NAMES))  # same norm per row as a dense row
    return matrix


def w_blocks(style_dim: int) -> list[slice]:
    """The dims of w that code each attribute (``NAMES`` order): contiguous, as equal as possible."""
    edges = np.linspace(0, style_dim, len(NAMES) + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


# Which attribute each conv channel of a layer carries, repeated across the layer: the geometric attributes,
# which the synthesis learns slowest, get more channels (shape 3, size 2, position 2 of every 9).
CHANNEL_PATTERN = tuple(
    NAMES.index(a)
    for a in (
        "shape",
        "size",
        "position",
        "shape",
        "shape_color",
        "shape",
        "background",
        "size",
        "position",
    )
)


def channel_attributes(layout: Any) -> np.ndarray:
    """(conv channels,) the attribute index (``NAMES`` order) of each conv style channel: ``CHANNEL_PATTERN``
    repeated over each layer, so every layer has channels of every attribute."""
    pattern = np.array(CHANNEL_PATTERN)
    return np.concatenate(
        [pattern[np.arange(layer.channels) % len(pattern)] for layer in layout.conv]
    )


def style_blocks(G: Generator) -> dict[str, torch.Tensor]:
    """Masks of the modulation weights that make S attribute-aligned, keyed by parameter name.

    A conv channel of attribute a reads only a's block of w, so it varies with that attribute alone (as
    StyleSpace finds channels of a real StyleGAN2 to be localised); toRGB modulations read nothing, so their
    styles are the constant bias and every attribute is carried by the conv channels DeltaEdit edits.
    """
    blocks, masks, attrs = w_blocks(G.style_dim), {}, channel_attributes(G.layout)
    for layer in G.layout.layers:
        weight = G.get_submodule(layer.name).conv.modulation.weight
        mask = torch.zeros_like(weight)
        if layer.kind == "conv":
            for c, a in enumerate(attrs[layer.offset : layer.stop]):
                mask[c, blocks[a]] = 1
        masks[f"{layer.name}.conv.modulation.weight"] = mask
    return masks


def apply_masks(G: Generator, masks: dict[str, torch.Tensor]) -> list[Any]:
    """Zero the masked weights now and their gradients from now on (Adam then never moves them)."""
    params, hooks = dict(G.named_parameters()), []
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
            hooks.append(params[name].register_hook(lambda g, m=mask: g * m))
    return hooks


def target_codes(z: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """code(z) = [one-hot attribute values, 2·jitter − 1] · C: the w the mapping should give z, (B, style_dim)."""
    u = z_to_uniforms(z)
    idx = torch.from_numpy(uniforms_to_indices(u))
    onehot = [F.one_hot(idx[:, a], n).float() for a, n in enumerate(N_VALUES)]
    jitter = torch.from_numpy(2 * u[:, len(NAMES) :] - 1).float()
    return torch.cat([*onehot, jitter], 1) @ matrix


def fit_mapping(
    G: Generator, config: ToyGeneratorConfig, matrix: torch.Tensor, seed: int, log_every: int = 0
) -> dict[str, Any]:
    """Regress G.mapping(z) on code(z) = target_codes(z, matrix) for z ~ N(0, I); returns the final MSE and
    the held-out value accuracy (a value is read back as the argmax of its one-hot block under C's
    pseudo-inverse)."""
    first = G.style[1].weight
    with torch.no_grad():
        first[:, N_PRIOR_DIMS:] = 0
    hook = first.register_hook(
        lambda g: torch.cat([g[:, :N_PRIOR_DIMS], torch.zeros_like(g[:, N_PRIOR_DIMS:])], 1)
    )
    gen = torch.Generator().manual_seed(seed * 7919 + STREAM + 3)
    opt = torch.optim.Adam(G.style.parameters(), lr=config.mapping_lr)
    start, loss = time.perf_counter(), torch.zeros(())
    for step in range(config.mapping_steps):
        for g in opt.param_groups:
            g["lr"] = (
                config.mapping_lr * 0.5 * (1 + math.cos(math.pi * step / config.mapping_steps))
            )
        z = torch.randn(config.mapping_batch_size, config.style_dim, generator=gen)
        loss = F.mse_loss(G.mapping(z), target_codes(z, matrix))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            print(
                f"[mapping] step {step + 1} mse {loss.item():.4f} {time.perf_counter() - start:.0f}s",
                flush=True,
            )
    hook.remove()
    return {
        "mse": round(loss.item(), 5),
        "value_accuracy": mapping_accuracy(G, matrix),
        "seconds": round(time.perf_counter() - start, 1),
    }


@torch.no_grad()
def mapping_accuracy(
    G: Generator, matrix: torch.Tensor, n: int = 4096, seed: int = 4321
) -> dict[str, float]:
    """Per attribute, how often the value read back from mapping(z) is the value z was drawn for."""
    z = torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(seed))
    coef = G.mapping(z) @ torch.linalg.pinv(matrix)
    idx, acc, k = uniforms_to_indices(z_to_uniforms(z)), {}, 0
    for a, n_values in enumerate(N_VALUES):
        acc[NAMES[a]] = round(
            float((coef[:, k : k + n_values].argmax(1).numpy() == idx[:, a]).mean()), 4
        )
        k += n_values
    return acc


def train_generator(
    config: ToyGeneratorConfig = ToyGeneratorConfig(),
    seed: int = 0,
    seconds_budget: float | None = None,
    log_every: int = 100,
    probe_every: int = 0,
    oracle: Oracle | None = None,
) -> tuple[Generator, dict[str, Any]]:
    """Fit the mapping, then the synthesis on the frozen mapping; set ``G.latent_avg``. Returns (G, lineage).

    seconds_budget bounds the synthesis fit (the mapping fit takes seconds); the cosine schedule follows
    whichever of steps and time runs out first.
    """
    torch.manual_seed(seed)
    G = build_generator(config)
    matrix = code_matrix(config, seed)
    mapping_fit = fit_mapping(G, config, matrix, seed, log_every=log_every and 10 * log_every)
    for p in G.style.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed * 7919 + STREAM)
    synthesis = [p for n, p in G.named_parameters() if not n.startswith("style.")]
    hooks = apply_masks(G, style_blocks(G)) if config.attribute_channels else []
    opt = torch.optim.Adam(synthesis, lr=config.lr, betas=(0.5, 0.99))
    steps, start, step, avg = config.steps, time.perf_counter(), 0, {}
    G.train()
    for step in range(steps):
        frac = min(1.0, (time.perf_counter() - start) / seconds_budget) if seconds_budget else 0.0
        progress = max(step / steps, frac)
        if progress >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = (
                config.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * progress))
            )
        z = torch.randn(config.batch_size, config.style_dim, generator=gen)
        x = render_z(z)[0]
        with torch.no_grad():
            w = G.mapping(z)
            k = round(config.exact_fraction * len(z))
            w[:k] = target_codes(z[:k], matrix)
        err = G(w, noise_mode="none") - x
        # the shape covers 4–17 % of the image: weight its pixels up (background = the corner pixel's colour)
        fg = ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.1).float()
        weight = (1 + config.fg_weight * fg) / (1 + config.fg_weight * fg.mean())
        l1, l2 = (weight * err.abs()).mean(), (weight * err.pow(2)).mean()
        opt.zero_grad(set_to_none=True)
        (l1 + l2).backward()
        opt.step()
        track_losses(avg, {"l1": l1, "mse": l2}, step, log_every, "generator", start)
        if probe_every and oracle is not None and (step + 1) % probe_every == 0:
            G.eval()
            print(
                f"[generator] step {step + 1} samples agree {evaluate_prior_fit(G, oracle, 256)}",
                flush=True,
            )
            G.train()
    for hook in hooks:
        hook.remove()
    G.eval()
    G.requires_grad_(True)
    G.latent_avg = G.mean_latent(4096, seed=seed)
    lineage = {
        "method": "fitted_mapping_then_decoder",
        "seed": seed,
        "steps": step + 1 if steps else 0,
        "seconds": round(time.perf_counter() - start, 1),
        "config": _jsonable(asdict(config)),
        "mapping_fit": mapping_fit,
        "final": {k: round(v, 5) for k, v in avg.items()},
    }
    return G, lineage


@torch.no_grad()
def evaluate_prior_fit(
    G: Generator, oracle: Oracle, n: int = 500, seed: int = 4321
) -> dict[str, float]:
    """Oracle agreement between G(mapping(z)) and the render G was fitted to, for n held-out z."""
    z = torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(seed))
    return attribute_agreement(oracle, render_z(z)[0], G(G.mapping(z)).clamp(-1, 1))


@torch.no_grad()
def sample_images(G: Generator, n: int, seed: int, batch_size: int = 256) -> torch.Tensor:
    """G(mapping(z)) for n z ~ N(0, I) drawn from ``seed``: (n, 3, 64, 64), clamped to [-1, 1]."""
    z = torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(seed))
    return torch.cat(
        [G(G.mapping(z[i : i + batch_size])).clamp(-1, 1) for i in range(0, n, batch_size)]
    )


def marginals(oracle: Oracle, images: torch.Tensor) -> dict[str, list[float]]:
    """Per attribute, the fraction of images the oracle reads as each value (``ATTRIBUTES`` order)."""
    pred = oracle.predict(images)
    return {
        a: (torch.bincount(pred[a], minlength=len(v)).float() / len(images)).tolist()
        for a, v in ATTRIBUTES.items()
    }


def total_variation_from_uniform(freqs: dict[str, list[float]]) -> dict[str, float]:
    """½ Σ |p − 1/k| per attribute: 0 = exactly the renderer's uniform distribution."""
    return {a: round(0.5 * sum(abs(p - 1 / len(f)) for p in f), 4) for a, f in freqs.items()}


@torch.no_grad()
def evaluate_samples(
    G: Generator, oracle: Oracle, n: int = 1000, seed: int = 1234
) -> dict[str, Any]:
    """Coverage and marginals of random samples as read by the oracle."""
    freqs = marginals(oracle, sample_images(G, n, seed))
    return {
        "n": n,
        "seed": seed,
        "tv": total_variation_from_uniform(freqs),
        "min_freq": {a: round(min(f), 4) for a, f in freqs.items()},
        "freqs": {a: [round(p, 4) for p in f] for a, f in freqs.items()},
    }


@torch.no_grad()
def attribute_agreement(oracle: Oracle, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Per attribute, the fraction of pairs on which the oracle reads the same value in x and y."""
    px, py = oracle.predict(x), oracle.predict(y)
    return {a: round(float((px[a] == py[a]).float().mean()), 4) for a in NAMES}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: ({str(a): b for a, b in v.items()} if isinstance(v, dict) else v) for k, v in d.items()
    }


def track_losses(
    avg: dict[str, float],
    losses: dict[str, torch.Tensor],
    step: int,
    log_every: int,
    tag: str,
    start: float,
) -> None:
    """Update exponential moving averages of the losses in ``avg``; print them every ``log_every`` steps."""
    for k, v in losses.items():
        avg[k] = 0.9 * avg.get(k, v.item()) + 0.1 * v.item()
    if log_every and (step + 1) % log_every == 0:
        print(
            f"[{tag}] step {step + 1} "
            + " ".join(f"{k} {v:.4f}" for k, v in avg.items())
            + f" {time.perf_counter() - start:.0f}s",
            flush=True,
        )
