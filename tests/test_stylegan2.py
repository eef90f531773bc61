"""StyleGAN2 generator: public layouts, checkpoint loading, W → S → image, NVIDIA conversion."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers_models import (
    DEVICES,
    TINY_G,
    exact_float32,
    load_format,
    meta_shapes,
    synthetic_state,
    tiny_generator,
)

from models.checkpoint import CheckpointError
from models.layout import StyleLayout
from models.stylegan2 import Generator, StyleCode
from models.stylegan2_layers import Upsample, upfirdn2d
from models.stylegan2_pkl import convert_nvidia_pkl, nvidia_to_rosinality


# --- public layouts -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,size", [("rosinality_g_ema_1024", 1024), ("rosinality_g_ema_256", 256)]
)
def test_state_dict_matches_public_layout(name: str, size: int) -> None:
    fmt = load_format(name)
    with torch.device("meta"):
        gen = Generator(size)
    assert list(meta_shapes(gen).items()) == list(
        fmt["state_dict"].items()
    )  # names, order and shapes
    layout = fmt["style_layout"]
    assert [layer.channels for layer in gen.layout.conv] == layout["conv"]
    assert [layer.channels for layer in gen.layout.rgb] == layout["rgb"]
    assert {layer.name: layer.wplus_index for layer in gen.layout.layers} == layout[
        "wplus_row_per_modulation"
    ]
    assert gen.n_latent == fmt["n_latent"]


def test_1024_style_space_sizes() -> None:
    with torch.device("meta"):
        gen = Generator(1024)
    assert gen.layout.conv_total == 6048 and gen.layout.rgb_total == 3040
    assert [layer.channels for layer in gen.layout.conv] == [512] * 10 + [
        256,
        256,
        128,
        128,
        64,
        64,
        32,
    ]
    # each layer's modulation really produces that many channels
    for layer in gen.layout.layers:
        assert gen.get_submodule(layer.name).conv.modulation.weight.shape == (layer.channels, 512)
    code = gen.style_space(torch.zeros(2, 18, 512, device="meta"))
    assert code.conv.shape == (2, 6048) and code.rgb.shape == (2, 3040)


# --- public checkpoints ---------------------------------------------------------------------------
def test_real_rosinality_256_round_trip(tmp_path) -> None:
    fmt = load_format("rosinality_g_ema_256")
    state = synthetic_state(fmt)
    avg = torch.randn(512)
    path = tmp_path / "550000.pt"
    torch.save(
        {
            "g_ema": state,
            "latent_avg": avg,
            "d": {"extra": torch.zeros(3)},
            "args": argparse.Namespace(size=256, channel_multiplier=2),
        },
        path,
    )
    gen = Generator.from_checkpoint(str(path))  # architecture inferred
    assert (
        gen.config["size"] == 256
        and gen.config["channel_multiplier"] == 2
        and gen.config["channels"] is None
    )
    loaded = gen.state_dict()
    for i, name in enumerate(fmt["state_dict"]):
        assert loaded[name].flatten()[0].item() == i, name
    assert torch.equal(gen.latent_avg, avg)


@pytest.fixture
def tiny_ckpt(tmp_path):
    gen = tiny_generator()
    return gen, gen.state_dict(), tmp_path


def test_bare_state_dict_loads(tiny_ckpt) -> None:
    gen, state, tmp = tiny_ckpt
    torch.save(state, tmp / "bare.pt")
    loaded = Generator.from_checkpoint(str(tmp / "bare.pt"))
    w = torch.randn(2, gen.n_latent, gen.style_dim)
    assert loaded.latent_avg is None and loaded.config["channels"] == TINY_G["channels"]
    assert torch.equal(loaded(w), gen(w))


def _load_error(state: dict, tmp, **kwargs) -> str:
    torch.save({"g_ema": state}, tmp / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        Generator.from_checkpoint(str(tmp / "bad.pt"), **kwargs)
    return str(err.value)


def test_wrong_shape_names_parameter_and_both_shapes(tiny_ckpt) -> None:
    _, state, tmp = tiny_ckpt
    state["convs.3.conv.modulation.weight"] = torch.zeros(32, 60)
    msg = _load_error(state, tmp)
    assert "convs.3.conv.modulation.weight" in msg and "(32, 60)" in msg and "(32, 64)" in msg


def test_missing_and_unexpected_keys_named(tiny_ckpt) -> None:
    _, state, tmp = tiny_ckpt
    del state["convs.1.noise.weight"]
    state["convs.1.extra"] = torch.zeros(1)
    msg = _load_error(state, tmp)
    assert "'convs.1.noise.weight'" in msg and "'convs.1.extra'" in msg


def test_explicit_config_is_checked_strictly(tiny_ckpt) -> None:
    _, state, tmp = tiny_ckpt
    msg = _load_error(state, tmp, size=32, style_dim=64, n_mlp=2)  # rosinality widths, not TINY_G's
    assert (
        "conv1.conv.weight" in msg and "(1, 64, 64, 3, 3)" in msg and "(1, 512, 512, 3, 3)" in msg
    )


def test_not_a_generator_checkpoint(tmp_path) -> None:
    torch.save({"model": {"x": 1}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="g_ema"):
        Generator.from_checkpoint(str(tmp_path / "x.pt"))


# --- W → S → image ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_style_space_then_synthesize_equals_forward(device: str) -> None:
    gen = tiny_generator().to(device)
    w = torch.randn(3, gen.n_latent, gen.style_dim, device=device)  # a different w per row
    with exact_float32():  # on CUDA: no TF32, deterministic cuDNN (see exact_float32)
        code = gen.style_space(w)
        assert code.conv.shape == (3, gen.layout.conv_total) and code.rgb.shape == (
            3,
            gen.layout.rgb_total,
        )
        image = gen.synthesize(code)
        assert image.shape == (3, 3, 32, 32) and torch.isfinite(image).all()
        assert torch.allclose(image, gen(w))
        # one w broadcasts to every row
        assert torch.allclose(gen(w[:, 0]), gen(w[:, :1].expand_as(w)))


def test_each_style_comes_from_its_wplus_row() -> None:
    gen = tiny_generator()
    rows = load_format("rosinality_g_ema_256")["style_layout"][
        "wplus_row_per_modulation"
    ]  # independent truth
    w = torch.randn(2, gen.n_latent, gen.style_dim)
    styles = gen.style_space(w).layers(gen.layout)
    for name, s in styles.items():
        mod = gen.get_submodule(name).conv.modulation
        expected = (
            w[:, rows[name]] @ (mod.weight / gen.style_dim**0.5).T + mod.bias
        )  # EqualLinear by hand
        assert torch.allclose(s, expected, atol=1e-5), name
        wrong = w[:, rows[name] - 1] @ (mod.weight / gen.style_dim**0.5).T + mod.bias
        assert not torch.allclose(s, wrong, atol=1e-3), name


def test_mapping_network() -> None:
    gen = tiny_generator()
    z = torch.randn(4, gen.style_dim)
    w = gen.mapping(z)
    assert w.shape == (4, gen.style_dim)
    assert torch.allclose(gen.mapping(3 * z), w, atol=1e-5)  # PixelNorm first: scale-invariant in z
    assert len(gen.style) == 1 + TINY_G["n_mlp"]


def test_editing_one_conv_channel_changes_the_image() -> None:
    gen = tiny_generator()
    code = gen.style_space(torch.randn(1, gen.n_latent, gen.style_dim))
    base = gen.synthesize(code)
    layer = gen.layout.conv[3]
    edited = code.clone()
    edited.conv[:, layer.offset + 5] += 10.0
    diff = (gen.synthesize(edited) - base).abs()
    assert diff.max() > 1e-3
    assert torch.equal(gen.synthesize(code.clone()), base)  # an unedited copy decodes identically


def test_rgb_styles_are_honoured() -> None:
    gen = tiny_generator()
    w = torch.randn(1, gen.n_latent, gen.style_dim)
    code, other = gen.style_space(w), gen.style_space(torch.randn(1, gen.n_latent, gen.style_dim))
    swapped = StyleCode(code.conv, other.rgb)
    assert not torch.allclose(gen.synthesize(swapped), gen.synthesize(code), atol=1e-4)
    # the last toRGB is linear in its style (no demodulation): doubling the style doubles its contribution
    last = gen.layout.rgb[-1]
    zero, double = code.clone(), code.clone()
    zero.rgb[:, last.offset : last.stop] = 0
    double.rgb[:, last.offset : last.stop] *= 2
    base, img0, img2 = gen.synthesize(code), gen.synthesize(zero), gen.synthesize(double)
    assert torch.allclose(img2 - img0, 2 * (base - img0), atol=1e-5)


def test_noise_modes() -> None:
    gen = tiny_generator()
    code = gen.style_space(torch.randn(2, gen.style_dim))
    const = gen.synthesize(code, "const")
    assert torch.equal(const, gen.synthesize(code, "const"))
    assert not torch.allclose(const, gen.synthesize(code, "none"))
    assert not torch.allclose(gen.synthesize(code, "random"), gen.synthesize(code, "random"))
    with pytest.raises(ValueError):
        gen.synthesize(code, "fixed")  # type: ignore[arg-type]


def test_each_conv_layer_uses_its_noise_buffer() -> None:
    w = torch.randn(1, 8, 64)
    for j in range(7):  # conv-layer j (conv1, convs.0, ...) ↔ noises.noise_j
        gen = tiny_generator()
        code = gen.style_space(w)
        clean = gen.synthesize(code, "none")
        with torch.no_grad():
            for i in range(gen.num_layers):
                if i != j:
                    getattr(gen.noises, f"noise_{i}").zero_()
            assert not torch.allclose(gen.synthesize(code), clean, atol=1e-6), j
            gen.get_submodule(gen.layout.conv[j].name).noise.weight.zero_()  # silence layer j
            assert torch.allclose(gen.synthesize(code), clean, atol=1e-6), j


def test_style_code_helpers() -> None:
    gen = tiny_generator()
    code = gen.style_space(torch.randn(2, gen.n_latent, gen.style_dim))
    layers = code.layers(gen.layout)
    assert list(layers) == [layer.name for layer in gen.layout.layers]
    assert layers["convs.2"].shape == (2, 48)
    back = StyleCode.from_layers(gen.layout, layers)
    assert torch.equal(back.conv, code.conv) and torch.equal(back.rgb, code.rgb)
    assert code.to(torch.float64).conv.dtype == torch.float64
    with pytest.raises(ValueError, match="StyleCode.conv"):
        gen.synthesize(StyleCode(code.conv[:, :-1], code.rgb))


def test_truncation() -> None:
    gen = tiny_generator()
    w = gen.mapping(torch.randn(3, gen.style_dim))
    assert torch.allclose(gen.truncate(w, 0.0), gen.latent_avg.expand_as(w))
    assert torch.allclose(gen.truncate(w, 1.0), w)
    gen.latent_avg = None
    mean = gen.mean_latent(256)
    assert mean.shape == (gen.style_dim,) and torch.equal(mean, gen.mean_latent(256))
    full = gen.mean_latent()  # the default used when no latent_avg is known
    assert not torch.allclose(full, mean)
    assert torch.allclose(gen.truncate(w, 0.5), full + 0.5 * (w - full), atol=1e-5)


# --- our format ----------------------------------------------------------------------------------
@pytest.mark.parametrize("uri", ["file", "memory://models/g.safetensors"])
def test_safetensors_round_trip(tmp_path, uri: str) -> None:
    gen = tiny_generator(seed=3)
    target = str(tmp_path / "g.safetensors") if uri == "file" else uri
    gen.save(target, lineage={"trained_on": "toy"})
    loaded = Generator.from_checkpoint(target)
    assert loaded.config == gen.config
    assert torch.equal(loaded.latent_avg, gen.latent_avg)
    w = torch.randn(2, gen.n_latent, gen.style_dim)
    assert torch.equal(loaded(w), gen(w))


# --- pure-torch ops --------------------------------------------------------------------------------
def _naive_upfirdn(
    x: torch.Tensor, k: torch.Tensor, up: int, down: int, pad: tuple[int, int]
) -> torch.Tensor:
    """Direct definition, loop over output pixels: zero-stuff, pad, convolve (flipped kernel), subsample."""
    b, c, h, w = x.shape
    z = torch.zeros(b, c, h * up, w * up)
    z[:, :, ::up, ::up] = x
    z = F.pad(z, [pad[0], pad[1], pad[0], pad[1]])
    kf, kh = torch.flip(k, [0, 1]), k.shape[0]
    oh = z.shape[-1] - kh + 1
    out = torch.stack(
        [
            torch.stack(
                [(z[:, :, i : i + kh, j : j + kh] * kf).sum((-1, -2)) for j in range(oh)], -1
            )
            for i in range(oh)
        ],
        -2,
    )
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize(
    "up,down,pad", [(2, 1, (2, 1)), (1, 1, (1, 1)), (1, 2, (1, 1)), (2, 1, (-1, 0))]
)
def test_upfirdn2d_matches_definition(up: int, down: int, pad: tuple[int, int]) -> None:
    x, k = torch.randn(2, 3, 5, 5), torch.rand(4, 4)
    assert torch.allclose(
        upfirdn2d(x, k, up, down, pad), _naive_upfirdn(x, k, up, down, pad), atol=1e-5
    )


def test_upsample_keeps_constant_images_and_doubles_size() -> None:
    out = Upsample()(torch.ones(1, 3, 6, 6))
    assert out.shape == (1, 3, 12, 12)
    assert torch.allclose(out[:, :, 2:-2, 2:-2], torch.ones(1, 3, 8, 8))


# --- NVIDIA StyleGAN2-ADA ------------------------------------------------------------------------
def _nvidia_state(
    size: int = 32, w_dim: int = 64, ch: dict[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """A synthetic G_ema state dict with NVIDIA's names and shapes (written from networks.py's layout)."""
    ch = ch or {4: 64, 8: 64, 16: 32, 32: 16}
    g = torch.Generator().manual_seed(0)
    t = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    sd = {"mapping.w_avg": t(w_dim)}
    for i in range(2):
        sd.update({f"mapping.fc{i}.weight": t(w_dim, w_dim), f"mapping.fc{i}.bias": t(w_dim)})

    def layer(prefix: str, cin: int, cout: int, res: int) -> None:
        sd.update(
            {
                f"{prefix}.weight": t(cout, cin, 3, 3),
                f"{prefix}.noise_strength": t(()),
                f"{prefix}.bias": t(cout),
                f"{prefix}.resample_filter": t(4, 4),
                f"{prefix}.noise_const": t(res, res),
                f"{prefix}.affine.weight": t(cin, w_dim),
                f"{prefix}.affine.bias": t(cin),
            }
        )

    def torgb(prefix: str, cin: int) -> None:
        sd.update(
            {
                f"{prefix}.weight": t(3, cin, 1, 1),
                f"{prefix}.bias": t(3),
                f"{prefix}.affine.weight": t(cin, w_dim),
                f"{prefix}.affine.bias": t(cin),
            }
        )

    sd["synthesis.b4.const"] = t(ch[4], 4, 4)
    layer("synthesis.b4.conv1", ch[4], ch[4], 4)
    torgb("synthesis.b4.torgb", ch[4])
    res = 8
    while res <= size:
        sd[f"synthesis.b{res}.resample_filter"] = t(4, 4)
        layer(f"synthesis.b{res}.conv0", ch[res // 2], ch[res], res)
        layer(f"synthesis.b{res}.conv1", ch[res], ch[res], res)
        torgb(f"synthesis.b{res}.torgb", ch[res])
        res *= 2
    return sd


def test_nvidia_names_map_to_rosinality_and_load_strictly() -> None:
    nv = _nvidia_state()
    ck = nvidia_to_rosinality(nv)
    gen = Generator.from_state_dict(ck["g_ema"], ck["latent_avg"])  # strict
    assert gen.config["size"] == 32 and gen.config["channels"] == {4: 64, 8: 64, 16: 32, 32: 16}
    assert torch.equal(gen.style[2].weight, nv["mapping.fc1.weight"])
    assert torch.equal(gen.input.input[0], nv["synthesis.b4.const"])
    assert torch.equal(gen.conv1.conv.weight[0], nv["synthesis.b4.conv1.weight"])
    assert torch.equal(
        gen.convs[2].conv.weight[0], nv["synthesis.b16.conv0.weight"]
    )  # up conv of 16 px
    assert torch.equal(gen.convs[3].conv.modulation.bias, nv["synthesis.b16.conv1.affine.bias"])
    assert torch.equal(gen.convs[3].activate.bias, nv["synthesis.b16.conv1.bias"])
    assert gen.convs[3].noise.weight.item() == nv["synthesis.b16.conv1.noise_strength"].item()
    assert torch.equal(gen.noises.noise_3[0, 0], nv["synthesis.b16.conv0.noise_const"])
    assert torch.equal(gen.to_rgbs[1].bias.flatten(), nv["synthesis.b16.torgb.bias"])
    assert torch.equal(gen.to_rgb1.conv.modulation.weight, nv["synthesis.b4.torgb.affine.weight"])
    assert torch.equal(gen.latent_avg, nv["mapping.w_avg"])
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    assert torch.allclose(
        gen.convs[0].conv.blur.kernel, torch.outer(taps, taps) / 64 * 4
    )  # FIR × up-gain


def test_nvidia_pkl_needs_opt_in_then_converts(tmp_path) -> None:
    path = tmp_path / "network-snapshot.pkl"
    with open(path, "wb") as f:
        pickle.dump({"G_ema": _nvidia_state(), "training_set_kwargs": {}}, f)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        convert_nvidia_pkl(str(path))
    ck = convert_nvidia_pkl(str(path), allow_pickle=True)
    torch.save(ck, tmp_path / "converted.pt")  # loads back through the weights_only path
    gen = Generator.from_checkpoint(str(tmp_path / "converted.pt"))
    assert gen.n_latent == 8 and gen.latent_avg is not None
    assert torch.isfinite(gen(torch.randn(1, gen.style_dim))).all()


def test_nvidia_unsupported_variants_refused() -> None:
    nv = _nvidia_state()
    with pytest.raises(CheckpointError, match="conditional"):
        nvidia_to_rosinality({**nv, "mapping.embed.weight": torch.zeros(64, 10)})
    with pytest.raises(CheckpointError, match="no rosinality counterpart"):
        nvidia_to_rosinality({**nv, "synthesis.b8.extra": torch.zeros(1)})
    del nv["synthesis.b8.conv1.affine.bias"]
    with pytest.raises(CheckpointError, match="synthesis.b8.conv1.affine.bias"):
        nvidia_to_rosinality(nv)


def test_layout_used_by_generator_is_the_shared_one() -> None:
    gen = tiny_generator()
    assert gen.layout == StyleLayout.for_generator(32, channels=TINY_G["channels"])


@torch.no_grad()
def test_compiled_synthesis_pads_short_batches_and_matches_eager() -> None:
    """bulk_edit.compile's decoder: one graph for batches of 4; 1–4 rows give G's images, 5 rows refuse."""
    from models.compiled import FixedBatchCompiled

    G = tiny_generator(seed=3).eval()
    code = G.style_space(
        G.mapping(torch.randn(5, G.style_dim, generator=torch.Generator().manual_seed(0)))
    )
    compiled = FixedBatchCompiled(lambda conv, rgb: G.synthesize(StyleCode(conv, rgb)), 4)
    for n in (4, 1, 3):
        out = compiled(code.conv[:n], code.rgb[:n])
        assert out.shape == (n, 3, TINY_G["size"], TINY_G["size"])
        assert torch.allclose(out, G.synthesize(StyleCode(code.conv[:n], code.rgb[:n])), atol=1e-4)
    with pytest.raises(ValueError, match="expected 1 to 4 rows"):
        compiled(code.conv, code.rgb)
    with pytest.raises(ValueError, match="expected 1 to 4 rows"):
        compiled(code.conv[:2], code.rgb[:3])
