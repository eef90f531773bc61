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
The loop, its cadences and the resume are ``tasks.train.trainer``'s; ``MapperTrainer`` supplies the mapper's pieces.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from infra.config import TrainMapperConfig
from models.delta_mapper import DeltaMapper, MapperConfig, StraightforwardMapper
from tasks.train import trainer
from tasks.train.mapper_data import PairSampler, RowCache, nearest_rows, validation_pairs

MODELS: dict[str, type[DeltaMapper]] = {
    "delta": DeltaMapper,
    "straightforward": StraightforwardMapper,
}
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


def mapper_inputs(
    kind: str, s1: torch.Tensor, i1: torch.Tensor, i2: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """(s₁, i₁, Δi) for the Delta Mapper, (s₁, i₁, i₂) for the straightforward baseline."""
    return (s1, i1, i2 - i1) if kind == "delta" else (s1, i1, i2)


def pair_loss(
    pred: torch.Tensor, target: torch.Tensor, mse_weight: float = 1.0, cos_weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean cosine) of predicted vs true Δs, both (B, S)."""
    cos = F.cosine_similarity(pred, target, dim=1).mean()
    return mse_weight * F.mse_loss(pred, target) + cos_weight * (1 - cos), cos


def run_fingerprint(
    tm: TrainMapperConfig, seed: int, config: MapperConfig, cache: RowCache, world: int
) -> str:
    """What a resumed run must share with the run it continues (steps and intervals may change)."""
    return trainer.run_fingerprint(
        {
            "model": tm.model,
            "lr": tm.lr,
            "betas": list(tm.betas),
            "batch": tm.batch_size,
            "mse": tm.mse_weight,
            "cos": tm.cos_weight,
            "seed": seed,
            "world": world,
            "local_partners": tm.local_partners,
            "neighbours": tm.neighbours if tm.local_partners else None,
            "mapper": config.to_dict(),
            "data": cache.meta["fingerprint"],
        }
    )


@torch.no_grad()
def evaluate(
    model: DeltaMapper,
    kind: str,
    cache: RowCache,
    pairs: tuple[np.ndarray, np.ndarray],
    batch_size: int,
    mse_weight: float = 1.0,
    cos_weight: float = 1.0,
) -> dict[str, float]:
    """Mean loss and cosine over fixed validation pairs."""
    total = {"val_loss": 0.0, "val_cos": 0.0}
    n = len(pairs[0])
    for lo in range(0, n, batch_size):
        device = next(model.parameters()).device
        s1, i1, s2, i2 = (
            t.to(device)
            for t in (
                *cache.fetch(pairs[0][lo : lo + batch_size]),
                *cache.fetch(pairs[1][lo : lo + batch_size]),
            )
        )
        loss, cos = pair_loss(
            model(*mapper_inputs(kind, s1, i1, i2)), s2 - s1, mse_weight, cos_weight
        )
        total["val_loss"] += float(loss) * len(s1)
        total["val_cos"] += float(cos) * len(s1)
    return {k: v / max(n, 1) for k, v in total.items()}


class MapperTrainer(trainer.Trainer[TrainMapperConfig, RowCache]):
    """The Delta Mapper's pieces of the shared loop: Adam on the pair loss, validation on fixed held-out pairs."""

    name, final = "train-mapper", FINAL

    def __init__(
        self,
        tm: TrainMapperConfig,
        seed: int,
        cache: RowCache,
        *,
        rank: int = 0,
        world: int = 1,
        device: str = "cpu",
    ) -> None:
        super().__init__(tm, seed, cache, rank=rank, world=world, device=device)
        config = mapper_config(cache)
        self.model = build_model(tm.model, config, seed).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=tm.lr, betas=tm.betas)
        self.fingerprint = run_fingerprint(tm, seed, config, cache, world)
        neighbours = nearest_rows(cache, tm.neighbours) if tm.local_partners else None
        self.sampler = PairSampler(
            cache.train_rows, tm.batch_size, seed, rank, world, neighbours, tm.local_partners
        )

    def fetch(self, step: int) -> tuple[torch.Tensor, ...]:
        primary, partner = self.sampler.batch(step)
        return (*self.cache.fetch(primary), *self.cache.fetch(partner))

    def loss(
        self, net: torch.nn.Module, batch: tuple[torch.Tensor, ...], step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s1, i1, s2, i2 = batch
        tm = self.settings
        loss, cos = pair_loss(
            net(*mapper_inputs(tm.model, s1, i1, i2)), s2 - s1, tm.mse_weight, tm.cos_weight
        )
        return loss, {"cos": cos}

    def validate(self) -> dict[str, float]:
        tm = self.settings
        return evaluate(
            self.model,
            tm.model,
            self.cache,
            self.val_pairs,
            tm.batch_size,
            tm.mse_weight,
            tm.cos_weight,
        )

    @cached_property
    def val_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        return validation_pairs(self.cache.val_rows, self.settings.val_pairs, self.seed)


fit = MapperTrainer.fit  # fit(tm, seed, cache, out, *, rank, world, wrap, stop_at, device, log)
