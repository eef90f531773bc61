"""Noise schedules, the training loss and DDIM sampling (deterministic, or with η) for DeltaEdit-D.

Why DDIM (Song et al., "Denoising Diffusion Implicit Models", ICLR 2021): with η = 0 the sampler is a
deterministic map x_T ↔ x₀ (a discretised probability-flow ODE), so running it forwards *encodes* a real
photo into the x_T that decodes back to it. DeltaEdit-D uses that to keep the details of real images:
encode x₀ under the photo's style code s, then decode the same x_T under the edited code ŝ = s + Δŝ.

Mask-guided decoding (after Chen et al.'s mask-guided editing; DiffEdit by Couairon et al. is the same
idea) keeps everything the edit should not touch: where the ε predictions under s and ŝ agree, the image
is denoised under s, exactly as the plain reconstruction; where they differ, under ŝ.

Conventions: t is an integer step in [0, T); ᾱ_t = Π_{i≤t}(1 − β_i); x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε;
"ᾱ at step −1" is 1 (the clean image). A model is called as ``model(x_t, t (B,) long, s)`` and exposes
its training schedule as ``model.schedule`` (or pass ``schedule=``).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch.nn import functional as F

ScheduleKind = Literal["linear", "cosine"]
EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class NoiseSchedule:
    """β schedule over T training steps: "linear" (Ho et al., 1e-4 → 0.02 at T = 1000, scaled by 1000/T)
    or "cosine" (Nichol & Dhariwal, offset 0.008, β ≤ 0.999). Kept in float64."""

    def __init__(self, kind: ScheduleKind = "linear", timesteps: int = 1000) -> None:
        if timesteps < 1:
            raise ValueError(f"timesteps must be ≥ 1, got {timesteps}")
        if kind == "linear":
            scale = 1000.0 / timesteps
            betas = torch.linspace(1e-4 * scale, 0.02 * scale, timesteps, dtype=torch.float64)
        elif kind == "cosine":
            u = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
            f = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"unknown schedule '{kind}' (linear or cosine)")
        self.kind, self.timesteps, self.betas = kind, timesteps, betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)

    def alpha_bar(self, t: int) -> float:
        """ᾱ_t, with ᾱ_{-1} = 1."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def alpha_bar_like(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """ᾱ_t for a (B,) tensor of steps, shaped (B, 1, …) to broadcast against x."""
        a = self.alphas_cumprod.to(x.device)[t.long()].to(x.dtype)
        return a.reshape(-1, *([1] * (x.ndim - 1)))


def _schedule(model: object, schedule: NoiseSchedule | None) -> NoiseSchedule:
    if schedule is not None:
        return schedule
    found = getattr(model, "schedule", None)
    if not isinstance(found, NoiseSchedule):
        raise ValueError("pass schedule=, or give the model a 'schedule' attribute")
    return found


def q_sample(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule
) -> torch.Tensor:
    """x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε: a sample of q(x_t | x₀) in closed form (DDPM, eq. 4)."""
    a = schedule.alpha_bar_like(t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def simple_loss(
    model: EpsModel,
    x0: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    schedule: NoiseSchedule | None = None,
    prediction: str = "eps",
) -> torch.Tensor:
    """The "simple" objective with an L1 distance, as Diffusion Autoencoders-style decoders train: mean
    |ε − ε_θ(x_t, t, s)|, or for a v-predicting model (``prediction="v"``) mean |v − v_θ|, computed from the
    ε the model returns as |ε − ε_θ| / √ᾱ_t (the two differ by exactly that factor). The caller draws t and
    noise so training stays reproducible."""
    sched = _schedule(model, schedule)
    x_t = q_sample(x0, t, noise, sched)
    err = (noise - model(x_t, t, s)).abs()
    if prediction == "v":
        err = err / sched.alpha_bar_like(t, x0).sqrt()
    elif prediction != "eps":
        raise ValueError(f"unknown prediction '{prediction}' (eps or v)")
    return err.mean()


def ddim_timesteps(timesteps: int, steps: int, t_max: int | None = None) -> list[int]:
    """The DDIM sub-sequence: ``steps`` evenly spaced training steps from 0 to ``t_max`` (default T − 1).

    A ``t_max`` below T − 1 makes encoding stop part-way (x at step t_max, not pure noise): the decoder then
    keeps more of the photo and the code can change less of it (SDEdit's trade-off, Meng et al. 2022).
    """
    t_max = timesteps - 1 if t_max is None else t_max
    if not 0 <= t_max < timesteps:
        raise ValueError(f"t_max must be in [0, {timesteps - 1}], got {t_max}")
    if not 1 <= steps <= t_max + 1:
        raise ValueError(f"steps must be in [1, {t_max + 1}], got {steps}")
    if steps == 1:
        return [t_max]
    return sorted({round(i * t_max / (steps - 1)) for i in range(steps)})


def _eps(model: EpsModel, x: torch.Tensor, t: int, s: torch.Tensor) -> torch.Tensor:
    return model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), s)


def _x0(x: torch.Tensor, eps: torch.Tensor, a: float) -> torch.Tensor:
    """The clean image that x at ᾱ = a and its predicted ε imply."""
    return (x - math.sqrt(1 - a) * eps) / math.sqrt(a)


def _step(x: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
    """One η = 0 DDIM move from ᾱ = a_from to ᾱ = a_to: predict x₀, then re-noise it with the same ε."""
    return math.sqrt(a_to) * _x0(x, eps, a_from) + math.sqrt(1 - a_to) * eps


class StepNoise:
    """The fresh noise of stochastic DDIM decoding (η > 0; Song et al. eq. 12, η = 1 is DDPM's ancestral
    sampler): σ = η·√((1 − ᾱ_to)/(1 − ᾱ_from))·√(1 − ᾱ_from/ᾱ_to), drawn from a CPU generator seeded with
    ``seed`` as one (C, H, W) image per step shared by every row of the batch, so a decode is the same on
    any device and in any batch, and every edit of one photo sees the same noise as its reconstruction."""

    def __init__(self, eta: float, seed: int) -> None:
        if eta < 0:
            raise ValueError(f"eta must be ≥ 0, got {eta}")
        self.eta = eta
        self.generator = torch.Generator().manual_seed(seed) if eta > 0 else None

    def step(self, x: torch.Tensor, eps: torch.Tensor, a_from: float, a_to: float) -> torch.Tensor:
        """``_step`` with part of the re-noising ε replaced by fresh noise (exactly ``_step`` at η = 0)."""
        sigma = self.eta * math.sqrt((1 - a_to) / (1 - a_from) * (1 - a_from / a_to))
        if self.generator is None or sigma == 0:
            return _step(x, eps, a_from, a_to)
        z = torch.randn(x.shape[1:], generator=self.generator, dtype=x.dtype).to(x.device)
        kept = math.sqrt(max(1 - a_to - sigma**2, 0.0))
        return math.sqrt(a_to) * _x0(x, eps, a_from) + kept * eps + sigma * z


@torch.no_grad()
def ddim_encode(
    model: EpsModel,
    x0: torch.Tensor,
    s: torch.Tensor,
    steps: int,
    schedule: NoiseSchedule | None = None,
    refine: int = 0,
    t_max: int | None = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion x₀ → x_T under style code s (B, style_dim); x_T at step ``t_max``
    (default T − 1; see ``ddim_timesteps``).

    Each move from step t_{k−1} to t_k first reuses ε predicted at the current point (the first one at
    t₀, for the clean image): the usual DDIM inversion, first-order accurate, so the round trip error
    shrinks like 1/steps. ``refine`` > 0 then solves x_k = move(x_{k−1}, ε(x_k, t_k)) by that many
    fixed-point iterations (Pan et al., AIDI, ICCV 2023), which makes each move the exact inverse of the
    decoder's: reconstructions of real photos become near-exact with few steps, at (1 + refine)× the cost.
    """
    sched = _schedule(model, schedule)
    seq, x = ddim_timesteps(sched.timesteps, steps, t_max), x0
    for k, t in enumerate(seq):
        a_from, a_to = sched.alpha_bar(seq[k - 1] if k else -1), sched.alpha_bar(t)
        x_next = _step(x, _eps(model, x, seq[max(k - 1, 0)], s), a_from, a_to)
        for _ in range(refine):
            x_next = _step(x, _eps(model, x_next, t, s), a_from, a_to)
        x = x_next
    return x


class EditGuidance:
    """ε for decoding an edit ŝ of a code s with guidance scale w: ε(x, t, s) + w·(ε(x, t, ŝ) − ε(x, t, s)).

    w = 1 is the plain ε(ŝ). w > 1 extrapolates along the change the edit makes to the prediction, the way
    classifier-free guidance extrapolates from an unconditional one (Ho & Salimans 2022; here the "unconditional"
    prediction is the source code's, so no extra training is needed): a decoder that follows its code weakly
    edits more, and ŝ = s still reconstructs exactly. Call it as ``guided(x, t, s_edit)``.
    """

    def __init__(self, model: EpsModel, s_source: torch.Tensor, scale: float) -> None:
        self.model, self.s_source, self.scale = model, s_source, scale
        self.schedule = _schedule(model, None)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, s_edit: torch.Tensor) -> torch.Tensor:
        eps_edit = self.model(x, t, s_edit)
        if self.scale == 1:
            return eps_edit
        eps_src = self.model(x, t, self.s_source)
        return eps_src + self.scale * (eps_edit - eps_src)


@torch.no_grad()
def ddim_decode(
    model: EpsModel,
    x_T: torch.Tensor,
    s: torch.Tensor,
    steps: int,
    schedule: NoiseSchedule | None = None,
    t_max: int | None = None,
    eta: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """DDIM sampling x_T → x₀ under style code s, over ``steps`` steps from ``t_max``: deterministic at
    η = 0; ``eta`` > 0 adds fresh noise each step (``StepNoise``, seeded with ``seed``)."""
    sched = _schedule(model, schedule)
    seq, x, noise = ddim_timesteps(sched.timesteps, steps, t_max), x_T, StepNoise(eta, seed)
    for k in reversed(range(len(seq))):
        prev = seq[k - 1] if k else -1
        eps = _eps(model, x, seq[k], s)
        x = noise.step(x, eps, sched.alpha_bar(seq[k]), sched.alpha_bar(prev))
    return x


def edit_mask(
    eps_src: torch.Tensor, eps_edit: torch.Tensor, threshold: float = 0.5, smooth: int = 3
) -> torch.Tensor:
    """Binary (B, 1, H, W) mask of where the edit acts: |ε(ŝ) − ε(s)| averaged over channels, box-smoothed
    (odd ``smooth`` px; 1 = off), divided by its per-image maximum and compared with ``threshold``.
    Identical predictions give an all-zero mask."""
    if smooth < 1 or smooth % 2 == 0:
        raise ValueError(f"smooth must be an odd number ≥ 1, got {smooth}")
    d = (eps_edit - eps_src).abs().mean(dim=1, keepdim=True)
    if smooth > 1:
        d = F.avg_pool2d(d, smooth, stride=1, padding=smooth // 2, count_include_pad=False)
    peak = d.amax(dim=(2, 3), keepdim=True)
    return ((d > threshold * peak) & (peak > 0)).to(eps_src.dtype)


@torch.no_grad()
def mask_guided_decode(
    model: EpsModel,
    x_T: torch.Tensor,
    s: torch.Tensor,
    s_edit: torch.Tensor,
    steps: int,
    threshold: float = 0.5,
    smooth: int = 3,
    schedule: NoiseSchedule | None = None,
    t_max: int | None = None,
    guidance: float = 1.0,
    eta: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM decoding with ŝ = ``s_edit`` inside the edit mask and s outside; returns (x₀, mask).

    At every step ε is predicted under both codes and ``edit_mask`` marks where they differ; the mask
    is accumulated (a pixel once edited stays edited) and ε is taken from ŝ inside it, from s outside.
    Outside the mask each step is bit-for-bit the plain ``ddim_decode(model, x_T, s, steps)`` step, so the
    unedited part of a DDIM-encoded photo is reconstructed as faithfully as without editing. ``guidance``
    scales ε(ŝ) − ε(s) as ``EditGuidance`` does (the mask, relative to its peak, does not change);
    ``eta`` and ``seed`` as in ``ddim_decode``.
    """
    sched = _schedule(model, schedule)
    seq, x, noise = ddim_timesteps(sched.timesteps, steps, t_max), x_T, StepNoise(eta, seed)
    mask = torch.zeros_like(x_T[:, :1])
    for k in reversed(range(len(seq))):
        prev = seq[k - 1] if k else -1
        eps_src, eps_edit = _eps(model, x, seq[k], s), _eps(model, x, seq[k], s_edit)
        eps_edit = eps_src + guidance * (eps_edit - eps_src)
        mask = torch.maximum(mask, edit_mask(eps_src, eps_edit, threshold, smooth))
        eps = torch.where(mask.bool(), eps_edit, eps_src)
        x = noise.step(x, eps, sched.alpha_bar(seq[k]), sched.alpha_bar(prev))
    return x, mask
