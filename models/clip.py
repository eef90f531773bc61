"""CLIP image and text embeddings through open_clip, offline by construction.

``ClipEncoder`` wraps any open_clip architecture: a built-in name with a pretrained tag found in the local
cache, a name with a checkpoint file or fsspec URI, a custom architecture (dict or JSON) with random or given
weights, or our own safetensors checkpoint (kind ``clip``), whose header rebuilds the model. Nothing is ever
downloaded: a tag whose weights are not cached fails at once, naming the places it looked.

Images come in the generator's convention, float (B, 3, H, W) in [-1, 1]. Two preprocessing modes:
  ``clip``      the model's own preprocessing: [0, 1], shorter side resized (bicubic, antialiased), centre
                crop, mean/std normalisation. Close to, not bit-equal with, open_clip's PIL pipeline.
  ``deltaedit`` the official DeltaEdit code: nearest ×7 upsampling then AvgPool2d(H·7 / image_size), values
                left in [-1, 1], no mean/std. Needed to reuse the released mapper's CLIP space.
Embeddings are returned L2-normalised, float32, on the encoder's device.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache

from models.checkpoint import (
    CheckpointError,
    is_safetensors,
    load_safetensors,
    load_strict,
    read_bytes,
    save_safetensors,
)
from models.clip_preprocess import clip_preprocess, deltaedit_preprocess, pixels_to_tensor
from models.clip_templates import IMAGENET_TEMPLATES

PreprocessMode = Literal["clip", "deltaedit"]
TruncationPolicy = Literal["warn", "error", "ignore"]
KIND = "clip"
DEFAULT_PREPROCESS = {
    "mean": tuple(open_clip.OPENAI_DATASET_MEAN),
    "std": tuple(open_clip.OPENAI_DATASET_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


class ClipWeightsUnavailable(RuntimeError):
    """Pretrained weights that would have to be downloaded; this project never downloads."""


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than the text tower's context; the tokenizer cut it."""


class PromptTooLongError(ValueError):
    """A prompt longer than the context, with ``on_truncate='error'``."""


@dataclass(frozen=True)
class PromptCheck:
    text: str
    n_tokens: int  # tokens including start/end markers, before truncation
    context_length: int
    truncated: bool


# --- Offline weight resolution and model building -----------------------------------------------------


def resolve_pretrained(
    name: str, tag: str, cache_dir: str | None = None
) -> tuple[str, dict[str, Any]]:
    """Local file of an open_clip pretrained tag and the tag's config, from the caches only (no network).

    open_clip looks on the Hugging Face Hub (``hf_hub``) and at a URL cached under ``~/.cache/clip``; we look
    in the same places, read-only, and raise ClipWeightsUnavailable naming them when nothing is there.
    """
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        raise ValueError(
            f"unknown pretrained tag {tag!r} for {name}; "
            f"known tags: {open_clip.list_pretrained_tags_by_model(name)}"
        )
    looked: list[str] = []
    if cfg.get("file"):
        looked.append(cfg["file"])
        if os.path.isfile(cfg["file"]):
            return cfg["file"], cfg
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(
            cfg["hf_hub"]
        )  # "org/repo/" means open_clip's default file names
        names = (
            [filename]
            if filename
            else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        )
        for fn in names:
            looked.append(f"Hugging Face cache {repo}/{fn}")
            path = try_to_load_from_cache(
                repo, fn, cache_dir=cache_dir
            )  # reads the cache, never the network
            if isinstance(path, str):
                return path, cfg
    if cfg.get("url"):
        path = os.path.join(
            cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"])
        )
        looked.append(path)
        if os.path.isfile(path):
            return path, cfg
    raise ClipWeightsUnavailable(
        f"pretrained weights {name}:{tag} are not available offline (looked in: {'; '.join(looked)}). "
        f"This project never downloads weights: fetch them on a machine with network access and pass "
        f"checkpoint=<path or URI>, or populate the cache (cache_dir)."
    )


def model_config_for(
    name: str | None, model_config: dict | str | None
) -> tuple[str, dict[str, Any]]:
    """(model name, open_clip model config) from a dict, a JSON path/URI, or a built-in open_clip name."""
    if isinstance(model_config, (str, Path)):
        cfg = json.loads(read_bytes(str(model_config)))
        name = name or Path(str(model_config)).stem
    elif model_config is not None:
        cfg, name = deepcopy(dict(model_config)), name or "custom"
    elif not name:
        raise ValueError(
            "give an open_clip model name, a model_config, or one of our clip checkpoints"
        )
    elif name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"{name!r}: schema names are not supported (hf-hub needs the network); "
            f"pass model_config=<open_clip_config.json> and checkpoint=<weights> instead"
        )
    else:
        name = name.replace("/", "-")
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise ValueError(
                f"unknown open_clip model {name!r}; known: {', '.join(open_clip.list_models())}"
            )
    cfg = cfg.get(
        "model_cfg", cfg
    )  # accept open_clip_config.json files as well as bare model configs
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ValueError(f"model config for {name!r} lacks {missing}")
    return name, cfg


def build_open_clip(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """Instantiate an open_clip model from its config with random weights; never fetches tower weights."""
    cfg = deepcopy(model_cfg)
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    hf_text = "hf_model_name" in cfg["text_cfg"]
    if hf_text:
        cfg["text_cfg"]["hf_model_pretrained"] = False
    custom = cfg.pop("custom_text", False) or hf_text
    cls = (
        open_clip.CoCa
        if "multimodal_cfg" in cfg
        else open_clip.CustomTextCLIP
        if custom
        else open_clip.CLIP
    )
    with _hf_offline():
        return cls(**cfg)


def make_tokenizer(name: str, model_cfg: dict[str, Any]) -> Any:
    """open_clip's SimpleTokenizer at the model's context length; HF tokenizers only from the local cache."""
    text_cfg = model_cfg["text_cfg"]
    ctx, kwargs = text_cfg.get("context_length", 77), text_cfg.get("tokenizer_kwargs", {})
    if text_cfg.get("hf_tokenizer_name"):
        with _hf_offline():
            return open_clip.tokenizer.HFTokenizer(
                text_cfg["hf_tokenizer_name"],
                context_length=ctx,
                tokenizer_mode=text_cfg.get("tokenizer_mode"),
                **kwargs,
            )
    if "siglip" in name.lower():
        with _hf_offline():
            return open_clip.get_tokenizer(name, context_length=ctx)
    tok = open_clip.SimpleTokenizer(context_length=ctx, **kwargs)
    if text_cfg.get("vocab_size", tok.vocab_size) < tok.vocab_size:
        raise ValueError(
            f"text vocab_size {text_cfg['vocab_size']} is smaller than the tokenizer's "
            f"{tok.vocab_size}; open_clip's SimpleTokenizer needs the full BPE vocabulary"
        )
    return tok


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Hugging Face loaders inside read their local cache only (hub and transformers offline flags)."""
    with (
        mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}),
        mock.patch.object(hf_constants, "HF_HUB_OFFLINE", True),
    ):
        yield


@contextlib.contextmanager
def _local_file(uri: str, **storage_options: Any) -> Iterator[str]:
    """A local path for ``uri``: itself when local, else a temporary copy (open_clip loaders need paths)."""
    if "://" not in str(uri) or str(uri).startswith("file://"):
        yield str(uri).removeprefix("file://")
        return
    fd, path = tempfile.mkstemp(suffix=Path(str(uri)).suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(read_bytes(uri, **storage_options))
        yield path
    finally:
        os.unlink(path)


# --- The encoder --------------------------------------------------------------------------------------


class ClipEncoder:
    """An open_clip model with its tokenizer, preprocessing and provenance; embeds images and prompts."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        model_name: str,
        model_cfg: dict[str, Any],
        preprocess_cfg: dict[str, Any] | None = None,
        preprocess: PreprocessMode = "clip",
        source: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        on_truncate: TruncationPolicy = "warn",
    ) -> None:
        if preprocess not in ("clip", "deltaedit"):
            raise ValueError(f"preprocess must be 'clip' or 'deltaedit', got {preprocess!r}")
        sizes = (
            {model.visual.image_size}
            if isinstance(model.visual.image_size, int)
            else set(model.visual.image_size)
        )
        if len(sizes) != 1:
            raise ValueError(
                f"non-square CLIP image size {model.visual.image_size} is not supported"
            )
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.model_name, self.model_cfg = model_name, model_cfg
        self.preprocess_cfg = {**DEFAULT_PREPROCESS, **(preprocess_cfg or {})}
        self.preprocess_mode: PreprocessMode = preprocess
        self.source = dict(source or {})  # pretrained tag / checkpoint it came from
        self.lineage: dict[str, Any] = {}  # from our checkpoint's header, if any
        self.device = torch.device(device)
        self.batch_size, self.on_truncate = batch_size, on_truncate
        self.image_size: int = sizes.pop()
        self.embed_dim: int = int(model_cfg["embed_dim"])
        self.context_length: int = int(model_cfg["text_cfg"].get("context_length", 77))

    @classmethod
    def load(
        cls,
        name: str | None = None,
        pretrained: str | None = None,
        checkpoint: str | None = None,
        model_config: dict | str | None = None,
        device: str | torch.device = "cpu",
        preprocess: PreprocessMode | None = None,
        *,
        batch_size: int = 64,
        cache_dir: str | None = None,
        on_truncate: TruncationPolicy = "warn",
        **storage_options: Any,
    ) -> "ClipEncoder":
        """Build an encoder without touching the network.

        Args:
            name: open_clip architecture (``ViT-B-32``), or a label for ``model_config``; optional for our
                checkpoints, whose header names the model (a different name is an error).
            pretrained: open_clip tag (``openai``, ``laion2b_s34b_b79k``), resolved from the local caches only.
            checkpoint: our safetensors (kind ``clip``) or open_clip-compatible weights, path or fsspec URI.
            model_config: custom architecture, dict or JSON path/URI; random weights unless ``checkpoint``.
            preprocess: ``clip`` (default) or ``deltaedit``; for our checkpoints the saved mode by default.
        """
        opts = dict(device=device, batch_size=batch_size, on_truncate=on_truncate)
        if (
            pretrained
            and checkpoint is None
            and ("://" in pretrained or os.path.isfile(pretrained))
        ):
            pretrained, checkpoint = (
                None,
                pretrained,
            )  # open_clip also accepts a file as ``pretrained``
        if checkpoint is not None and pretrained is not None:
            raise ValueError("give either pretrained (a tag) or checkpoint (a file), not both")
        if checkpoint is not None and is_safetensors(checkpoint):
            tensors, header = load_safetensors(checkpoint, **storage_options)
            if header["kind"] == KIND:
                return cls._from_ours(tensors, header, name, checkpoint, preprocess, **opts)
            if header["kind"] is not None:
                raise CheckpointError(
                    f"{checkpoint} holds a '{header['kind']}' checkpoint, not a CLIP model"
                )
        name, model_cfg = model_config_for(name, model_config)
        pp: dict[str, Any] = {}
        weights, source = checkpoint, {"checkpoint": checkpoint} if checkpoint else {}
        if pretrained is not None:
            weights, tag_cfg = resolve_pretrained(name, pretrained, cache_dir)
            pp = {k: tag_cfg[k] for k in DEFAULT_PREPROCESS if k in tag_cfg}
            model_cfg["quick_gelu"] = tag_cfg.get("quick_gelu", model_cfg.get("quick_gelu", False))
            source = {"pretrained": pretrained}
        model = build_open_clip(model_cfg)
        if weights is not None:
            with _local_file(weights, **storage_options) as path:
                open_clip.load_checkpoint(model, path, strict=True)
        return cls(
            model,
            make_tokenizer(name, model_cfg),
            model_name=name,
            model_cfg=model_cfg,
            preprocess_cfg=pp,
            preprocess=preprocess or "clip",
            source=source,
            **opts,
        )

    @classmethod
    def _from_ours(
        cls,
        tensors: dict[str, torch.Tensor],
        header: dict[str, Any],
        name: str | None,
        uri: str,
        preprocess: PreprocessMode | None,
        **opts: Any,
    ) -> "ClipEncoder":
        cfg = header["config"]
        if name is not None and name.replace("/", "-") != cfg["model_name"]:
            raise CheckpointError(f"{uri} holds CLIP model {cfg['model_name']!r}, not {name!r}")
        model = build_open_clip(cfg["model_cfg"])
        load_strict(model, tensors, str(uri))
        encoder = cls(
            model,
            make_tokenizer(cfg["model_name"], cfg["model_cfg"]),
            model_name=cfg["model_name"],
            model_cfg=cfg["model_cfg"],
            preprocess_cfg=cfg["preprocess_cfg"],
            preprocess=preprocess or cfg["preprocess_mode"],
            source={"checkpoint": str(uri)},
            **opts,
        )
        encoder.lineage = header["lineage"]
        return encoder

    def save(self, uri: str, lineage: dict[str, Any] | None = None) -> None:
        """Our safetensors format: weights + model name, open_clip config and preprocessing in the header."""
        config = {
            "model_name": self.model_name,
            "model_cfg": self.model_cfg,
            "preprocess_cfg": self.preprocess_cfg,
            "preprocess_mode": self.preprocess_mode,
            "source": self.source,
        }
        save_safetensors(
            uri,
            self.model.state_dict(),
            config=config,
            lineage=self.lineage if lineage is None else lineage,
            kind=KIND,
        )

    def describe(self) -> dict[str, Any]:
        """What produced an embedding, for store metadata: model, weights, preprocessing."""
        pre: dict[str, Any] = {"mode": self.preprocess_mode, "image_size": self.image_size}
        if self.preprocess_mode == "clip":
            pre.update(
                {k: list(v) if isinstance(v, tuple) else v for k, v in self.preprocess_cfg.items()}
            )
        return {
            "model_name": self.model_name,
            "pretrained": self.source.get("pretrained"),
            "checkpoint": self.source.get("checkpoint"),
            "embed_dim": self.embed_dim,
            "preprocess": pre,
        }

    # -- images -------------------------------------------------------------------------------------------

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, S, S) model input, per ``preprocess_mode``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        if self.preprocess_mode == "deltaedit":
            return deltaedit_preprocess(images, self.image_size)
        c = self.preprocess_cfg
        return clip_preprocess(
            images, self.image_size, c["mean"], c["std"], c["interpolation"], c["resize_mode"]
        )

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """(B, 3, H, W) float in [-1, 1] -> (B, D) unit-norm embeddings, in batches of ``batch_size``."""
        outs = [torch.empty(0, self.embed_dim, device=self.device)]
        step = batch_size or self.batch_size
        for chunk in (images[i : i + step] for i in range(0, len(images), step)):  # (b, 3, H, W)
            feats = self.model.encode_image(self.preprocess(chunk.to(self.device)))
            outs.append(F.normalize(feats.float(), dim=-1))
        return torch.cat(outs)

    def encode_pixels(self, images: Any, batch_size: int | None = None) -> torch.Tensor:
        """PIL images or uint8 (B, H, W, 3) -> (B, D), through the same path as generator outputs."""
        if (
            isinstance(images, (list, tuple))
            and len({getattr(im, "size", None) for im in images}) > 1
        ):
            return torch.cat([self.encode_pixels([im], batch_size) for im in images])
        return self.encode_images(pixels_to_tensor(images), batch_size)

    # -- text ---------------------------------------------------------------------------------------------

    def check_prompt(self, text: str) -> PromptCheck:
        """Validate a prompt and count its tokens; empty or whitespace-only prompts raise ValueError.

        Any Unicode text is accepted: the BPE is byte-level, so non-ASCII characters become byte tokens
        (after ftfy clean-up and lower-casing); CLIP saw little non-English text, so expect weak embeddings.
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"prompt must be non-empty text, got {text!r}")
        if hasattr(self.tokenizer, "encode") and hasattr(self.tokenizer, "eot_token_id"):
            n = len(self.tokenizer.encode(text)) + 2  # + start and end markers
        else:  # other tokenizers: a full row means it may have been cut
            n = int((self.tokenizer([text])[0] != 0).sum())
            n += n >= self.context_length
        return PromptCheck(text, n, self.context_length, n > self.context_length)

    def _tokens(self, texts: Sequence[str], labels: Sequence[str] | None = None) -> torch.Tensor:
        """Token ids (N, context); one warning (or error, per ``on_truncate``) for the prompts cut short."""
        checks = [self.check_prompt(t) for t in texts]
        cut = [i for i, c in enumerate(checks) if c.truncated]
        if cut and self.on_truncate != "ignore":
            first = checks[cut[0]]
            msg = (
                f"{len(cut)} of {len(texts)} prompts exceed the context length {self.context_length} and "
                f"are truncated by the tokenizer, e.g. {(labels or texts)[cut[0]][:80]!r} "
                f"({first.n_tokens} tokens)"
            )
            if self.on_truncate == "error":
                raise PromptTooLongError(msg)
            warnings.warn(msg, PromptTruncatedWarning, stacklevel=3)
        return self.tokenizer(list(texts))

    @torch.no_grad()
    def _embed_tokens(self, tokens: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        outs = [torch.empty(0, self.embed_dim, device=self.device)]
        step = batch_size or self.batch_size
        for chunk in (tokens[i : i + step] for i in range(0, len(tokens), step)):  # (b, context)
            outs.append(F.normalize(self.model.encode_text(chunk.to(self.device)).float(), dim=-1))
        return torch.cat(outs)  # (N, D)

    def encode_text(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """Prompts -> (N, D) unit-norm embeddings. Long prompts warn (or raise, per ``on_truncate``)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self._embed_tokens(self._tokens(texts), batch_size)

    def encode_prompt(
        self, text: str, templates: Sequence[str] = IMAGENET_TEMPLATES
    ) -> torch.Tensor:
        """(D,) unit-norm mean of the unit-norm embeddings of ``template.format(text)``, as StyleCLIP does."""
        self.check_prompt(text)
        prompts = [t.format(text) for t in templates]
        feats = self._embed_tokens(
            self._tokens(prompts, [text] * len(prompts))
        )  # (T, D), each unit norm
        return F.normalize(feats.mean(dim=0), dim=-1)

    def delta_text(
        self, source: str, target: str, templates: Sequence[str] = IMAGENET_TEMPLATES
    ) -> torch.Tensor:
        """Δt = t(target) − t(source), (D,), not normalised (the relevance threshold uses its raw scale)."""
        return self.encode_prompt(target, templates) - self.encode_prompt(source, templates)
