"""Building blocks of the Delta Mapper: PixelNorm, EqualLinear with fused leaky ReLU, and Mapper.

They follow rosinality's StyleGAN2 modules, which DeltaEdit imports, in plain torch (no CUDA op), so the
released ``net_face.pth`` loads into them and runs anywhere. Parameter names (``weight``, ``bias``,
``mapping.<i>``) are those of the released checkpoint.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

NormAxis = Literal["layer", "channel"]

LEAKY_SLOPE = 0.2  # fused_leaky_relu negative slope
LEAKY_GAIN = math.sqrt(2)  # fused_leaky_relu output scale, keeps unit variance after the ReLU


class PixelNorm(nn.Module):
    """x / sqrt(mean(x², dim) + 1e-8).

    StyleGAN normalises over dim=1. DeltaEdit feeds (B, L, C) style blocks to it, so for 3-D inputs the
    official mapper normalises across the *layer* axis L, not the channels; the released checkpoint was
    trained that way, so ``dim=1`` is the default. ``dim=-1`` is the channel-wise variant.
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=self.dim, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate (StyleGAN2).

    Weights are stored divided by ``lr_mul`` and rescaled at run time by ``lr_mul / sqrt(in_dim)``, so the
    optimiser's effective step on them is ``lr * lr_mul`` (DeltaEdit: Adam lr 0.5 with lr_mul 0.01).
    With ``activation=True`` the bias is added before a leaky ReLU (slope 0.2) scaled by √2, as in
    rosinality's ``fused_leaky_relu``; the bias sits on the last axis for 2-D and 3-D inputs alike.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        lr_mul: float = 1.0,
        bias_init: float = 0.0,
        activation: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))  # (out, in)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))  # (out,)
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul
        if not self.activation:
            return F.linear(x, self.weight * self.scale, bias)
        out = F.linear(x, self.weight * self.scale) + bias
        return F.leaky_relu(out, LEAKY_SLOPE) * LEAKY_GAIN

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, lr_mul={self.lr_mul}, act={self.activation}"


class Mapper(nn.Module):
    """Optional PixelNorm, then ``num_layers`` EqualLinear + fused leaky ReLU (also after the last layer).

    With ``norm=True`` the linear layers are ``mapping.1..n`` (``mapping.0`` is the PixelNorm), without it
    ``mapping.0..n-1`` — the key names of the released checkpoint depend on this.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        norm: bool = True,
        num_layers: int = 4,
        lr_mul: float = 0.01,
        norm_axis: NormAxis = "layer",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [PixelNorm(1 if norm_axis == "layer" else -1)] if norm else []
        dims = [in_dim] + [out_dim] * num_layers
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers.append(EqualLinear(d_in, d_out, lr_mul=lr_mul, activation=True))
        self.mapping = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapping(x)  # (..., in_dim) -> (..., out_dim)
