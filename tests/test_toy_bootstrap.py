"""The toy zoo's training code (``deltaedit zoo train toy``): the fitted prior's codes, the mapping fit, and
a tiny bootstrap run end to end (both halves, the CLIP in its own process). The shipped weights' quality
bars are in test_toy_zoo.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.checkpoint import load_safetensors
from models.stylegan2 import Generator
from models.toy.bootstrap import bootstrap
from models.toy.domain import ATTRIBUTES, NAMES, uniforms_to_indices
from models.toy.train_clip import ToyClipTraining
from models.toy.train_encoder import ToyEncoderConfig
from models.toy.train_generator import (
    N_VALUES,
    ToyGeneratorConfig,
    build_generator,
    channel_attributes,
    code_matrix,
    fit_mapping,
    mapping_accuracy,
    target_codes,
    w_blocks,
    z_to_uniforms,
)


def _z(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))


def test_z_draws_every_value_uniformly():
    idx = uniforms_to_indices(z_to_uniforms(_z(12_000)))
    for a, name in enumerate(NAMES):
        freq = np.bincount(idx[:, a], minlength=len(ATTRIBUTES[name])) / len(idx)
        assert np.abs(freq - 1 / len(freq)).max() < 0.02, (name, freq)


def test_target_codes_carry_the_values_of_z():
    z, matrix = _z(512), code_matrix(ToyGeneratorConfig(), seed=0)
    coef = target_codes(z, matrix) @ torch.linalg.pinv(matrix)  # back to [one-hot blocks, jitter]
    idx, k = uniforms_to_indices(z_to_uniforms(z)), 0
    for a, n in enumerate(N_VALUES):
        assert (coef[:, k : k + n].argmax(1).numpy() == idx[:, a]).all(), NAMES[a]
        k += n
    assert torch.allclose(
        coef[:, k:], torch.from_numpy(2 * z_to_uniforms(z)[:, len(NAMES) :] - 1).float(), atol=1e-4
    )


def test_mapping_fit_learns_the_values():
    torch.manual_seed(0)
    config = ToyGeneratorConfig(mapping_steps=300)
    G, matrix = build_generator(config), code_matrix(config, 0)
    before = mapping_accuracy(G, matrix, n=1024)
    after = fit_mapping(G, config, matrix, seed=0)["value_accuracy"]
    for name, n in zip(NAMES, N_VALUES):
        assert after[name] > max(before[name] + 0.15, 1.5 / n), (name, before[name], after[name])
    assert torch.count_nonzero(G.style[1].weight[:, 18:]) == 0  # z[18:] does not change the render


def test_code_matrix_puts_each_attribute_in_its_own_block_of_w():
    matrix, blocks = code_matrix(ToyGeneratorConfig(), seed=0), w_blocks(64)
    assert sorted(b.stop - b.start for b in blocks) == [12, 13, 13, 13, 13]
    owners = [a for a, n in enumerate(N_VALUES) for _ in range(n)]
    for row, a in enumerate(owners):  # the value rows; jitter rows follow
        outside = torch.ones(64, dtype=torch.bool)
        outside[blocks[a]] = False
        assert (
            torch.count_nonzero(matrix[row, outside]) == 0 and torch.count_nonzero(matrix[row]) > 0
        )


def _assert_attribute_aligned(G: Generator) -> None:
    """Each conv channel's modulation reads only its attribute's block of w; toRGB reads nothing."""
    blocks, attrs = w_blocks(G.style_dim), channel_attributes(G.layout)
    for layer in G.layout.layers:
        weight = G.get_submodule(layer.name).conv.modulation.weight
        if layer.kind == "rgb":
            assert torch.count_nonzero(weight) == 0, layer.name
            continue
        for c, a in enumerate(attrs[layer.offset : layer.stop]):
            outside = torch.ones(G.style_dim, dtype=torch.bool)
            outside[blocks[a]] = False
            assert torch.count_nonzero(weight[c, outside]) == 0, (layer.name, c)


def test_committed_generator_carries_every_attribute_in_its_own_conv_channels():
    zoo = Path(__file__).resolve().parents[1] / "zoo" / "toy"
    _assert_attribute_aligned(Generator.from_checkpoint(str(zoo / "generator.safetensors")))


def _tiny_bootstrap(out) -> dict:
    return bootstrap(
        str(out),
        seed=3,
        threads=2,
        generator=ToyGeneratorConfig(mapping_steps=20, steps=3, batch_size=4),
        encoder=ToyEncoderConfig(steps=3, batch_size=4),
        clip=ToyClipTraining(steps=3, batch_size=8),
    )


def test_tiny_bootstrap_writes_every_model_with_its_lineage_and_reruns_identically(tmp_path):
    metrics = _tiny_bootstrap(tmp_path / "a")
    _assert_attribute_aligned(
        Generator.from_checkpoint(str(tmp_path / "a" / "generator.safetensors"))
    )
    assert set(metrics["file_bytes"]) == {
        "generator.safetensors",
        "encoder.safetensors",
        "clip.safetensors",
    }
    for name in metrics["file_bytes"]:
        lineage = load_safetensors(str(tmp_path / "a" / name))[1]["lineage"]
        assert lineage["seed"] == 3 and lineage["steps"] == 3, (name, lineage)
    assert set(metrics["generator"]["samples"]["tv"]) == set(NAMES)
    assert set(metrics["encoder"]["reconstruction"]["agreement"]) == set(NAMES)
    assert set(metrics["clip"]["zero_shot"]) == set(NAMES)
    _tiny_bootstrap(tmp_path / "b")  # same seed: the same weights
    for name in metrics["file_bytes"]:
        first, second = (load_safetensors(str(tmp_path / run / name))[0] for run in ("a", "b"))
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), name
