"""The toy domain: deterministic renders, each attribute visibly doing what its name says, catalogs,
captions that name only true attributes."""

from __future__ import annotations

import colorsys
import itertools
import json

import fsspec
import numpy as np
import pytest
from PIL import Image

from models.toy.captions import (
    BACKGROUND_PATTERNS,
    all_edits,
    all_phrasings,
    attribute_prompt,
    caption,
    edit_prompt,
    mentioned,
)
from models.toy.catalog import read_catalog, render_catalog
from models.toy.domain import (
    ATTRIBUTES,
    NAMES,
    Attributes,
    render,
    render_batch,
    sample_attributes,
    to_tensor,
)

BASE = Attributes("circle", "red", "white", "medium", "center")


def mask(image: np.ndarray, background: str) -> np.ndarray:
    """Pixels that differ clearly from the (canonical) background colour."""
    bg = render(BASE.replace(background=background, size="small", position="left"))[0, 0].astype(
        int
    )
    return np.abs(image.astype(int) - bg).sum(-1) > 60


def test_render_is_deterministic_per_seed():
    a, attrs_a = render_batch(16, seed=3)
    b, attrs_b = render_batch(16, seed=3)
    c, _ = render_batch(16, seed=4)
    assert a.dtype == np.uint8 and a.shape == (16, 64, 64, 3)
    assert a.tobytes() == b.tobytes() and attrs_a == attrs_b
    assert a.tobytes() != c.tobytes()
    # item i of a seed does not depend on how many items are rendered, nor on chunking
    tail, _ = render_batch(6, seed=3, start=10)
    assert tail.tobytes() == a[10:].tobytes()
    one = render(BASE, np.random.default_rng(5))
    assert one.tobytes() == render(BASE, np.random.default_rng(5)).tobytes()
    assert one.tobytes() != render(BASE, np.random.default_rng(6)).tobytes()


@pytest.mark.parametrize("color", ATTRIBUTES["shape_color"])
def test_shape_colour_at_the_centre_has_its_hue(color):
    expected = {"red": 0, "orange": 30, "yellow": 50, "green": 135, "blue": 222, "purple": 280}[
        color
    ]
    for bg in ATTRIBUTES["background"]:
        r, g, b = (
            render(BASE.replace(shape_color=color, background=bg), np.random.default_rng(0))[32, 32]
            / 255
        )
        hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
        assert min(abs(hue - expected), 360 - abs(hue - expected)) < 15, (color, bg, hue)


def test_backgrounds_fill_the_corners_and_differ():
    corners = {
        bg: render(BASE.replace(background=bg))[0, 0].astype(int) for bg in ATTRIBUTES["background"]
    }
    values = list(corners.values())
    assert all(np.abs(x - y).sum() > 80 for i, x in enumerate(values) for y in values[i + 1 :])
    assert (
        corners["white"].min() > 200
        and corners["black"].max() < 40
        and corners["navy"][2] > corners["navy"][0]
    )


def test_position_moves_the_centroid():
    step = {"center": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}
    for shape in ATTRIBUTES["shape"]:
        for pos, (sx, sy) in step.items():
            m = mask(render(BASE.replace(shape=shape, position=pos)), "white")
            ys, xs = np.nonzero(m)  # bounding-box centre, in pixels
            cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
            assert abs(cx - 32 - sx * 0.18 * 64) < 1.5 and abs(cy - 32 - sy * 0.18 * 64) < 1.5, (
                shape,
                pos,
            )


def test_size_orders_the_covered_area_and_stays_inside():
    for shape in ATTRIBUTES["shape"]:
        areas = [
            mask(render(BASE.replace(shape=shape, size=s)), "white").sum()
            for s in ATTRIBUTES["size"]
        ]
        assert areas[0] * 1.6 < areas[1] and areas[1] * 1.6 < areas[2], (shape, areas)
    # the largest shapes at edge positions, with extreme jitter, never reach the frame's outer pixels
    for shape, pos in itertools.product(ATTRIBUTES["shape"], ("left", "right", "top", "bottom")):
        for corner in itertools.product((0.0, 0.999), repeat=4):  # dx, dy, scale, rotation extremes
            m = mask(
                render(BASE.replace(shape=shape, size="large", position=pos), Extreme(corner)),
                "white",
            )
            assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()), (
                shape,
                pos,
                corner,
            )


class Extreme:
    """A stand-in generator whose jitter draws sit at chosen ends of their ranges."""

    def __init__(self, geometry: tuple[float, ...]) -> None:
        self.geometry = geometry

    def random(self, shape: tuple[int, int]) -> np.ndarray:
        u = np.full(shape, 0.5)
        u[:, len(NAMES) : len(NAMES) + 4] = self.geometry
        return u


def test_shapes_are_told_apart_by_their_silhouette():
    sil = {
        s: mask(render(BASE.replace(shape=s, size="large")), "white") for s in ATTRIBUTES["shape"]
    }
    for i, x in enumerate(ATTRIBUTES["shape"]):
        for y in ATTRIBUTES["shape"][i + 1 :]:
            assert (sil[x] ^ sil[y]).sum() > 60, (x, y)
    # the images are anti-aliased: edge pixels take in-between values
    image = render(BASE.replace(shape="circle", size="large")).astype(int)
    assert ((image[..., 1] > 60) & (image[..., 1] < 220)).sum() > 20


def test_sample_attributes_reaches_every_value_and_attributes_round_trip():
    rng = np.random.default_rng(0)
    seen = {n: set() for n in NAMES}
    for _ in range(400):
        a = sample_attributes(rng)
        for n in NAMES:
            seen[n].add(getattr(a, n))
        assert Attributes.from_dict(a.to_dict()) == a == Attributes.from_indices(a.indices())
    assert seen == {n: set(v) for n, v in ATTRIBUTES.items()}
    _, attrs = render_batch(400, seed=1)
    assert {n: {getattr(a, n) for a in attrs} for n in NAMES} == {
        n: set(v) for n, v in ATTRIBUTES.items()
    }
    with pytest.raises(ValueError, match="shape_color"):
        Attributes("circle", "pink", "white", "small", "center")


def test_to_tensor_is_the_generator_convention():
    images, _ = render_batch(2, seed=0)
    x = to_tensor(images)
    assert x.shape == (2, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert np.allclose(((x[0, :, 5, 7] + 1) * 127.5).numpy(), images[0, 5, 7], atol=1e-3)


@pytest.mark.parametrize("folder", ["local", "memory"])
def test_render_catalog_writes_images_and_jsonl(tmp_path, folder):
    root = str(tmp_path / "cat") if folder == "local" else "memory://toy-catalog-test"
    records = render_catalog(root, 7, seed=2)
    fs, path = fsspec.core.url_to_fs(root)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) == [
        "attributes.jsonl"
    ] + [f"toy_{i:06d}.png" for i in range(7)]
    back = read_catalog(root)
    images, attrs = render_batch(7, seed=2)
    assert [r["attributes"] for r in back] == attrs
    assert [r["caption"] for r in back] == [r["caption"] for r in records]
    with fs.open(f"{path}/toy_000004.png", "rb") as f:
        assert np.array_equal(
            np.asarray(Image.open(f).convert("RGB")), images[4]
        )  # png is lossless
    with fs.open(f"{path}/attributes.jsonl") as f:
        assert json.loads(f.readline())["file"] == "toy_000000.png"


def test_captions_name_only_true_attributes_and_vary():
    rng = np.random.default_rng(0)
    named = {n: 0 for n in NAMES}
    for _ in range(200):
        a = sample_attributes(rng)
        texts = [caption(a, rng) for _ in range(5)]
        for text in texts + all_phrasings(a):
            claims = mentioned(text)
            assert all(claims[n] <= {getattr(a, n)} for n in NAMES), (text, a)
            assert claims["shape"] or claims["shape_color"], text
            for n in NAMES:
                named[n] += bool(claims[n])
        assert set(t.lower() for t in texts) <= set(all_phrasings(a))
    assert all(count > 100 for count in named.values()), named  # every attribute gets named
    many = {caption(BASE, np.random.default_rng(i)) for i in range(100)}
    assert len(many) > 30
    full = all_phrasings(BASE)
    assert "a medium red circle in the center on a white background" in full and "a circle" in full
    assert len({p for p in full if "white" in p}) >= len(BACKGROUND_PATTERNS)


def test_prompts_and_edits():
    assert attribute_prompt("shape", "circle") == "a circle"
    assert attribute_prompt("shape_color", "orange") == "an orange shape"
    assert attribute_prompt("background", "black") == "a shape on a black background"
    assert attribute_prompt("size", "large") == "a large shape"
    assert attribute_prompt("position", "left") == "a shape on the left"
    for name, values in ATTRIBUTES.items():
        for v in values:
            assert mentioned(attribute_prompt(name, v))[name] == {v}
    assert edit_prompt("shape", "square", source="circle") == ("a circle", "a square")
    assert edit_prompt("shape_color", "blue") == ("a shape", "a blue shape")
    assert len(all_edits()) == sum(len(v) * (len(v) - 1) for v in ATTRIBUTES.values())
    with pytest.raises(ValueError):
        attribute_prompt("shape", "hexagon")
