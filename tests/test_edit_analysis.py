"""`deltaedit analyze edits`: the toy counterfactual codes, the ceiling's style mixing (on a fake
generator whose attributes live in known places), the committed toy zoo's ceiling, and the
per-prompt analysis and CLI on a tiny run whose stores are written directly (no Prefect or Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.config import ConfigError, load_config
from infra.storage.fsio import Location
from infra.storage.store import StageStore
from models.stylegan2 import StyleCode
from models.toy.counterfactual import ToyCounterfactuals, set_attribute
from models.toy.domain import ATTRIBUTES, NAMES, uniforms_to_indices
from tasks.analysis import edits as EA

ZOO = Path(__file__).resolve().parents[1] / "zoo" / "toy"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
PROMPTS = """
- {id: red, source: a shape, target: a red shape}
- {id: left, source: a shape, target: a shape on the left}
- {id: mix, interpolate: [red, left], omegas: [0.5]}
"""


def _zoo_generator():
    from models import zoo
    from models.zoo import ModelSpec

    spec = ModelSpec(name="stylegan2", checkpoint=str(ZOO / "generator.safetensors"))
    return zoo.build(spec).eval()


def _render(generator):
    return lambda conv, rgb: generator.synthesize(StyleCode(conv, rgb))


# --- the toy counterfactual -----------------------------------------------------------------------


def test_toy_counterfactual_z_changes_that_attribute_only():
    from models.toy.train_generator import z_to_uniforms

    z = torch.randn(200, 64, generator=torch.Generator().manual_seed(1))
    before = uniforms_to_indices(z_to_uniforms(z))
    for a, name in enumerate(NAMES):
        for value in range(len(ATTRIBUTES[name])):
            moved = set_attribute(z, name, value)
            after = uniforms_to_indices(z_to_uniforms(moved))
            assert (after[:, a] == value).all()
            assert np.array_equal(np.delete(after, a, 1), np.delete(before, a, 1))
            # the radius is kept, so the mapping's PixelNorm sees the same scale
            assert torch.allclose(moved.norm(dim=1), z.norm(dim=1), atol=1e-5)


# --- the ceiling's mixing, on a generator where each attribute's place is known -------------------


class SplitProvider:
    """Attribute "in_rgb" lives in toRGB style 0 only, "in_conv" in conv style 0 only (two values
    each: the sign); the counterfactual sets that style's sign and also changes style 1 of both."""

    def __init__(self, n: int = 64) -> None:
        gen = torch.Generator().manual_seed(0)
        self.base = StyleCode(torch.randn(n, 3, generator=gen), torch.randn(n, 3, generator=gen))

    def attributes(self) -> dict[str, int]:
        return {"in_rgb": 2, "in_conv": 2}

    def __call__(self, attribute: str, value: int) -> tuple[StyleCode, StyleCode]:
        conv, rgb = self.base.conv.clone(), self.base.rgb.clone()
        sign = 0.5 if value == 1 else -0.5
        (rgb if attribute == "in_rgb" else conv)[:, 0] = sign
        conv[:, 1] += 1.0  # a change the classifier must ignore
        rgb[:, 1] += 1.0
        return self.base, StyleCode(conv, rgb)


def _split_render(conv: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """Pixel 0 shows toRGB style 0, pixel 1 conv style 0 (in [-1, 1]); the rest is grey."""
    image = torch.zeros(len(conv), 3, 2, 2)
    image[:, :, 0, 0] = rgb[:, :1].clamp(-1, 1)
    image[:, :, 0, 1] = conv[:, :1].clamp(-1, 1)
    return image


def _split_classifier(images: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"in_rgb": (images[:, 0, 0, 0] > 0).long(), "in_conv": (images[:, 0, 0, 1] > 0).long()}


def test_ceiling_mixes_conv_and_torgb_styles_the_right_way_round():
    out = EA.ceiling(_split_render, _split_classifier, SplitProvider(), owners=None)
    rgb, conv = out["in_rgb"], out["in_conv"]
    assert rgb["rgb_only"] == rgb["full_swap"] == 1.0
    assert conv["conv_only"] == conv["full_swap"] == 1.0
    # the other mix leaves the attribute's style as the sample had it: the unedited (chance) rate
    assert rgb["conv_only"] == rgb["unedited"] and conv["rgb_only"] == conv["unedited"]
    assert 0.3 < rgb["unedited"] < 0.7 and rgb["chance"] == 0.5
    assert rgb["per_value"]["rgb_only"] == [1.0, 1.0]


def test_the_diffusion_column_reads_what_the_decoder_makes_of_the_conv_edit():
    def faithful(base: StyleCode, conv: torch.Tensor) -> torch.Tensor:
        return _split_render(conv, base.rgb)

    def ignores_the_edit(base: StyleCode, conv: torch.Tensor) -> torch.Tensor:
        return _split_render(base.conv, base.rgb)

    out = EA.ceiling(_split_render, _split_classifier, SplitProvider(), decode=faithful)
    assert all(r["diffusion"] == r["conv_only"] for r in out.values())
    out = EA.ceiling(_split_render, _split_classifier, SplitProvider(), decode=ignores_the_edit)
    assert out["in_conv"]["diffusion"] == out["in_conv"]["unedited"] < 1.0
    assert "diffusion" in EA.tables({"ceiling": out})["analysis_ceiling"].columns
    assert (
        "diffusion" not in EA.ceiling(_split_render, _split_classifier, SplitProvider())["in_rgb"]
    )


def test_own_channel_share_tells_whether_channel_labels_fit():
    owners = ["in_conv", "x", "y"]
    out = EA.ceiling(_split_render, _split_classifier, SplitProvider(), owners=owners)
    # the in_conv counterfactual changes conv style 0 (labelled in_conv) and 1 (not)
    assert 0 < out["in_conv"]["own_channel_share"] < 1
    assert out["in_conv"]["labelled_fraction"] == 1 / 3
    assert out["in_rgb"]["own_channel_share"] == 0.0  # no conv channel is labelled in_rgb


def test_toy_zoo_full_swap_reads_every_target_far_above_chance():
    from models.toy.oracle import Oracle

    torch.set_num_threads(1)
    generator = _zoo_generator()
    oracle = Oracle.load(str(ZOO / "oracle.safetensors"))
    provider = ToyCounterfactuals(generator, n=10, seed=0)
    out = EA.ceiling(_render(generator), oracle.predict, provider)
    assert set(out) == set(NAMES)
    for name, row in out.items():
        assert row["full_swap"] >= row["chance"] + 0.45, (name, row)
        assert abs(row["unedited"] - row["chance"]) < 0.25, (name, row)  # the samples' own values
        assert set(row) >= {"conv_only", "rgb_only", "per_value"}


class _Only(ToyCounterfactuals):
    """Toy counterfactuals of some attributes only."""

    def __init__(self, names: tuple[str, ...], *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.names = names

    def attributes(self) -> dict[str, int]:
        return {k: v for k, v in super().attributes().items() if k in self.names}


def test_toy_zoo_diffusion_decoder_draws_the_conv_edit_the_generator_draws():
    """DeltaEdit-D must not lose what DeltaEdit-G lands: the committed decoder DDIM-encodes G(s) under s
    and decodes the conv_only counterfactual code; the oracle must read the target about as often as in
    G's own rendering of that code (measured: the same to one sample of 8 per value). Conditioned on s
    alone, the decoder read at chance here (docs/deltaedit-d.md). Colour, background and position (the
    edits the demo's D missed then); 10 DDIM steps without refinement instead of the config's 20 with
    2, to keep it to ~20 s (same readings at both)."""
    from models.diffusion import StyleUNet
    from models.toy.oracle import Oracle
    from tasks.edit.diffusion import DiffusionDecoder

    torch.set_num_threads(1)
    generator, cfg = _zoo_generator(), load_config(CONFIG)
    render = _render(generator)
    decoder = DiffusionDecoder(
        StyleUNet.from_checkpoint(str(ZOO / "diffusion.safetensors")).eval(),
        cfg.bulk_edit.diffusion.model_copy(update={"steps": 10, "refine": 0}),
        batch_size=64,
        render=render,
    )
    oracle = Oracle.load(str(ZOO / "oracle.safetensors"))
    provider = _Only(("shape_color", "background", "position"), generator, n=8, seed=1)
    out = EA.ceiling(render, oracle.predict, provider, decode=EA.diffusion_decode(decoder, render))
    assert set(out) == set(provider.names)
    for name, row in out.items():
        assert row["diffusion"] >= row["conv_only"] - 0.1, (name, row)
        assert row["diffusion"] >= row["unedited"] + 0.5, (name, row)


def test_toy_zoo_diffusion_edit_leaves_no_outline_where_the_shape_was():
    """A crisp toy photo moved by D (ŝ: the conv styles of the moved photo's inversion, s's toRGB):
    encoding the photo itself (``edit_region: photo``, the paper) decodes its edge where the shape was,
    since G(s) draws it blurred and a little off and the exact inversion keeps the difference in place;
    the toy config's ``edit_region: generator`` leaves background there (mean residual 0.10 → 0.03 when
    written; away from both places 40 dB against the photo) and keeps the rest of the photo."""
    import numpy as np

    from models import zoo
    from models.diffusion import StyleUNet
    from models.toy.domain import Attributes, render, to_tensor
    from models.zoo import ModelSpec
    from tasks.edit.diffusion import DiffusionDecoder

    torch.set_num_threads(1)
    generator, cfg = _zoo_generator(), load_config(CONFIG)
    encoder = zoo.build(ModelSpec(name="e4e", checkpoint=str(ZOO / "encoder.safetensors"))).eval()
    unet = StyleUNet.from_checkpoint(str(ZOO / "diffusion.safetensors")).eval()
    moves = [
        ("square", "yellow", "navy", "large", "center", "left"),
        ("circle", "blue", "gray", "medium", "center", "top"),
        ("diamond", "orange", "black", "medium", "left", "right"),
        ("triangle", "green", "white", "medium", "bottom", "top"),
    ]
    src = [Attributes(*m[:5]) for m in moves]
    photos = to_tensor(np.stack([render(a) for a in src]))
    targets = to_tensor(np.stack([render(a.replace(position=m[5])) for a, m in zip(src, moves)]))
    with torch.no_grad():
        codes = generator.style_space(encoder(torch.cat([photos, targets])))
    s, rgb, s_edit = codes.conv[:4], codes.rgb[:4], codes.conv[4:]

    def background(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[..., 0, :], x[..., -1, :]], -1).median(-1).values[..., None, None]

    def shape(x: torch.Tensor) -> torch.Tensor:
        return (x - background(x)).abs().mean(1) > 0.05

    vacated = shape(photos) & ~shape(targets)
    grown = torch.nn.functional.max_pool2d((shape(photos) | shape(targets)).float(), 9, 1, 4)
    far = ~grown.bool()
    residual, psnr_far = {}, {}
    for region in ("photo", "generator"):
        dec = DiffusionDecoder(
            unet,
            cfg.bulk_edit.diffusion.model_copy(update={"edit_region": region}),
            4,
            _render(generator),
        )
        out = []
        for i in range(len(moves)):
            x0, src_code, edit, col = (
                photos[i : i + 1],
                s[i : i + 1],
                s_edit[i : i + 1],
                rgb[i : i + 1],
            )
            if region == "generator":
                start = dec.encode_edits(x0, src_code, edit, col)
            else:
                start = dec.encode(x0, src_code, col)
            out.append(dec.decode(start, src_code, edit, col))
        out = torch.cat(out)
        left = (out - background(out)).abs().mean(1)
        residual[region] = torch.stack([left[i][vacated[i]].mean() for i in range(len(moves))])
        mse = (out - photos).pow(2).mean(1)[far].mean()
        psnr_far[region] = float(10 * torch.log10(4 / mse))
    assert cfg.bulk_edit.diffusion.edit_region == "generator"
    assert (residual["generator"] < residual["photo"]).all(), residual
    assert residual["generator"].mean() < 0.5 * residual["photo"].mean(), residual
    assert psnr_far["generator"] > 35, psnr_far


# --- per prompt, on a tiny run --------------------------------------------------------------------


def _write(
    store: StageStore, rows: dict[str, dict[str, np.ndarray]], meta: dict | None = None
) -> None:
    writer = store.writer("000000", meta)
    for key, vectors in rows.items():
        writer.add(key, f"test/{key}", vectors=vectors)
    writer.commit(input_fingerprint="test", code_fingerprint="test")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A run root with the stores analyze edits reads: 6 codes of the toy generator with their CLIP
    embeddings, a random (seeded) Delta Mapper under mapper/, and a random unit-row Rₛ."""
    from models import zoo
    from models.delta_mapper import DeltaMapper, MapperConfig
    from models.zoo import ModelSpec

    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("analysis")
    root = base / "run"
    (base / "prompts.yaml").write_text(PROMPTS)
    generator = _zoo_generator()
    clip = zoo.build(ModelSpec(name="open_clip", checkpoint=str(ZOO / "clip.safetensors")))
    with torch.no_grad():
        code = generator.style_space(generator.mapping(torch.randn(6, generator.style_dim)))
        emb = clip.encode_images(generator.synthesize(code).clamp(-1, 1))
    loc = Location(str(root))
    keys = [f"img{n}" for n in range(6)]
    _write(
        StageStore(loc, "codes"),
        {k: {"s": code.conv[n].numpy(), "s_rgb": code.rgb[n].numpy()} for n, k in enumerate(keys)},
    )
    _write(
        StageStore(loc, "clip_images"),
        {k: {"embedding": emb[n].numpy()} for n, k in enumerate(keys)},
    )
    rows = torch.randn(generator.layout.conv_total, clip.embed_dim)
    rows = torch.nn.functional.normalize(rows, dim=1)
    _write(
        StageStore(loc, "relevance_exact"),
        {f"ch{c:06d}": {"direction": r.numpy()} for c, r in enumerate(rows)},
        {"n_channels": generator.layout.conv_total},
    )
    mapper = DeltaMapper(MapperConfig(layout=generator.layout.to_dict(), clip_dim=clip.embed_dim))
    (root / "mapper").mkdir()
    mapper.save(str(root / "mapper" / "mapper.safetensors"))
    return root, [
        f"root={root}",
        f"bulk_edit.prompts={base / 'prompts.yaml'}",
        "device=cpu",
        "relevance.mode=exact",
        "bulk_edit.tau=0.3",  # the run's Rₛ and τ, not the toy's
        "bulk_edit.condition=text",
        "bulk_edit.mask=text",
    ]


def test_cli_writes_both_tau_columns_and_the_report_reads_them(tiny_run, capsys):
    from app.cli import main

    root, overrides = tiny_run
    rc = main(
        [
            "analyze",
            "edits",
            "-c",
            str(CONFIG),
            *overrides,
            "--images",
            "4",
            "--counterfactuals",
            "none",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0 and "acc_tau0" in printed and "acc_tau" in printed and "left" in printed
    result = json.loads((root / "analysis" / "analysis.json").read_text())
    assert result["images"] == 4 and result["tau"] == 0.3 and "ceiling" not in result
    by_id = {p["variant"]: p for p in result["prompts"]}
    assert list(by_id) == ["red", "left", "mix__w0"]
    red = by_id["red"]
    assert red["expected"] == {"shape_color": 0} and red["tau"] == 0.3
    for column in ("tau0", "tau_run"):
        assert 0 <= red[column]["edit_accuracy"] <= 1 and 0 <= red[column]["preservation"] <= 1
    # τ = 0 keeps every channel: the random mapper moves all of them; the run's τ keeps a few
    assert red["tau0"]["channels_changed"] == result["conv_channels"]
    assert 0 < red["kept_channels"] < result["conv_channels"] / 4
    assert red["tau_run"]["channels_changed"] <= red["kept_channels"]
    assert by_id["mix__w0"]["tau0"]["edit_accuracy"] is None  # ω variants: nothing expected
    assert (root / "analysis" / "analysis.md").read_text().startswith("# Edit analysis")
    tabs = EA.report_tables(Location(str(root)))
    assert list(tabs["analysis_prompts"]["variant"]) == ["red", "left", "mix__w0"]


def test_a_mask_that_keeps_nothing_leaves_the_images_unedited(tiny_run):
    from flows.edit_analysis import analyze_edits

    root, overrides = tiny_run
    cfg = load_config(str(CONFIG), overrides + ["bulk_edit.tau=2.0"])  # |cos| never reaches 2
    result = analyze_edits(cfg, "test", n_images=3, counterfactuals="none")
    for row in result["prompts"][:2]:
        assert row["kept_channels"] == 0 and row["tau_run"]["channels_changed"] == 0
        assert row["tau_run"]["edit_accuracy"] == row["unedited"]
        assert row["tau_run"]["preservation"] == 1.0
        assert row["tau0"]["channels_changed"] > 0


def test_missing_stores_are_named(tiny_run, tmp_path):
    from flows.edit_analysis import analyze_edits

    _, overrides = tiny_run
    cfg = load_config(str(CONFIG), overrides + [f"root={tmp_path / 'empty'}"])
    with pytest.raises(ConfigError, match="mapper.safetensors"):
        analyze_edits(cfg, "test", n_images=2, counterfactuals="none")
    (tmp_path / "nocodes" / "mapper").mkdir(parents=True)
    root = tiny_run[0]
    (tmp_path / "nocodes" / "mapper" / "mapper.safetensors").write_bytes(
        (root / "mapper" / "mapper.safetensors").read_bytes()
    )
    cfg = load_config(str(CONFIG), overrides + [f"root={tmp_path / 'nocodes'}", "bulk_edit.tau=0"])
    with pytest.raises(EA.AnalysisError, match="codes.*deltaedit run preprocess"):
        analyze_edits(cfg, "test", n_images=2, counterfactuals="none")


def test_a_memory_too_small_for_retrieve_k_is_named(tiny_run):
    from flows.edit_analysis import analyze_edits

    _, overrides = tiny_run
    cfg = load_config(
        str(CONFIG), overrides + ["bulk_edit.condition=retrieved", "bulk_edit.retrieve_k=6"]
    )
    with pytest.raises(
        ValueError, match="retrieve_k=6 needs more.*found 6"
    ):  # the 6 clip_images rows
        analyze_edits(cfg, "test", n_images=2, counterfactuals="none")


def test_help_names_both_actions_and_the_edits_flags(capsys):
    from app.cli import main

    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    text = capsys.readouterr().out
    assert "analyze edits" in text and "deltaspace" in text and "conv_only" in text
    with pytest.raises(SystemExit):
        main(["analyze", "edits", "--help"])
    text = capsys.readouterr().out
    flags = ("--images", "--samples", "--classifier", "--counterfactuals", "--out", "--json")
    assert all(flag in text for flag in flags)
