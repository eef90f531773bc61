"""e4e image encoder: real images → W+ of a StyleGAN2 generator (the inversion step of DeltaEdit).

`Encoder` wraps e4e's network under the same names as e4e's pSp module (``encoder.*``, ``decoder.*``),
so an official checkpoint loads strictly, and adds ``latent_avg`` like pSp with ``start_from_latent_avg``.
The default constructor arguments are the official architecture (IR-SE-50, 256 px, 512-d styles); every
width and depth is an argument so a toy domain can train a tiny encoder with the same code, e.g.

    Encoder(n_styles=10, style_dim=64, input_size=64, backbone_blocks=(1, 1, 1, 1), widths=(16, 32, 32, 64))
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from models.checkpoint import CheckpointError, is_safetensors, load_safetensors, save_safetensors
from models.e4e_blocks import Encoder4Editing
from models.stylegan2 import Generator, build_and_load, config_from_json, infer_config, load_public

KIND = "e4e"


class Encoder(nn.Module):
    """Images (B, 3, input_size, input_size) in [-1, 1] → W+ (B, n_styles, style_dim), latent_avg included."""

    def __init__(
        self,
        n_styles: int = 18,
        style_dim: int = 512,
        input_size: int = 256,
        backbone_blocks: Sequence[int] = (3, 4, 14, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        se_reduction: int = 16,
        coarse_ind: int = 3,
        middle_ind: int = 7,
        generator: Generator | None = None,
    ):
        """
        Args:
            n_styles: rows of W+ = the paired generator's n_latent (18 at 1024 px, 10 at 64 px).
            style_dim: width of w (512 for FFHQ).
            input_size: side of the input images; 16 × a power of two ≥ 2 (256 official, 64 toy).
            backbone_blocks: IR-SE units per stage ((3, 4, 14, 3) = IR-SE-50).
            widths: channels per stage; widths[0] is also the stem width.
            se_reduction: squeeze-and-excitation channel reduction.
            coarse_ind, middle_ind: first style index that reads the middle / fine pyramid level.
            generator: the paired StyleGAN2 generator (stored as the `decoder` sub-module), or None.
        """
        super().__init__()
        self.config: dict[str, Any] = dict(
            n_styles=n_styles,
            style_dim=style_dim,
            input_size=input_size,
            backbone_blocks=list(backbone_blocks),
            widths=list(widths),
            se_reduction=se_reduction,
            coarse_ind=coarse_ind,
            middle_ind=middle_ind,
        )
        self.n_styles, self.style_dim, self.input_size = n_styles, style_dim, input_size
        self.encoder = Encoder4Editing(
            n_styles,
            style_dim,
            input_size,
            backbone_blocks,
            widths,
            se_reduction,
            coarse_ind,
            middle_ind,
        )
        self.register_module("decoder", generator)
        # Added to the network output (pSp's start_from_latent_avg); kept outside the state dict like e4e.
        self.register_buffer("latent_avg", torch.zeros(n_styles, style_dim), persistent=False)

    @property
    def generator(self) -> Generator | None:
        """The paired generator (the checkpoint's `decoder.*`), or None."""
        return self.decoder

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) in [-1, 1], S = input_size → w_plus (B, n_styles, style_dim)."""
        expected = (3, self.input_size, self.input_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(images.shape)}; resize to {self.input_size} px first"
            )
        return self.encoder(images) + self.latent_avg

    # --- checkpoints -------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls, path_or_uri: str, *, storage_options: Mapping[str, Any] | None = None, **arch: Any
    ) -> "Encoder":
        """Load an official e4e checkpoint (``{'state_dict', 'latent_avg', 'opts'}``) or one of ours.

        Official checkpoints get the official architecture (``arch`` overrides constructor arguments for
        e4e-format files of other widths) with n_styles from ``opts['stylegan_size']``, else from the
        number of style blocks. ``encoder.*`` is loaded strictly; ``decoder.*``, when present, becomes
        `generator` (architecture inferred from its weights, also strict). The result is in eval mode.
        ``storage_options`` go to fsspec (e.g. an S3 endpoint).
        """
        uri, opts = str(path_or_uri), dict(storage_options or {})
        if is_safetensors(uri):
            if arch:
                raise TypeError(
                    "architecture overrides apply to e4e .pt files; ours carry their config"
                )
            return cls._from_ours(uri, opts)
        ckpt = load_public(uri, **opts)
        if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
            found = list(ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
            raise CheckpointError(
                f"{uri}: expected an e4e checkpoint with 'state_dict', got {found}"
            )
        state, opts = dict(ckpt["state_dict"]), dict(ckpt.get("opts") or {})
        n_styles = _n_styles(state, opts, uri)
        enc_state, dec_state = _split(state, uri)
        arch = {"n_styles": n_styles, **arch}
        enc = build_and_load(lambda: cls(**arch), enc_state, uri, copy=False)
        avg = ckpt.get("latent_avg")
        avg = _broadcast_avg(avg, n_styles, enc.style_dim, uri) if avg is not None else None
        use_avg = avg is not None and opts.get("start_from_latent_avg", True)
        enc.latent_avg = avg if use_avg else torch.zeros(n_styles, enc.style_dim)
        if dec_state:
            # W mean for the generator: e4e stores it repeated per row; the row mean recovers it.
            gen_avg = avg.mean(dim=0) if avg is not None else None
            enc.decoder = _paired_generator(dec_state, enc, gen_avg, f"{uri} (decoder.*)")
        return enc.eval()

    def save(self, path_or_uri: str, lineage: Mapping[str, Any] | None = None) -> None:
        """Our safetensors format: encoder.* (+ decoder.*), latent_avg(s); configs in the header."""
        tensors = dict(self.state_dict())
        tensors["latent_avg"] = self.latent_avg
        gen = self.generator
        if gen is not None and gen.latent_avg is not None:
            tensors["generator_latent_avg"] = gen.latent_avg
        config = dict(self.config, generator=gen.config if gen is not None else None)
        save_safetensors(str(path_or_uri), tensors, config=config, lineage=lineage, kind=KIND)

    @classmethod
    def _from_ours(cls, uri: str, storage_options: Mapping[str, Any]) -> "Encoder":
        tensors, header = load_safetensors(uri, **storage_options)
        if header["kind"] != KIND:
            raise CheckpointError(
                f"{uri}: checkpoint kind is {header['kind']!r}, expected {KIND!r}"
            )
        config = dict(header["config"])
        gen_config = config.pop("generator", None)
        latent_avg = tensors.pop("latent_avg", None)
        gen_avg = tensors.pop("generator_latent_avg", None)
        enc_state, dec_state = _split(tensors, uri)
        enc = build_and_load(lambda: cls(**config), enc_state, uri, copy=False)
        enc.latent_avg = (
            latent_avg if latent_avg is not None else torch.zeros(enc.n_styles, enc.style_dim)
        )
        if gen_config is not None:
            enc.decoder = Generator.from_state_dict(
                dec_state,
                gen_avg,
                config=config_from_json(gen_config),
                source=f"{uri} (decoder.*)",
                copy=False,
            )
        elif dec_state:
            raise CheckpointError(f"{uri}: has decoder.* tensors but no generator config")
        return enc.eval()


def _paired_generator(
    state: Mapping[str, Tensor], enc: Encoder, latent_avg: Tensor | None, source: str
) -> Generator:
    """The decoder, strictly loaded; its W+ rows must match the encoder's styles."""
    config = infer_config(state, source)
    n_latent = 2 * int(math.log2(config["size"])) - 2
    if n_latent != enc.n_styles or config["style_dim"] != enc.style_dim:
        raise CheckpointError(
            f"{source}: decoder has {n_latent} W+ rows of {config['style_dim']}, "
            f"encoder predicts {enc.n_styles} of {enc.style_dim}"
        )
    return Generator.from_state_dict(state, latent_avg, config=config, source=source, copy=False)


def _split(state: Mapping[str, Tensor], source: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(encoder.* with prefix kept, decoder.* with prefix stripped); anything else is an error."""
    enc = {k: v for k, v in state.items() if k.startswith("encoder.")}
    dec = {k[len("decoder.") :]: v for k, v in state.items() if k.startswith("decoder.")}
    other = [k for k in state if not k.startswith(("encoder.", "decoder."))]
    if other:
        raise CheckpointError(
            f"{source}: unexpected keys {other[:8]} (expected encoder.* and decoder.*)"
        )
    return enc, dec


def _n_styles(state: Mapping[str, Tensor], opts: Mapping[str, Any], source: str) -> int:
    """2·log2(stylegan_size) − 2 when the options say, else the number of style blocks in the weights."""
    if opts.get("stylegan_size"):
        return 2 * int(math.log2(int(opts["stylegan_size"]))) - 2
    idx = [
        int(m.group(1))
        for k in state
        if (m := re.fullmatch(r"encoder\.styles\.(\d+)\.linear\.weight", k))
    ]
    if not idx:
        raise CheckpointError(
            f"{source}: no 'encoder.styles.N.linear.weight' keys and no opts['stylegan_size']"
        )
    return max(idx) + 1


def _broadcast_avg(latent_avg: Tensor, n_styles: int, style_dim: int, source: str) -> Tensor:
    """(style_dim,), (1, style_dim) or (n_styles, style_dim) → (n_styles, style_dim)."""
    rows = latent_avg.reshape(-1, style_dim) if latent_avg.numel() % style_dim == 0 else None
    if rows is None or rows.shape[0] not in (1, n_styles):
        raise CheckpointError(
            f"{source}: 'latent_avg' has shape {tuple(latent_avg.shape)}, "
            f"model expects ({n_styles}, {style_dim}) or ({style_dim},)"
        )
    return rows.expand(n_styles, style_dim).float().clone()
