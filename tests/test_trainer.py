"""The shared training loop (tasks/train/trainer.py) on a toy trainer whose steps draw from the global RNG (dropout),
which neither real trainer does: RNG-exact resume, a kill at a checkpoint boundary, the cadences, the
learning-rate schedule, lineage, and a non-zero rank (no validation, no checkpoints)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from infra.storage.fsio import Location
from models.checkpoint import load_safetensors, save_safetensors
from tasks.train.row_cache import EpochSampler, SplitCache
from tasks.train.trainer import Trainer, run_fingerprint


@dataclass
class Settings:
    steps: int = 12
    lr: float = 0.1
    val_every: int = 3
    checkpoint_every: int = 4
    keep_checkpoints: int = 2
    threads: int | None = None


class MemoryCache(SplitCache):
    """40 rows of y = x·w + noise in memory; every 5th row held out."""

    def __init__(self) -> None:  # no folder to read
        rng = np.random.default_rng(0)
        self.x = torch.from_numpy(rng.normal(size=(40, 4)).astype(np.float32))
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.from_numpy(
            rng.normal(size=(40, 1)).astype(np.float32)
        )
        self.meta, self.is_val = {"rows": 40}, np.arange(40) % 5 == 0


class Noisy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.lineage: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(F.dropout(x, 0.5))  # draws from the global torch RNG

    def save(self, uri: str, lineage: dict | None = None) -> None:
        save_safetensors(
            uri,
            self.state_dict(),
            config={},
            lineage=self.lineage if lineage is None else lineage,
            kind="noisy",
        )


class ToyTrainer(Trainer[Settings, MemoryCache]):
    name, final = "train-toy", "toy.safetensors"

    def __init__(
        self,
        settings: Settings,
        seed: int,
        cache: MemoryCache,
        *,
        rank: int = 0,
        world: int = 1,
        device: str = "cpu",
    ) -> None:
        super().__init__(settings, seed, cache, rank=rank, world=world, device=device)
        torch.manual_seed(seed)
        self.model = Noisy()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=settings.lr)
        self.sampler = EpochSampler(cache.train_rows, 4, seed, rank, world)
        self.fingerprint = run_fingerprint({"seed": seed, "world": world})

    def lr(self, step: int) -> float:
        return self.settings.lr / (1 + step)

    def fetch(self, step: int) -> tuple[torch.Tensor, ...]:
        rows = self.sampler.batch(step)
        return self.cache.x[rows], self.cache.y[rows]

    def loss(self, net, batch, step):
        x, y = batch
        return F.mse_loss(net(x), y), {}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        rows = self.cache.val_rows
        return {
            "val_loss": float(F.mse_loss(self.model.lin(self.cache.x[rows]), self.cache.y[rows]))
        }

    def lineage(self, step: int) -> dict:
        return {"step": step}


def _fit(out: Path, **kw) -> dict:
    stop_at = kw.pop("stop_at", None)
    return ToyTrainer.fit(
        Settings(**kw), 0, MemoryCache(), Location(str(out)), stop_at=stop_at, log=lambda _: None
    )


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(str(out / "toy.safetensors"))[0]


@pytest.mark.parametrize("killed_at", [8, 10])  # at a checkpoint; between two
def test_resume_restores_the_global_rng_and_equals_an_uninterrupted_run(tmp_path, killed_at):
    clean = _fit(tmp_path / "clean")
    first = _fit(tmp_path / "killed", stop_at=killed_at)
    assert (first["step"], first["done"], first["checkpoint"]) == (killed_at, False, None)
    torch.manual_seed(1234)  # the caller's RNG: not what resumes
    resumed = _fit(tmp_path / "killed")
    assert (resumed["start_step"], resumed["ran"]) == (8, 4)
    a, b = _weights(tmp_path / "clean"), _weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed["loss"], resumed["val"]) == (clean["loss"], clean["val"])
    other = _fit(tmp_path / "other_dropout", stop_at=8)  # same run, but resumed with fresh RNGs:
    state = tmp_path / "other_dropout" / "step-00000008.state.pt"
    saved = torch.load(io.BytesIO(state.read_bytes()), weights_only=True)
    saved["rng"]["torch"] = torch.manual_seed(99).get_state()
    torch.save(saved, state)
    assert (
        other["step"] == 8 and _fit(tmp_path / "other_dropout")["loss"] != clean["loss"]
    )  # the RNG matters


def test_cadences_schedule_lineage_and_summary(tmp_path):
    result = _fit(tmp_path / "out", steps=10)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        "latest.json",
        "step-00000008.safetensors",
        "step-00000008.state.pt",  # keep 2
        "step-00000010.safetensors",
        "step-00000010.state.pt",
        "toy.safetensors",
    ]
    assert json.loads((tmp_path / "out" / "latest.json").read_text()) == {
        "step": 10,
        "name": "step-00000010",
        "final": True,
    }
    state = torch.load(
        io.BytesIO((tmp_path / "out" / "step-00000010.state.pt").read_bytes()), weights_only=True
    )
    assert [h["step"] for h in state["history"]] == [
        3,
        6,
        9,
        10,
    ]  # every val_every, and the last step
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 / 10)  # lr(step 9)
    assert state["sampler"] == {"seed": 0, "rank": 0, "world": 1, "step": 10}
    assert load_safetensors(str(tmp_path / "out" / "toy.safetensors"))[1]["lineage"] == {"step": 10}
    assert {
        k: result[k]
        for k in ("start_step", "step", "ran", "done", "rows", "train_rows", "val_rows")
    } == {
        "start_step": 0,
        "step": 10,
        "ran": 10,
        "done": True,
        "rows": 40,
        "train_rows": 32,
        "val_rows": 8,
    }
    assert result["val"] == state["history"][-1] and result["checkpoint"].endswith(
        "toy.safetensors"
    )


def test_other_ranks_neither_validate_nor_checkpoint(tmp_path):
    result = ToyTrainer.fit(
        Settings(),
        0,
        MemoryCache(),
        Location(str(tmp_path / "out")),
        rank=1,
        world=2,
        log=lambda _: None,
    )
    assert result["done"] and result["val"] is None
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
