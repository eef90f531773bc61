"""A model function under ``torch.compile``, called on batches padded to one fixed size.

Why: a bulk edit decodes every code of a catalog through the same generator, so compiling it once pays
off. Inductor fuses the elementwise work StyleGAN2 does around each convolution (modulation,
demodulation, noise, bias, leaky ReLU, the skip additions), which on CPU is about as costly as the
convolutions themselves at small resolutions (``bench/edit_bench.py`` measures the gain). Every call is
padded to ``batch_size`` rows, so one compiled graph serves a whole run: a new batch size would compile
again, and the last batch of a shard is usually short.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class FixedBatchCompiled:
    """``fn(*tensors)`` compiled for batches of exactly ``batch_size`` rows; shorter calls are padded by
    repeating their last row and the padding is cut from the result. The first call compiles (seconds to a
    minute on CPU; Inductor's on-disk cache shortens later compiles on the same machine)."""

    def __init__(self, fn: Callable[..., Tensor], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.fn, self.batch_size = torch.compile(fn, dynamic=False), batch_size

    def __call__(self, *tensors: Tensor) -> Tensor:
        n = tensors[0].shape[0]
        if not 1 <= n <= self.batch_size or any(t.shape[0] != n for t in tensors):
            raise ValueError(
                f"expected 1 to {self.batch_size} rows in every input, got "
                f"{[t.shape[0] for t in tensors]}"
            )
        pad = self.batch_size - n
        if pad:
            tensors = tuple(torch.cat([t, t[-1:].expand(pad, *t.shape[1:])]) for t in tensors)
        return self.fn(*tensors)[:n]
