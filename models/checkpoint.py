"""Reading and writing weights: any local path or fsspec URI, strict checks with errors that name the parameter.

Public checkpoints (rosinality, e4e, DeltaEdit) are torch pickles: they are read with
``torch.load(weights_only=True)``. Our own weights are safetensors with a JSON header holding the
model's config and lineage, so a checkpoint alone rebuilds the exact model.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from models.errors import CheckpointError


def read_bytes(uri: str, **storage_options: Any) -> bytes:
    """Bytes of a local path or any fsspec URI (s3://, gs://, file://, memory://, ...)."""
    try:
        with fsspec.open(str(uri), "rb", **storage_options) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint not found: {uri}") from exc


def write_bytes(uri: str, data: bytes, **storage_options: Any) -> None:
    """Write bytes to a local path or fsspec URI, creating parent folders."""
    fs, path = fsspec.core.url_to_fs(str(uri), **storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def load_torch(uri: str, *, allow_pickle: bool = False, **storage_options: Any) -> Any:
    """``torch.load`` of a path/URI on CPU. Arbitrary pickles run code: only with ``allow_pickle=True``."""
    buf = io.BytesIO(read_bytes(uri, **storage_options))
    try:
        return torch.load(buf, map_location="cpu", weights_only=not allow_pickle)
    except (
        Exception
    ) as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        hint = (
            "" if allow_pickle else " (it may hold Python objects beyond tensors; see allow_pickle)"
        )
        raise CheckpointError(f"cannot read checkpoint {uri}: {exc}{hint}") from exc


def check_state_dict(
    expected: Mapping[str, torch.Size], got: Mapping[str, torch.Tensor], source: str
) -> None:
    """Raise CheckpointError naming every missing/unexpected key and every shape mismatch."""
    problems: list[str] = []
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    for key, shape in expected.items():
        if key in got and tuple(got[key].shape) != tuple(shape):
            problems.append(
                f"parameter '{key}': checkpoint has shape {tuple(got[key].shape)}, "
                f"model expects {tuple(shape)}"
            )
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def load_strict(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    """``load_state_dict(strict=True)`` with our readable errors first."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(expected, state_dict, source)
    module.load_state_dict(dict(state_dict), strict=True)


def save_safetensors(
    uri: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    config: Mapping[str, Any],
    lineage: Mapping[str, Any] | None = None,
    kind: str,
) -> None:
    """Save weights with a JSON header: ``kind`` (model family), ``config`` (constructor args), ``lineage``."""
    header = {
        "kind": kind,
        "config": json.dumps(dict(config), sort_keys=True),
        "lineage": json.dumps(dict(lineage or {}), sort_keys=True),
    }
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_bytes(uri, _sorted_metadata(st_save(contiguous, metadata=header)))


def _sorted_metadata(data: bytes) -> bytes:
    """The same safetensors file with its ``__metadata__`` keys in sorted order.

    safetensors writes the metadata from a Rust HashMap, in a new order on every save, so the same weights
    would get a new sha256 each time they are saved, and the stages that fingerprint a checkpoint by its
    digest (``models.zoo.identity``) would rerun after an identical retraining. Tensor entries and data
    are kept as they are; the header stays space-padded to a multiple of 8 bytes, as safetensors pads it.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items())), **header}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def load_safetensors(
    uri: str, **storage_options: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and header (``kind``, ``config``, ``lineage`` decoded from JSON) of one of our checkpoints."""
    data = read_bytes(uri, **storage_options)
    try:
        tensors = st_load(data)
        header = _safetensors_metadata(data)
    except Exception as exc:
        raise CheckpointError(f"cannot read safetensors checkpoint {uri}: {exc}") from exc
    return tensors, {
        "kind": header.get("kind"),
        "config": json.loads(header.get("config", "{}")),
        "lineage": json.loads(header.get("lineage", "{}")),
    }


def is_safetensors(uri: str) -> bool:
    return str(uri).endswith(".safetensors")


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}


def _few(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} in all)"
