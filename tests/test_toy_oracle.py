"""The attribute oracle: the shipped zoo weights read held-out renders back (≥ 98 % per attribute), and
the check is real: an untrained or damaged oracle fails it."""

from __future__ import annotations

import os

import pytest
import torch

from models.checkpoint import CheckpointError, save_safetensors
from models.toy.domain import NAMES, Attributes, render_batch, to_tensor
from models.toy.oracle import DEFAULT_PATH, HELD_OUT_SEED, KIND, Oracle, OracleConfig, evaluate
from models.toy.train_oracle import _blur, augment, train_oracle

THRESHOLD = 0.98
N_HELD_OUT = 400
TEST_SEED = 424_242  # neither the training stream nor HELD_OUT_SEED (used at training time)


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    torch.set_num_threads(1)
    return Oracle.load()


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, list[Attributes]]:
    images, truth = render_batch(N_HELD_OUT, seed=TEST_SEED)
    return to_tensor(images), truth


def test_zoo_weights_are_small_and_carry_their_lineage(oracle):
    assert os.path.getsize(DEFAULT_PATH) < 2 * 1024 * 1024
    assert oracle.lineage["steps"] > 0 and "seed" in oracle.lineage
    assert min(oracle.lineage["accuracy"].values()) >= THRESHOLD


def test_zoo_oracle_reads_held_out_renders(oracle, held_out):
    images, truth = held_out
    accuracy = oracle.accuracy(images, truth)
    assert set(accuracy) == set(NAMES)
    assert min(accuracy.values()) >= THRESHOLD, accuracy
    assert min(evaluate(oracle, 300, seed=TEST_SEED + 1).values()) >= THRESHOLD


def test_zoo_oracle_survives_generator_like_blur_and_noise(oracle, held_out):
    images, truth = held_out
    x = augment(images, torch.Generator().manual_seed(1))
    accuracy = oracle.accuracy(x, truth)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_predict_api(oracle, held_out):
    images, truth = held_out
    pred = oracle.predict(images[:10], batch_size=4)
    assert set(pred) == set(NAMES) and all(
        p.dtype == torch.long and p.shape == (10,) for p in pred.values()
    )
    attrs = oracle.predict_attributes(images[:10])
    assert all(isinstance(a, Attributes) for a in attrs) and len(attrs) == 10
    assert sum(a == t for a, t in zip(attrs, truth[:10])) >= 9
    # other sizes are resized to 64: a 128-px render reads the same
    big, _ = render_batch(10, seed=TEST_SEED, size=128)
    assert sum(a == t for a, t in zip(oracle.predict_attributes(to_tensor(big)), truth[:10])) >= 9
    with pytest.raises(ValueError, match="B, 3, H, W"):
        oracle(images[0])


def test_the_check_fails_for_bad_weights(oracle, held_out, tmp_path):
    images, truth = held_out
    torch.manual_seed(0)
    untrained = Oracle(oracle.config).eval()
    assert max(untrained.accuracy(images, truth).values()) < 0.7
    damaged = Oracle(oracle.config)
    damaged.load_state_dict(oracle.state_dict())
    with torch.no_grad():
        damaged.heads["shape"].weight.copy_(
            damaged.heads["shape"].weight.roll(1, dims=0)
        )  # classes swapped
    assert damaged.eval().accuracy(images, truth)["shape"] < 0.1


def test_save_load_round_trip_and_kind_check(oracle, tmp_path):
    path = str(tmp_path / "o.safetensors")
    oracle.save(path, lineage={"note": "copy"})
    again = Oracle.load(path)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    assert all(torch.equal(oracle(x)[n], again(x)[n]) for n in NAMES) and again.lineage == {
        "note": "copy"
    }
    save_safetensors(
        str(tmp_path / "other.safetensors"), oracle.state_dict(), config={}, kind="clip"
    )
    with pytest.raises(CheckpointError, match=KIND):
        Oracle.load(str(tmp_path / "other.safetensors"))


def test_training_is_deterministic_and_learns(tmp_path):
    tiny = OracleConfig(width=4, hidden=16)
    a = train_oracle(
        steps=6,
        batch_size=8,
        seed=3,
        out_path=str(tmp_path / "a.safetensors"),
        config=tiny,
        eval_n=16,
        log_every=0,
    )
    b = train_oracle(
        steps=6,
        batch_size=8,
        seed=3,
        out_path=str(tmp_path / "b.safetensors"),
        config=tiny,
        eval_n=16,
        log_every=0,
    )
    assert a["final_loss"] == b["final_loss"] and a["accuracy"] == b["accuracy"]
    wa, wb = (
        Oracle.load(str(tmp_path / "a.safetensors")),
        Oracle.load(str(tmp_path / "b.safetensors")),
    )
    assert all(
        torch.equal(x, y) for x, y in zip(wa.state_dict().values(), wb.state_dict().values())
    )
    assert wa.lineage["steps"] == 6 and wa.lineage["seed"] == 3


def test_blur_keeps_shape_and_mean():
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(_blur(x, torch.zeros(2)), x, atol=1e-5)
    y = _blur(x, torch.tensor([0.0, 1.0]))
    assert y.shape == x.shape and torch.allclose(y[0], x[0], atol=1e-5) and y[1].std() < x[1].std()
    assert HELD_OUT_SEED != TEST_SEED
