"""Counterfactual codes of the toy generator: the same sample with one attribute set to a value.

The toy generator reads attribute a off the angle of the z pair (z[2a], z[2a+1]) as a fraction of
the turn (``models.toy.train_generator.z_to_uniforms``): value v of an attribute with n values is
the sector [v/n, (v+1)/n) of the turn, at angle u·2π − π. Turning the pair to the centre of value
v's sector (its radius, and so ‖z‖ and the mapping's PixelNorm input scale, unchanged) gives a z'
that differs from z in that attribute only; s' = G.style_space(G.mapping(z')) is then the code of
the counterfactual image. ``tasks.analysis.edits`` needs it to measure how much of an attribute S
can carry at all.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from models.stylegan2 import Generator, StyleCode
from models.toy.domain import ATTRIBUTES, NAMES
from models.toy.train_generator import channel_attributes

SEED_STREAM = 0x5EED_CF  # seed tag of the sample z (apart from training and evaluation draws)


def set_attribute(z: Tensor, attribute: str, value: int) -> Tensor:
    """z (B, D ≥ 10) with ``attribute``'s pair turned to the centre of ``value``'s sector."""
    a, n_values = NAMES.index(attribute), len(ATTRIBUTES[attribute])
    if not 0 <= value < n_values:
        raise ValueError(f"{attribute} has {n_values} values, got value {value}")
    pair = z[:, 2 * a : 2 * a + 2]
    radius = pair.norm(dim=1)
    angle = (value + 0.5) / n_values * 2 * math.pi - math.pi
    out = z.clone()
    out[:, 2 * a] = radius * math.cos(angle)
    out[:, 2 * a + 1] = radius * math.sin(angle)
    return out


class ToyCounterfactuals:
    """``n`` seeded sample codes s of a toy generator and, per (attribute, value), their s'.

    Implements the counterfactual provider of ``tasks.analysis.edits``: ``attributes()`` and
    ``(attribute, value) -> (s, s')``.
    """

    def __init__(self, generator: Generator, n: int = 32, seed: int = 0) -> None:
        self.generator = generator
        device = next(generator.parameters()).device
        gen = torch.Generator().manual_seed(seed * 7919 + SEED_STREAM)
        self.z = torch.randn(n, generator.style_dim, generator=gen).to(device)
        self.base = self._code(self.z)

    def attributes(self) -> dict[str, int]:
        """Attribute name → number of values (the classifier's label count)."""
        return {name: len(values) for name, values in ATTRIBUTES.items()}

    def __call__(self, attribute: str, value: int) -> tuple[StyleCode, StyleCode]:
        return self.base, self._code(set_attribute(self.z, attribute, value))

    @torch.no_grad()
    def _code(self, z: Tensor) -> StyleCode:
        return self.generator.style_space(self.generator.mapping(z))


def channel_owners(layout: Any) -> list[str]:
    """The attribute of each conv channel (``models.toy.train_generator.channel_attributes``): the
    channels a toy generator trained with ``attribute_channels`` gives each attribute. For another
    generator the labels need not fit: the analysis's ``own_channel_share`` tells."""
    return [NAMES[int(a)] for a in channel_attributes(layout)]
