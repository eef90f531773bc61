"""The attribute oracle: a small CNN that reads the toy domain's attributes back from any image.

Edit accuracy on the toy domain is measured by asking the oracle what an edited image shows. It reads
the generator's convention, float (B, 3, 64, 64) in [-1, 1], and has one softmax head per attribute.
Trained on fresh renders with jitter, noise and blur (``models.toy.train_oracle``) so that it also reads
a generator's slightly blurry, noisy outputs; the weights ship in ``zoo/toy/oracle.safetensors``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import CheckpointError, load_safetensors, load_strict, save_safetensors
from models.toy.domain import ATTRIBUTES, NAMES, Attributes, render_batch, to_tensor

KIND = "toy_oracle"
DEFAULT_PATH = str(Path(__file__).resolve().parents[2] / "zoo" / "toy" / "oracle.safetensors")
HELD_OUT_SEED = 7_700_001  # render_batch seed for held-out checks; training never draws from it


@dataclass(frozen=True)
class OracleConfig:
    width: int = 16  # channels of the first conv; doubled at each of the next two stages
    hidden: int = 96  # width of the shared fully connected layer before the heads
    image_size: int = 64  # input side; other sizes are resized to it


class Oracle(nn.Module):
    """Four stride-2 convs (64 → 4 px) then one linear head per attribute over the flattened map.

    Flattening (not pooling) keeps where things are, which the position and size heads need.
    """

    def __init__(self, config: OracleConfig = OracleConfig()) -> None:
        super().__init__()
        self.config = config
        self.lineage: dict[str, Any] = {}  # filled by load(): how the weights were made
        w = config.width
        chans = [3, w, 2 * w, 4 * w, 4 * w]
        self.features = nn.Sequential(
            *[
                layer
                for cin, cout in zip(chans[:-1], chans[1:])
                for layer in (nn.Conv2d(cin, cout, 3, 2, 1), nn.SiLU())
            ]
        )
        side = config.image_size // 16
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(chans[-1] * side * side, config.hidden), nn.SiLU()
        )
        self.heads = nn.ModuleDict(
            {name: nn.Linear(config.hidden, len(values)) for name, values in ATTRIBUTES.items()}
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images float (B, 3, H, W) in [-1, 1] → logits per attribute, (B, n_values)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"oracle expects (B, 3, H, W) images, got {tuple(images.shape)}")
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(
                images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        h = self.fc(self.features(images))
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Class index per attribute, LongTensor (B,) each; see ``ATTRIBUTES`` for the value order."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        parts = [
            self(images[i : i + batch_size].to(device, torch.float32))
            for i in range(0, len(images), batch_size)
        ]
        self.train(was_training)
        return {name: torch.cat([p[name].argmax(1) for p in parts]).cpu() for name in NAMES}

    def predict_attributes(self, images: torch.Tensor) -> list[Attributes]:
        """The attributes an image shows, one ``Attributes`` per image."""
        idx = torch.stack([self.predict(images)[n] for n in NAMES], dim=1) if len(images) else []
        return [Attributes.from_indices(row.tolist()) for row in idx]

    def accuracy(self, images: torch.Tensor, truth: list[Attributes]) -> dict[str, float]:
        """Fraction of images whose predicted value equals the truth, per attribute."""
        pred = self.predict(images)
        target = torch.tensor([a.indices() for a in truth])
        return {
            name: round(float((pred[name] == target[:, k]).float().mean()), 4)
            for k, name in enumerate(NAMES)
        }

    def save(self, uri: str, lineage: dict[str, Any] | None = None) -> None:
        """Weights plus config and lineage (seed, steps, accuracy) in our safetensors format."""
        save_safetensors(
            uri, self.state_dict(), config=asdict(self.config), lineage=lineage, kind=KIND
        )

    @classmethod
    def load(
        cls,
        path_or_uri: str = DEFAULT_PATH,
        device: str | torch.device = "cpu",
        **storage_options: Any,
    ) -> Oracle:
        """Rebuild the oracle from a checkpoint (default: the shipped zoo weights), in eval mode."""
        tensors, header = load_safetensors(path_or_uri, **storage_options)
        if header["kind"] != KIND:
            raise CheckpointError(f"{path_or_uri}: kind {header['kind']!r}, expected {KIND!r}")
        oracle = cls(OracleConfig(**header["config"]))
        load_strict(oracle, tensors, str(path_or_uri))
        oracle.lineage = header["lineage"]
        return oracle.to(device).eval()


def evaluate(oracle: Oracle, n: int = 1000, seed: int = HELD_OUT_SEED) -> dict[str, float]:
    """Per-attribute accuracy on n fresh renders of ``seed`` (items of ``render_batch``)."""
    images, truth = render_batch(n, seed)
    return oracle.accuracy(to_tensor(images), truth)
