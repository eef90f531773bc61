"""DeltaEdit-D: a style-conditioned diffusion decoder (U-Net ε-predictor modulated by s, DDIM sampling)."""

from models.diffusion.ddim import (
    EditGuidance,
    NoiseSchedule,
    ddim_decode,
    ddim_encode,
    ddim_timesteps,
    edit_mask,
    mask_guided_decode,
    q_sample,
    simple_loss,
)
from models.diffusion.unet import DiffusionConfig, StyleUNet, level_groups

__all__ = [
    "DiffusionConfig",
    "EditGuidance",
    "NoiseSchedule",
    "StyleUNet",
    "ddim_decode",
    "ddim_encode",
    "ddim_timesteps",
    "edit_mask",
    "level_groups",
    "mask_guided_decode",
    "q_sample",
    "simple_loss",
]
