"""NVIDIA StyleGAN2-ADA (PyTorch) generators → rosinality-format checkpoints for our `Generator`.

Parameter mapping (NVIDIA name → rosinality name; R = resolution, k = index of the block above 4 px):

    mapping.fc{i}.weight / .bias          → style.{i+1}.weight / .bias   (same lr_mul=0.01 parametrisation)
    mapping.w_avg (w_dim,)                → latent_avg (beside the state dict)
    synthesis.b4.const (C, 4, 4)          → input.input (1, C, 4, 4)
    synthesis.b4.conv1.*                  → conv1.*
    synthesis.b4.torgb.*                  → to_rgb1.*
    synthesis.bR.conv0.* (up-sampling)    → convs.{2k}.*
    synthesis.bR.conv1.*                  → convs.{2k+1}.*
    synthesis.bR.torgb.*                  → to_rgbs.{k}.*
  inside a conv layer (L) and a toRGB layer (T):
    L.weight (out, in, 3, 3)              → conv.weight (1, out, in, 3, 3)
    L.affine.weight / .bias               → conv.modulation.weight / .bias
    L.noise_strength ()                   → noise.weight (1,)
    L.bias (out,)                         → activate.bias (out,)
    L.noise_const (R, R)                  → noises.noise_{j} (1, 1, R, R), j = conv-layer index
    T.weight (3, in, 1, 1)                → conv.weight (1, 3, in, 1, 1)
    T.bias (3,)                           → bias (1, 3, 1, 1)
    *.resample_filter                     → dropped; rosinality's blur/upsample kernels are the same
                                            [1,3,3,1] filter with the ×4 up-sampling gain folded in.

No weight flips are needed: NVIDIA's PyTorch port already stores conv0 weights in the orientation that a
transposed convolution uses (its legacy.py flips TensorFlow weights when importing them). Outputs match
except where NVIDIA's `conv_clamp` (±256, mostly in fp16 layers) would have clipped activations.
Conditional generators (mapping.embed) and non-'skip' architectures are refused.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from models.checkpoint import CheckpointError, load_torch, read_bytes
from models.stylegan2_layers import BLUR_KERNEL, make_kernel


def convert_nvidia_pkl(path_or_uri: str, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Read an NVIDIA StyleGAN2-ADA `.pkl` and return ``{'g_ema': rosinality state dict, 'latent_avg': (w_dim,)}``.

    A pickle can run arbitrary code when loaded, so this refuses unless ``allow_pickle=True`` (only for
    files you trust). NVIDIA's own network pickles store whole module objects: unpickling them needs
    NVlabs' ``dnnlib`` and ``torch_utils`` packages importable (clone stylegan2-ada-pytorch and put it
    on ``sys.path``). Pickles whose ``G_ema`` (or top-level object) is a plain state dict, and
    ``torch.save`` files of such dicts, need nothing extra. ``torch.save`` the result to get a
    checkpoint that ``Generator.from_checkpoint`` reads with ``weights_only=True``.
    """
    uri = str(path_or_uri)
    if not allow_pickle:
        raise CheckpointError(
            f"{uri}: refusing to unpickle an NVIDIA .pkl (a pickle can run code); "
            "pass allow_pickle=True only for a file you trust"
        )
    obj = _unpickle(uri)
    return nvidia_to_rosinality(_generator_state(obj, uri), uri)


def nvidia_to_rosinality(
    state: Mapping[str, Tensor], source: str = "NVIDIA state dict"
) -> dict[str, Any]:
    """Rename an NVIDIA G_ema state dict to rosinality's layout (see the module docstring)."""
    _refuse_unsupported(state, source)
    src = {k: v.detach().cpu() for k, v in state.items()}
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in src:
            raise CheckpointError(f"{source}: missing NVIDIA key '{key}'")
        used.add(key)
        return src[key]

    out: dict[str, Tensor] = {}
    for i in range(_count(src, r"mapping\.fc(\d+)\.weight")):
        out[f"style.{i + 1}.weight"] = take(f"mapping.fc{i}.weight")
        out[f"style.{i + 1}.bias"] = take(f"mapping.fc{i}.bias")
    out["input.input"] = take("synthesis.b4.const")[None]
    _conv_layer(out, take, "synthesis.b4.conv1", "conv1", "noise_0", upsample=False)
    _torgb_layer(out, take, "synthesis.b4.torgb", "to_rgb1", upsample=False)
    for k, res in enumerate(_resolutions(src)[1:]):
        block = f"synthesis.b{res}"
        _conv_layer(
            out, take, f"{block}.conv0", f"convs.{2 * k}", f"noise_{2 * k + 1}", upsample=True
        )
        _conv_layer(
            out, take, f"{block}.conv1", f"convs.{2 * k + 1}", f"noise_{2 * k + 2}", upsample=False
        )
        _torgb_layer(out, take, f"{block}.torgb", f"to_rgbs.{k}", upsample=True)
    latent_avg = take("mapping.w_avg") if "mapping.w_avg" in src else None
    leftover = [k for k in src if k not in used and not k.endswith("resample_filter")]
    if leftover:
        raise CheckpointError(
            f"{source}: NVIDIA keys with no rosinality counterpart: {leftover[:8]}"
        )
    return {"g_ema": out, "latent_avg": latent_avg}


def _conv_layer(
    out: dict[str, Tensor],
    take: Callable[[str], Tensor],
    nv: str,
    ros: str,
    noise: str,
    upsample: bool,
) -> None:
    out[f"{ros}.conv.weight"] = take(f"{nv}.weight")[None]  # (out, in, 3, 3) → (1, out, in, 3, 3)
    if upsample:
        out[f"{ros}.conv.blur.kernel"] = _up_kernel()
    out[f"{ros}.conv.modulation.weight"] = take(f"{nv}.affine.weight")
    out[f"{ros}.conv.modulation.bias"] = take(f"{nv}.affine.bias")
    out[f"{ros}.noise.weight"] = take(f"{nv}.noise_strength").reshape(1)
    out[f"{ros}.activate.bias"] = take(f"{nv}.bias")
    out[f"noises.{noise}"] = take(f"{nv}.noise_const")[None, None]  # (R, R) → (1, 1, R, R)


def _torgb_layer(
    out: dict[str, Tensor], take: Callable[[str], Tensor], nv: str, ros: str, upsample: bool
) -> None:
    out[f"{ros}.bias"] = take(f"{nv}.bias").reshape(1, -1, 1, 1)
    if upsample:
        out[f"{ros}.upsample.kernel"] = _up_kernel()
    out[f"{ros}.conv.weight"] = take(f"{nv}.weight")[None]
    out[f"{ros}.conv.modulation.weight"] = take(f"{nv}.affine.weight")
    out[f"{ros}.conv.modulation.bias"] = take(f"{nv}.affine.bias")


def _up_kernel() -> Tensor:
    """rosinality's ×2 up-sampling FIR kernel: normalised [1,3,3,1]² times the gain factor² = 4."""
    return make_kernel(BLUR_KERNEL) * 4


def _resolutions(src: Mapping[str, Tensor]) -> list[int]:
    res = sorted(
        int(m.group(1)) for k in src if (m := re.fullmatch(r"synthesis\.b(\d+)\.torgb\.weight", k))
    )
    expected = [2**i for i in range(2, len(res) + 2)]
    if res != expected:
        raise CheckpointError(f"NVIDIA synthesis blocks {res} are not the expected {expected}")
    return res


def _count(src: Mapping[str, Tensor], pattern: str) -> int:
    return 1 + max((int(m.group(1)) for k in src if (m := re.fullmatch(pattern, k))), default=-1)


def _refuse_unsupported(state: Mapping[str, Tensor], source: str) -> None:
    if any(k.startswith("mapping.embed") for k in state):
        raise CheckpointError(f"{source}: conditional generators (mapping.embed) are not supported")
    if any(re.fullmatch(r"synthesis\.b\d+\.skip\.weight", k) for k in state):
        raise CheckpointError(f"{source}: only the 'skip' synthesis architecture is supported")


def _unpickle(uri: str) -> Any:
    data = read_bytes(uri)
    if data[:2] == b"PK":  # a torch.save zip archive rather than a raw pickle
        return load_torch(uri, allow_pickle=True)
    try:
        return pickle.loads(data)  # noqa: S301 — explicitly opted in through allow_pickle
    except ModuleNotFoundError as exc:
        raise CheckpointError(
            f"{uri}: unpickling needs module '{exc.name}'; NVIDIA network pickles need "
            "the dnnlib and torch_utils packages of NVlabs/stylegan2-ada-pytorch on "
            "sys.path"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"{uri}: cannot unpickle: {exc}") from exc


def _generator_state(obj: Any, source: str) -> Mapping[str, Tensor]:
    """The G_ema state dict inside an unpickled object (a network pickle dict, a module or a state dict)."""
    gen = obj["G_ema"] if isinstance(obj, Mapping) and "G_ema" in obj else obj
    if isinstance(gen, torch.nn.Module):
        return gen.state_dict()
    if isinstance(gen, Mapping) and gen and all(isinstance(v, Tensor) for v in gen.values()):
        return gen
    found = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"{source}: no 'G_ema' generator or state dict found (got {found})")


__all__ = ["convert_nvidia_pkl", "nvidia_to_rosinality"]
