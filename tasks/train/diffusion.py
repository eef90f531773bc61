"""DeltaEdit-D training loop: ε- (or v-) prediction conditioned on the style code, EMA, checkpoints, exact
resume.

DeltaSpace (TPAMI, §4.2): the U-Net ε_θ(x_t, t, s) learns to denoise images x₀ given their StyleGAN2 style
code s, with the "simple" objective |ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t, s)| (L1), AdamW (lr 1e-4, weight
decay 0.01) and an exponential moving average of the weights, which is the model that samples.

Checkpoints under ``<root>/diffusion/`` (``tasks.train.checkpoints``): ``step-XXXXXXXX.safetensors`` holds the
EMA model (what ``StyleUNet.from_checkpoint`` and bulk-edit load), the ``.state.pt`` sidecar the raw
weights, the optimizer, the RNGs and the validation history; ``diffusion.safetensors`` when training completes.
Every random draw of step k (its batch, t and ε) is a pure function of (seed, rank, k), so restoring the
step, both weight sets and the optimizer reproduces an uninterrupted run. The loop, its cadences and the
resume are ``tasks.train.trainer``'s; ``DiffusionTrainer`` supplies the decoder's pieces.
"""

from __future__ import annotations

import copy
from functools import cached_property
from typing import Any

import numpy as np
import torch

from infra.config import TrainDiffusionConfig
from models.diffusion import DiffusionConfig, StyleUNet, simple_loss
from tasks.train import trainer
from tasks.train.diffusion_data import ImageCache
from tasks.train.row_cache import EpochSampler

FINAL = "diffusion.safetensors"


def model_config(dc: TrainDiffusionConfig, cache: ImageCache) -> DiffusionConfig:
    """The U-Net for the cached images and the generator that produced their codes."""
    if not cache.meta.get("layout"):
        raise ValueError(f"{cache.folder}: the codes store records no generator layout")
    if dc.model.render_condition and not cache.rendered:
        raise ValueError(
            f"{cache.folder}: train_diffusion.model.render_condition needs G(s) in the row cache "
            "(the train-diffusion flow renders it with models.generator)"
        )
    channels, height, width = cache.image_shape
    if height != width:
        raise ValueError(
            f"{cache.folder}: images are {width}×{height}; the U-Net needs square images"
        )
    return DiffusionConfig(
        layout=cache.meta["layout"],
        image_size=height,
        in_channels=channels,
        **dc.model.model_dump(),
    )


def build_model(config: DiffusionConfig, cache: ImageCache, seed: int) -> StyleUNet:
    """A freshly initialised U-Net (the seed alone fixes its weights) that standardises s like the data."""
    torch.manual_seed(seed)
    model = StyleUNet(config)
    model.set_style_stats(*cache.style_stats())
    return model


TRAIN_STREAM, VALIDATION_STREAM = 2, 3


def step_noise(
    seed: int, rank: int, step: int, x0: torch.Tensor, timesteps: int, stream: int = TRAIN_STREAM
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t (B,), ε like x₀) of one training step: a pure function of (seed, rank, step, stream)."""
    g = torch.Generator().manual_seed(
        int(np.random.default_rng([seed, rank, step, stream]).integers(2**62))
    )
    return torch.randint(0, timesteps, (x0.shape[0],), generator=g), torch.randn(
        x0.shape, generator=g
    )


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """ema ← d·ema + (1 − d)·model with d = min(decay, (1 + step)/(10 + step)): short runs average less."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1 - d)


@torch.no_grad()
def validation_loss(
    model: StyleUNet, cache: ImageCache, rows: np.ndarray, batch_size: int, seed: int
) -> float:
    """Mean simple loss over fixed held-out images with fixed t and ε (comparable across steps and runs)."""
    device = next(model.parameters()).device
    total = 0.0
    for lo in range(0, len(rows), batch_size):
        s, x0 = cache.fetch(rows[lo : lo + batch_size])
        t, noise = step_noise(seed, 0, lo, x0, model.config.timesteps, VALIDATION_STREAM)
        loss = simple_loss(
            model,
            x0.to(device),
            s.to(device),
            t.to(device),
            noise.to(device),
            prediction=model.config.prediction,
        )
        total += float(loss) * len(s)
    return total / max(len(rows), 1)


def run_fingerprint(
    dc: TrainDiffusionConfig, seed: int, config: DiffusionConfig, cache: ImageCache, world: int
) -> str:
    """What a resumed run must share with the run it continues (steps and intervals may change)."""
    return trainer.run_fingerprint(
        {
            "lr": dc.lr,
            "warmup": dc.warmup_steps,
            "wd": dc.weight_decay,
            "betas": list(dc.betas),
            "batch": dc.batch_size,
            "clip": dc.grad_clip,
            "ema": dc.ema_decay,
            "seed": seed,
            "world": world,
            "model": config.to_dict(),
            "data": cache.meta["fingerprint"],
        }
    )


class DiffusionTrainer(trainer.Trainer[TrainDiffusionConfig, ImageCache]):
    """The decoder's pieces of the shared loop: AdamW with warm-up and gradient clipping on the simple loss,
    and an EMA of the weights that validates and is what a checkpoint's weights file holds (the sidecar
    keeps the raw weights)."""

    name, final = "train-diffusion", FINAL

    def __init__(
        self,
        dc: TrainDiffusionConfig,
        seed: int,
        cache: ImageCache,
        *,
        rank: int = 0,
        world: int = 1,
        device: str = "cpu",
    ) -> None:
        super().__init__(dc, seed, cache, rank=rank, world=world, device=device)
        self.config = model_config(dc, cache)
        self.model = build_model(self.config, cache, seed).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=dc.lr, betas=dc.betas, weight_decay=dc.weight_decay
        )
        self.fingerprint = run_fingerprint(dc, seed, self.config, cache, world)
        self.sampler = EpochSampler(cache.train_rows, dc.batch_size, seed, rank, world)
        self.grad_clip = dc.grad_clip

    @property
    def saved(self) -> StyleUNet:
        return self.ema

    def lr(self, step: int) -> float:
        """Linear warm-up to ``lr`` over ``warmup_steps``."""
        dc = self.settings
        return dc.lr * min(1.0, (step + 1) / dc.warmup_steps) if dc.warmup_steps else dc.lr

    def fetch(self, step: int) -> tuple[torch.Tensor, ...]:
        return self.cache.fetch(self.sampler.batch(step))

    def loss(
        self, net: torch.nn.Module, batch: tuple[torch.Tensor, ...], step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s, x0 = batch
        t, noise = step_noise(self.seed, self.rank, step, x0, self.config.timesteps)
        loss = simple_loss(
            net,
            x0,
            s,
            *(v.to(self.device) for v in (t, noise)),
            schedule=self.model.schedule,
            prediction=self.config.prediction,
        )
        return loss, {}

    def after_step(self, step: int) -> None:
        update_ema(self.ema, self.model, self.settings.ema_decay, step)

    def validate(self) -> dict[str, float]:
        """The EMA's loss on the fixed held-out images."""
        return {
            "val_loss": validation_loss(
                self.ema, self.cache, self.val_images, self.settings.batch_size, self.seed
            )
        }

    @cached_property
    def val_images(self) -> np.ndarray:
        return np.random.default_rng([self.seed, 7919]).permutation(self.cache.val_rows)[
            : self.settings.val_images
        ]

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])

    def lineage(self, step: int) -> dict[str, Any]:
        meta = self.cache.meta
        return {
            "trained_by": "deltaedit run train-diffusion",
            "step": step,
            "seed": self.seed,
            "workers": self.world,
            "data": meta["fingerprint"],
            "counts": meta["counts"],
            "settings": self.settings.model_dump(mode="json", exclude={"cache_dir", "threads"}),
        }


fit = DiffusionTrainer.fit  # fit(dc, seed, cache, out, *, rank, world, wrap, stop_at, device, log)
