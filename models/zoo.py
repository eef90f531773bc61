"""One model zoo: names → builders, with typed specs that configs carry.

A config names a model and where its weights are; the zoo turns that into a ready module::

    generator: {name: stylegan2, checkpoint: s3://bucket/ffhq.pt, size: 1024}
    clip:      {name: open_clip, model: ViT-B-32, pretrained: openai, preprocess: deltaedit}
    mapper:    {name: delta_mapper, checkpoint: {uri: runs/x/mapper.safetensors, sha256: 9f2c...}}

``zoo.build(spec, device=...)`` checks the name, the options (against the builder's signature) and the
checkpoint's sha256 when given, then calls the builder. Heavy modules are imported only when built, so
listing or validating specs stays cheap. Presets are entries with default options (``clip_vit_b32``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.errors import CheckpointError

Builder = Callable[
    ..., Any
]  # builder(checkpoint: str | None, *, device, storage_options, **options)
_FIELDS = ("name", "checkpoint", "options", "sha256")


class UnknownModelError(ValueError):
    """A spec naming a model the zoo does not know."""


class ChecksumError(CheckpointError):
    """A checkpoint whose sha256 differs from the one its spec pins."""


class CheckpointRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str  # local path or fsspec URI
    sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-fA-F]{8,64}$"
    )  # full digest or a prefix


class ModelSpec(BaseModel):
    """``{name, checkpoint, **options}``: extra keys become ``options``; ``sha256`` may sit at the top."""

    model_config = ConfigDict(extra="forbid")

    name: str  # a zoo entry, see list_models()
    checkpoint: CheckpointRef | None = None  # a URI string or {uri, sha256}
    options: dict[str, Any] = {}  # builder keyword arguments

    @model_validator(mode="before")
    @classmethod
    def _gather_options(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        extra = {k: data.pop(k) for k in list(data) if k not in _FIELDS}
        ckpt, sha = data.get("checkpoint"), data.pop("sha256", None)
        if isinstance(ckpt, str):
            ckpt = {"uri": ckpt}
        if sha is not None:
            if ckpt is None:
                raise ValueError("sha256 given without a checkpoint")
            ckpt = {**dict(ckpt), "sha256": sha}
        return {**data, "checkpoint": ckpt, "options": {**dict(data.get("options") or {}), **extra}}


@dataclass(frozen=True)
class Entry:
    name: str
    builder: Builder
    role: str  # generator | encoder | clip | mapper | ...
    defaults: dict[str, Any] = field(default_factory=dict)  # options a preset fixes
    description: str = ""


_REGISTRY: dict[str, Entry] = {}


def register(
    name: str,
    builder: Builder | None = None,
    *,
    role: str,
    defaults: dict[str, Any] | None = None,
    description: str = "",
    overwrite: bool = False,
) -> Any:
    """Add an entry; usable as ``@register("name", role="mapper")`` or ``register("name", fn, role=...)``."""

    def add(fn: Builder) -> Builder:
        if name in _REGISTRY and not overwrite:
            raise ValueError(
                f"model {name!r} is already registered (pass overwrite=True to replace it)"
            )
        doc = description or (inspect.getdoc(fn) or "").split("\n")[0]
        _REGISTRY[name] = Entry(name, fn, role, dict(defaults or {}), doc)
        return fn

    return add if builder is None else add(builder)


def list_models(role: str | None = None) -> list[str]:
    """Registered names, sorted; only those of one ``role`` when given."""
    return sorted(n for n, e in _REGISTRY.items() if role is None or e.role == role)


def get(name: str) -> Entry:
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name]


def as_spec(spec: ModelSpec | Mapping[str, Any] | str) -> ModelSpec:
    """A ModelSpec from itself, a config mapping, or a bare name."""
    if isinstance(spec, ModelSpec):
        return spec
    return ModelSpec.model_validate({"name": spec} if isinstance(spec, str) else spec)


def validate(spec: ModelSpec | Mapping[str, Any] | str) -> ModelSpec:
    """Check name and option names without building anything (for early config checks)."""
    spec = as_spec(spec)
    entry = get(spec.name)
    _check_options(entry, {**entry.defaults, **spec.options})
    return spec


def build(
    spec: ModelSpec | Mapping[str, Any] | str,
    device: str = "cpu",
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Build the model a spec names: options checked, checkpoint sha256 verified when pinned."""
    spec = validate(spec)
    entry = get(spec.name)
    uri = None
    if spec.checkpoint is not None:
        uri = spec.checkpoint.uri
        if spec.checkpoint.sha256:
            verify_sha256(uri, spec.checkpoint.sha256, **dict(storage_options or {}))
    return entry.builder(
        uri,
        device=device,
        storage_options=dict(storage_options or {}),
        **{**entry.defaults, **spec.options},
    )


def sha256_of(uri: str, **storage_options: Any) -> str:
    """Hex sha256 of a local file or fsspec URI, streamed in 8 MiB chunks."""
    digest = hashlib.sha256()
    try:
        with fsspec.open(str(uri), "rb", **storage_options) as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint not found: {uri}") from exc
    return digest.hexdigest()


_DIGESTS: dict[tuple[str, str], str] = {}


def identity(
    spec: ModelSpec | None, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """What a model *is*, for stage fingerprints: name, options and the checkpoint's sha256 — not its path,
    so retrained weights at the same path redo the stages that used them, and a moved run stays done.
    Digests are memoised per file version (size + mtime/ETag), so a stage pays for hashing once."""
    if spec is None:
        return None
    out = spec.model_dump(mode="json", exclude={"checkpoint"})
    if spec.checkpoint is not None:
        out["sha256"] = _digest(spec.checkpoint.uri, dict(storage_options or {}))
    return out


def _digest(uri: str, storage_options: dict[str, Any]) -> str:
    fs, path = fsspec.core.url_to_fs(str(uri), **storage_options)
    try:
        info = fs.info(path)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint not found: {uri}") from exc
    version = json.dumps(
        [info.get(k) for k in ("size", "mtime", "ETag", "LastModified")], default=str
    )
    key = (str(uri), version)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_of(uri, **storage_options)
    return _DIGESTS[key]


def verify_sha256(uri: str, expected: str, **storage_options: Any) -> None:
    actual = sha256_of(uri, **storage_options)
    if not actual.startswith(expected.lower()):
        raise ChecksumError(
            f"checkpoint {uri}: sha256 mismatch, the spec pins {expected.lower()}, "
            f"the file has {actual}"
        )


def _check_options(entry: Entry, options: Mapping[str, Any]) -> None:
    params = inspect.signature(entry.builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        n
        for n, p in params.items()
        if p.kind is p.KEYWORD_ONLY and n not in ("device", "storage_options")
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {entry.name!r} does not take option(s) {unknown}; it accepts {accepted}"
        )


# ---------------------------------------------------------------------------------------------------------
# Entries
# ---------------------------------------------------------------------------------------------------------

StorageOptions = Mapping[str, Any] | None


@register("stylegan2", role="generator")
def _stylegan2(
    checkpoint: str | None,
    *,
    device: str = "cpu",
    storage_options: StorageOptions = None,
    size: int | None = None,
    style_dim: int = 512,
    n_mlp: int = 8,
    channel_multiplier: int = 2,
    channels: dict[int, int] | None = None,
) -> Any:
    """rosinality StyleGAN2 generator: a rosinality/our checkpoint, or a fresh one (size required)."""
    from models.stylegan2 import (
        Generator,  # deferred: a model's code (open_clip for CLIP) loads only when it is built
    )

    if checkpoint is not None:
        if channels is not None:
            raise ValueError(
                "stylegan2: 'channels' applies to fresh generators; checkpoints carry theirs"
            )
        gen = Generator.from_checkpoint(
            checkpoint,
            size=size,
            style_dim=style_dim,
            n_mlp=n_mlp,
            channel_multiplier=channel_multiplier,
            storage_options=storage_options,
        )
    elif size is None:
        raise ValueError("stylegan2 without a checkpoint needs 'size'")
    else:
        gen = Generator(size, style_dim, n_mlp, channel_multiplier, channels=channels)
    return gen.to(device)


@register("e4e", role="encoder")
def _e4e(
    checkpoint: str | None, *, device: str = "cpu", storage_options: StorageOptions = None
) -> Any:
    """e4e encoder (images → W+), from an official or our checkpoint."""
    from models.e4e import (
        Encoder,  # deferred: a model's code (open_clip for CLIP) loads only when it is built
    )

    if checkpoint is None:
        raise ValueError("e4e needs a checkpoint")
    return Encoder.from_checkpoint(checkpoint, storage_options=storage_options).to(device)


@register("open_clip", role="clip")
def _open_clip(
    checkpoint: str | None,
    *,
    device: str = "cpu",
    storage_options: StorageOptions = None,
    model: str | None = None,
    pretrained: str | None = None,
    model_config: dict | str | None = None,
    preprocess: str | None = None,
    batch_size: int = 64,
    cache_dir: str | None = None,
    on_truncate: str = "warn",
) -> Any:
    """Any open_clip model: tag from the local cache, checkpoint file/URI, or custom config."""
    from models.clip import (
        ClipEncoder,  # deferred: a model's code (open_clip for CLIP) loads only when it is built
    )

    return ClipEncoder.load(
        model,
        pretrained=pretrained,
        checkpoint=checkpoint,
        model_config=model_config,
        device=device,
        preprocess=preprocess,  # type: ignore[arg-type]
        batch_size=batch_size,
        cache_dir=cache_dir,
        on_truncate=on_truncate,  # type: ignore[arg-type]
        **(storage_options or {}),
    )


def _mapper(cls_name: str) -> Builder:
    """Builder for a mapper class: our checkpoint (header config), a torch state dict, or a fresh model."""

    def builder(
        checkpoint: str | None,
        *,
        device: str = "cpu",
        storage_options: StorageOptions = None,
        size: int | None = None,
        channel_multiplier: int = 2,
        channels: dict[int, int] | None = None,
        clip_dim: int = 512,
        num_layers: int = 4,
        lr_mul: float = 0.01,
        norm_axis: str = "layer",
    ) -> Any:
        import models.delta_mapper as dm  # deferred: a model's code (open_clip for CLIP) loads only when it is built

        cls = getattr(dm, cls_name)
        cfg = (
            None
            if size is None
            else dm.MapperConfig.for_generator(
                size,
                channel_multiplier,
                channels,
                clip_dim=clip_dim,
                num_layers=num_layers,
                lr_mul=lr_mul,
                norm_axis=norm_axis,
            )
        )
        if (
            checkpoint is not None
        ):  # cfg is used for torch state dicts (net_face.pth); ours carry their own
            return cls.from_checkpoint(checkpoint, config=cfg, **(storage_options or {})).to(device)
        if cfg is None:
            raise ValueError(f"{cls.KIND} without a checkpoint needs the generator 'size'")
        return cls(cfg).to(device)

    return builder


register(
    "delta_mapper",
    _mapper("DeltaMapper"),
    role="mapper",
    description="DeltaEdit's Delta Mapper (s, i, Δi) → Δs: our or the official checkpoint, or fresh",
)
register(
    "straightforward_mapper",
    _mapper("StraightforwardMapper"),
    role="mapper",
    description="the paper's naïve baseline mapper (s, i₁, i₂) → Δs",
)


@register("style_diffusion", role="diffusion")
def _style_diffusion(
    checkpoint: str | None, *, device: str = "cpu", storage_options: StorageOptions = None
) -> Any:
    """DeltaEdit-D's style-conditioned diffusion U-Net, from one of our ``style_diffusion`` checkpoints."""
    from models.diffusion import (
        StyleUNet,  # deferred: a model's code (open_clip for CLIP) loads only when it is built
    )

    if checkpoint is None:
        raise ValueError(
            "style_diffusion needs a checkpoint (train one with `deltaedit run train-diffusion`)"
        )
    return StyleUNet.from_checkpoint(checkpoint, **(storage_options or {})).to(device).eval()


# presets: the paper's setting
register(
    "clip_vit_b32",
    _open_clip,
    role="clip",
    defaults={"model": "ViT-B-32", "pretrained": "openai"},
    description="CLIP ViT-B/32 (OpenAI weights from the local cache), proper preprocessing",
)
register(
    "clip_vit_b32_deltaedit",
    _open_clip,
    role="clip",
    defaults={"model": "ViT-B-32", "pretrained": "openai", "preprocess": "deltaedit"},
    description="CLIP ViT-B/32 with DeltaEdit's preprocessing, to reuse the released mapper",
)
register(
    "stylegan2_ffhq",
    _stylegan2,
    role="generator",
    defaults={"size": 1024},
    description="rosinality StyleGAN2 FFHQ 1024 (config-f)",
)
register(
    "deltaedit_ffhq",
    _mapper("DeltaMapper"),
    role="mapper",
    defaults={"size": 1024, "clip_dim": 512},
    description="the released DeltaEdit FFHQ mapper (net_face.pth) layout",
)
