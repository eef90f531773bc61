"""Step checkpoints and RNG state for the trainers (Delta Mapper, diffusion decoder).

A checkpoint is ``step-XXXXXXXX.safetensors`` (the model a user loads: weights + config, readable by the
model's ``from_checkpoint``), ``step-XXXXXXXX.state.pt`` (optimizer, RNGs, history…; tensors and plain
values only, so ``torch.load(weights_only=True)`` reads it) and ``latest.json``, written LAST: it is the
commit, so a kill mid-save leaves the previous checkpoint current. ``final=True`` also writes the
trainer's final file (e.g. ``mapper.safetensors``).
"""

from __future__ import annotations

import io
import json
import random
import tempfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from infra.storage.fsio import Location
from models.checkpoint import load_safetensors, load_strict

LATEST = "latest.json"


class SavableModel(Protocol):
    def save(self, uri: str, lineage: dict[str, Any] | None = None) -> None: ...
    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> Any: ...


# --- RNG state as tensors and plain values (weights_only-loadable) -----------------------------------


def rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, pstate, pgauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(pstate, dtype=torch.int64),
            "gauss": -1.0 if pgauss is None else float(pgauss),
            "has_gauss": pgauss is not None,
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate(
        (
            p["version"],
            tuple(int(x) for x in p["state"].tolist()),
            p["gauss"] if p["has_gauss"] else None,
        )
    )


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# --- checkpoints ---------------------------------------------------------------------------------------


class Checkpointer:
    """Step checkpoints in ``out``: weights file, state sidecar, then ``latest.json`` (the commit)."""

    def __init__(self, out: Location, final_name: str, keep: int = 2) -> None:
        self.out, self.final_name, self.keep = out, final_name, keep

    def latest(self) -> dict[str, Any] | None:
        return json.loads(self.out.read_bytes(LATEST)) if self.out.exists(LATEST) else None

    def save(
        self,
        step: int,
        model: SavableModel,
        state: dict[str, Any],
        final: bool = False,
        lineage: dict[str, Any] | None = None,
    ) -> str:
        """Write checkpoint ``step``; ``lineage`` goes in the weights' header (None: the model's own)."""
        name = f"step-{step:08d}"
        weights = _safetensors_bytes(model, lineage)
        self.out.write_bytes(f"{name}.safetensors", weights)
        buf = io.BytesIO()
        torch.save(state, buf)
        self.out.write_bytes(f"{name}.state.pt", buf.getvalue())
        if final:
            self.out.write_bytes(self.final_name, weights)
        self.out.write_bytes(
            LATEST, json.dumps({"step": step, "name": name, "final": final}).encode()
        )
        self._prune(name)
        return self.out.url(f"{name}.safetensors")

    def load(self, model: SavableModel) -> tuple[int, dict[str, Any]]:
        """Restore the weights into ``model``; return (step, sidecar state)."""
        latest = self.latest()
        name = latest["name"]
        tensors, _ = load_safetensors(
            self.out.url(f"{name}.safetensors"), **self.out.storage_options
        )
        load_strict(model, tensors, self.out.url(f"{name}.safetensors"))
        state = torch.load(io.BytesIO(self.out.read_bytes(f"{name}.state.pt")), weights_only=True)
        return int(latest["step"]), state

    def _prune(self, current: str) -> None:
        names = sorted({n.split(".")[0] for n in self.out.listdir() if n.startswith("step-")})
        for name in [n for n in names if n != current][: max(0, len(names) - self.keep)]:
            for suffix in (".safetensors", ".state.pt"):
                if self.out.exists(name + suffix):
                    self.out.remove(name + suffix)


def _safetensors_bytes(model: SavableModel, lineage: dict[str, Any] | None) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        model.save(str(path), lineage)
        return path.read_bytes()
