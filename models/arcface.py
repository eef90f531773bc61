"""ArcFace IR-SE-50: the face-identity network the field measures identity preservation with.

The network and its file are those e4e, pSp, StyleCLIP and HFGI use (``model_ir_se50.pth``, a plain
``torch.save``d state dict of InsightFace's IR-SE-50 at 112 px, as TreB1eN's PyTorch port names its
parameters). Identity similarity is the cosine of two images' embeddings, after the same preprocessing
as e4e's ID loss: resize to 256 (area average), crop rows 35:223 and columns 32:220 (the face of an
FFHQ-aligned image), average-pool to 112. The file is given by path or URI; nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpoint import load_strict, load_torch
from models.e4e_blocks import ir_se_body, ir_se_stem
from models.errors import CheckpointError

BLOCKS, WIDTHS = (3, 4, 14, 3), (64, 128, 256, 512)
INPUT_SIZE, ALIGNED_SIZE = 112, 256
FACE_CROP = (slice(35, 223), slice(32, 220))  # rows, columns of a 256-px FFHQ-aligned face
EMBED_DIM = 512


class IRSE50(nn.Module):
    """IR-SE-50 at 112 px → unit-norm 512-d embeddings; parameter names as in ``model_ir_se50.pth``."""

    def __init__(self, drop_ratio: float = 0.6):
        super().__init__()
        self.input_layer = ir_se_stem(WIDTHS[0])
        self.body = ir_se_body(BLOCKS, WIDTHS)
        side = INPUT_SIZE // 16
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(WIDTHS[-1]),
            nn.Dropout(drop_ratio),
            nn.Flatten(),
            nn.Linear(WIDTHS[-1] * side * side, EMBED_DIM),
            nn.BatchNorm1d(EMBED_DIM),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, 112, 112) in [-1, 1] → (B, 512), unit norm."""
        return F.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1)


def face_crop(images: Tensor) -> Tensor:
    """e4e's ID-loss preprocessing: any square size → 256 (area) → the face crop → 112 (area)."""
    if images.shape[-1] != ALIGNED_SIZE or images.shape[-2] != ALIGNED_SIZE:
        images = F.adaptive_avg_pool2d(images, ALIGNED_SIZE)
    return F.adaptive_avg_pool2d(images[:, :, FACE_CROP[0], FACE_CROP[1]], INPUT_SIZE)


def load_arcface(uri: str, device: str | torch.device = "cpu", **storage_options: Any) -> IRSE50:
    """IR-SE-50 from a ``model_ir_se50.pth``-format file (path or URI), in eval mode on ``device``.

    A file of another network fails with the missing/unexpected keys and shapes it has.
    """
    state = load_torch(uri, **storage_options)
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{uri}: expected a state dict (model_ir_se50.pth format), got {type(state).__name__}"
        )
    model = IRSE50()
    load_strict(model, with_batch_counters(model, state), f"ArcFace IR-SE-50 weights {uri}")
    return model.eval().to(device)


def with_batch_counters(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` plus the BatchNorm ``num_batches_tracked`` counters it lacks (zeros).

    Files saved before torch 0.4.1 have no such counters; they only matter when training with momentum
    None, so an eval-only copy may start them at zero. Every other key must still match exactly.
    """
    counters = {k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    return {**{k: torch.zeros_like(v) for k, v in counters.items() if k not in state}, **state}


@torch.no_grad()
def identity_features(model: IRSE50, images: Tensor) -> Tensor:
    """Unit-norm identity embeddings (B, 512) of images in [-1, 1] (any square size)."""
    device = next(model.parameters()).device
    return model(face_crop(images.to(device).float())).cpu()
