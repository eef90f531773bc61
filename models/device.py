"""Where a model runs: ``auto`` takes CUDA when present, else the CPU."""

from __future__ import annotations

from typing import Literal

import torch

DeviceChoice = Literal["auto", "cpu", "cuda"]


def pick_device(choice: DeviceChoice = "auto") -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA device is available")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def set_cpu_threads(cpus: float) -> int:
    """Match torch's intra-op threads to the CPUs an actor was given (at least one)."""
    threads = max(1, int(round(cpus)))
    torch.set_num_threads(threads)
    return threads


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's parameters (CPU for a module without any)."""
    param = next(module.parameters(), None)
    return torch.device("cpu") if param is None else param.device
