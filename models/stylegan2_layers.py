"""StyleGAN2 building blocks in pure PyTorch, with rosinality's parameter names and parametrisation.

No custom CUDA ops: upfirdn2d and the fused leaky ReLU are written with plain torch calls, so the same
code runs on CPU and CUDA. Parameters use the equalised-learning-rate trick (stored weights are N(0, 1)
/ lr_mul and scaled at run time), exactly as rosinality/stylegan2-pytorch stores them, so its checkpoints
load unchanged. Modulated convolutions take the *style* (the modulation output, a point of S) rather
than w, so the generator can decode edited S codes directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLUR_KERNEL = (1, 3, 3, 1)  # StyleGAN2's FIR filter for up-sampling
LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)


def make_kernel(k: Sequence[float]) -> Tensor:
    """Separable 1-D taps → normalised 2-D FIR kernel (sums to 1)."""
    t = torch.tensor(k, dtype=torch.float32)
    if t.ndim == 1:
        t = t[None, :] * t[:, None]
    return t / t.sum()


def upfirdn2d(
    x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> Tensor:
    """Upsample by zero insertion, pad (negative = crop), FIR-filter, downsample — on every channel.

    x: (B, C, H, W); kernel: (kh, kw). Output side: (H * up + pad0 + pad1 - k + 1) // down.
    """
    b, c, h, w = x.shape
    if up > 1:  # (B, C, H, 1, W, 1) → zeros after each sample → (B, C, H*up, W*up)
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(b, c, h * up, w * up)
    p0, p1 = pad
    x = F.pad(x, [p0, p1, p0, p1])
    # conv2d is a correlation: flip the kernel to convolve (a no-op for symmetric kernels).
    # A depthwise conv (one group per channel) — far faster on CPUs than folding channels into the batch.
    k = torch.flip(kernel, [0, 1]).to(dtype=x.dtype, device=x.device)
    x = F.conv2d(x, k.expand(c, 1, *k.shape), groups=c)  # (B, C, H', W')
    return x[:, :, ::down, ::down] if down > 1 else x


def fused_leaky_relu(
    x: Tensor, bias: Tensor | None = None, slope: float = LRELU_SLOPE, gain: float = LRELU_GAIN
) -> Tensor:
    """leaky_relu(x + bias) · gain; the bias broadcasts over the channel axis (dim 1)."""
    if bias is not None:
        x = x + bias.view(1, -1, *([1] * (x.ndim - 2)))
    return F.leaky_relu(x, slope) * gain


class PixelNorm(nn.Module):
    """Normalise each vector to unit RMS over dim 1 (z → sphere before the mapping network)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class FusedLeakyReLU(nn.Module):
    """Per-channel bias + leaky ReLU · √2 (rosinality's `activate` with its `bias` parameter)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return fused_leaky_relu(x, self.bias)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: y = x (W·lr_mul/√in)ᵀ + b·lr_mul."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: bool = False,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias)


class Upsample(nn.Module):
    """×2 FIR up-sampling of the toRGB skip image."""

    def __init__(self, kernel: Sequence[float] = BLUR_KERNEL, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor**2)
        p = len(kernel) - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class Blur(nn.Module):
    """FIR low-pass after a strided transposed conv (the second half of StyleGAN2's up-sampling conv)."""

    def __init__(self, kernel: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(kernel) * upsample_factor**2)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class ModulatedConv2d(nn.Module):
    """Conv whose weight is scaled per input channel by a style s (and demodulated).

    `modulation` maps w → s (bias init 1); `forward` takes s itself so S-space edits decode directly.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        style_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
        blur_kernel: Sequence[float] = BLUR_KERNEL,
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = (
            in_channels,
            out_channels,
            kernel_size,
        )
        self.demodulate, self.upsample = demodulate, upsample
        if (
            upsample
        ):  # pads that make transposed-conv(stride 2) + blur give exactly 2× the input side
            p = (len(blur_kernel) - 2) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + 1, p // 2 + 1), upsample_factor=2)
        self.scale = 1 / math.sqrt(in_channels * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(
            torch.randn(1, out_channels, in_channels, kernel_size, kernel_size)
        )
        self.modulation = EqualLinear(style_dim, in_channels, bias_init=1.0)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        """x: (B, in, H, W), style: (B, in) → (B, out, H', W').

        Computed as StyleGAN2's non-fused form: scale the *activations* by s, convolve with the shared
        weight, then demodulate the outputs — the same numbers as modulating each sample's weight
        (up to float rounding), but one dense conv for the whole batch instead of a grouped conv with
        a weight per sample, which is several times faster on CPUs at batch > 1.
        """
        weight = self.scale * self.weight[0]  # (out, in, k, k)
        x = x * style[:, :, None, None]
        if self.upsample:
            out = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
        else:
            out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:  # 1/‖W·s‖ per output channel: (B, in) @ (in, out)
            demod = torch.rsqrt(style.pow(2) @ weight.pow(2).sum([2, 3]).t() + 1e-8)
            out = out * demod[:, :, None, None]
        return self.blur(out) if self.upsample else out


class NoiseInjection(nn.Module):
    """Adds learned-strength per-pixel noise (one map shared over channels)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, noise: Tensor | None) -> Tensor:
        return x if noise is None else x + self.weight * noise


class ConstantInput(nn.Module):
    """The learned 4×4 constant the synthesis network starts from."""

    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    """Modulated 3×3 conv → noise → bias + leaky ReLU (one conv layer of S)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        style_dim: int,
        upsample: bool = False,
        blur_kernel: Sequence[float] = BLUR_KERNEL,
    ):
        super().__init__()
        self.conv = ModulatedConv2d(
            in_channels, out_channels, 3, style_dim, upsample=upsample, blur_kernel=blur_kernel
        )
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channels)

    def forward(self, x: Tensor, style: Tensor, noise: Tensor | None) -> Tensor:
        return self.activate(self.noise(self.conv(x, style), noise))


class ToRGB(nn.Module):
    """Modulated 1×1 conv to RGB (no demodulation) + bias, added to the up-sampled previous image."""

    def __init__(
        self,
        in_channels: int,
        style_dim: int,
        upsample: bool = True,
        blur_kernel: Sequence[float] = BLUR_KERNEL,
    ):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channels, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: Tensor, style: Tensor, skip: Tensor | None = None) -> Tensor:
        out = self.conv(x, style) + self.bias
        return out if skip is None else out + self.upsample(skip)
