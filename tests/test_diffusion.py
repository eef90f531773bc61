"""DeltaEdit-D: the style-conditioned U-Net and DDIM encode / decode / mask-guided decode (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch
from helpers_models import TINY_G
from torch import nn

from models.checkpoint import CheckpointError, load_safetensors, save_safetensors
from models.diffusion import (
    DiffusionConfig,
    EditGuidance,
    NoiseSchedule,
    StyleUNet,
    ddim_decode,
    ddim_encode,
    ddim_timesteps,
    level_groups,
    mask_guided_decode,
    q_sample,
    simple_loss,
)
from models.layout import StyleLayout

torch.set_num_threads(1)
TINY = dict(image_size=16, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4)
TINY_LAYOUT = StyleLayout.for_generator(32, channels=TINY_G["channels"])  # coarse + medium, no fine


def tiny_unet(
    layout: StyleLayout = TINY_LAYOUT, seed: int = 0, perturb: bool = True, **overrides
) -> StyleUNet:
    """Seeded tiny U-Net; ``perturb`` adds noise to every parameter so the zero-initialised layers act."""
    torch.manual_seed(seed)
    model = StyleUNet(DiffusionConfig(layout=layout.to_dict(), **{**TINY, **overrides})).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(
    model: StyleUNet, batch: int = 2, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    return (
        torch.randn(batch, 3, size, size, generator=g),
        torch.randint(0, 1000, (batch,), generator=g),
        5 * torch.randn(batch, model.style_dim, generator=g),
    )


class GaussianEps(nn.Module):
    """The exact ε-predictor for data x₀ ~ N(μ(s), σ²I): E[ε | x_t] = √(1−ᾱ)(x_t − √ᾱ μ)/(ᾱσ² + 1 − ᾱ).

    σ = 0 is a single image x* = μ(s): ε = (x_t − √ᾱ x*)/√(1−ᾱ). ``mean`` maps s (B, D) to μ (B, 3, H, W).
    """

    def __init__(self, mean, sigma: float = 0.0, schedule: NoiseSchedule | None = None) -> None:
        super().__init__()
        self.mean, self.sigma, self.schedule = (
            mean,
            sigma,
            schedule or NoiseSchedule("linear", 1000),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        a = self.schedule.alpha_bar_like(t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mean(s)) / (a * self.sigma**2 + 1 - a)


def test_level_groups_put_coarse_low_and_fine_high():
    full = ("coarse", "medium", "fine")
    assert level_groups(3, full) == ["fine", "medium", "coarse"]
    assert level_groups(4, full) == ["fine", "fine", "medium", "coarse"]
    assert level_groups(3, ("coarse", "medium")) == ["medium", "medium", "coarse"]


def test_shapes_and_zero_init():
    model = tiny_unet(perturb=False)
    x, t, s = inputs(model)
    out = model(x, t, s)
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # zero-initialised output layer
    assert tiny_unet()(x, t, s).abs().amax() > 0
    with pytest.raises(ValueError, match="s must be"):
        model(x, t, s[:, :-1])


def test_toy_generator_layout_64px():
    # the committed toy generator's layout, as ``Generator.layout`` derives it, read from the checkpoint
    # header (building the generator takes seconds on a loaded CI machine)
    cfg = load_safetensors("zoo/toy/generator.safetensors")[1]["config"]
    layout = StyleLayout.for_generator(
        cfg["size"],
        cfg["channel_multiplier"],
        channels={int(k): v for k, v in cfg["channels"].items()},
    )
    assert layout.conv_total == 720 and len(layout.conv) == 9
    model = tiny_unet(layout, image_size=64, channel_mult=(1, 1, 2, 2))
    assert [g.name for g in model.groups] == ["coarse", "medium", "fine"]
    assert model.level_group == ["fine", "fine", "medium", "coarse"]
    x, t, s = inputs(model, batch=1)
    assert model(x, t, s).shape == (1, 3, 64, 64)


@pytest.mark.parametrize(
    "layout",
    [TINY_LAYOUT, StyleLayout.for_generator(64, channels={4: 16, 8: 16, 16: 8, 32: 8, 64: 4})],
    ids=["tiny32", "with_fine"],
)
def test_every_style_group_reaches_the_output(layout):
    model = tiny_unet(layout)
    x, t, s = inputs(model)
    base = model(x, t, s)
    for g in model.groups:  # change one group's styles only
        s2 = s.clone()
        s2[:, g.start : g.stop] += 3.0
        assert (model(x, t, s2) - base).abs().amax() > 1e-3, g.name


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_unet(schedule="cosine")
    model.set_style_stats(
        torch.linspace(-1, 1, model.style_dim), torch.linspace(1, 3, model.style_dim)
    )
    path = str(tmp_path / "diffusion.safetensors")
    model.save(path, lineage={"run": "test"})
    loaded = StyleUNet.from_checkpoint(path).eval()
    assert loaded.config == model.config and loaded.lineage == {"run": "test"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x, t, s = inputs(model)
    assert torch.equal(model(x, t, s), loaded(x, t, s))
    assert loaded.schedule.kind == "cosine"
    save_safetensors(str(tmp_path / "other.safetensors"), {}, config={}, kind="delta_mapper")
    with pytest.raises(CheckpointError, match="delta_mapper"):
        StyleUNet.from_checkpoint(str(tmp_path / "other.safetensors"))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_and_timesteps(kind):
    sched = NoiseSchedule(kind, 1000)
    a = sched.alphas_cumprod
    assert a.shape == (1000,) and bool((a[1:] < a[:-1]).all()) and a[0] > 0.99 and a[-1] < 1e-3
    seq = ddim_timesteps(1000, 10)
    assert seq[0] == 0 and seq[-1] == 999 and len(seq) == 10 and seq == sorted(seq)
    x0, noise, t = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.tensor([0, 999])
    xt = q_sample(x0, t, noise, sched)
    assert torch.allclose(xt[:, 0, 0, 0], a[[0, 999]].sqrt().float())


def test_simple_loss_trains_the_unet_and_is_zero_for_the_exact_model():
    model = tiny_unet().train()
    x0, t, s = inputs(model)
    noise = torch.randn_like(x0)
    loss = simple_loss(model, x0, s, t, noise)
    loss.backward()
    assert (
        loss.ndim == 0
        and torch.isfinite(loss)
        and model.style_proj["coarse"].weight.grad.abs().sum() > 0
    )
    exact = GaussianEps(lambda _: x0)
    assert simple_loss(exact, x0, s, t, noise) < 1e-4


@pytest.mark.parametrize("steps", [1, 10, 50])
def test_ddim_round_trip_reproduces_a_single_image_exactly(steps):
    x_star = torch.rand(2, 3, 8, 8) * 2 - 1
    model = GaussianEps(lambda s: x_star * s[:, :1, None, None])
    s = torch.ones(2, 4)
    x_T = ddim_encode(model, x_star, s, steps)
    assert x_T.shape == x_star.shape
    if steps > 1:  # (one move lands on x* itself)
        assert (x_T - x_star).abs().amax() > 0.1
    assert torch.allclose(ddim_decode(model, x_T, s, steps), x_star, atol=1e-4)


@pytest.mark.parametrize(
    "kind,steps,refine,tol", [("linear", 20, 5, 1e-3), ("cosine", 50, 3, 2e-3)]
)
def test_ddim_round_trip_for_a_gaussian_distribution(kind, steps, refine, tol):
    """Plain DDIM inversion is first order (error ∝ 1/steps); fixed-point refinement makes it exact."""
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.2
    model = GaussianEps(lambda s: torch.full((s.shape[0], 3, 8, 8), 0.2), 0.5, NoiseSchedule(kind))
    s = torch.zeros(2, 4)

    def error(n: int, r: int = 0) -> float:
        return float(
            (ddim_decode(model, ddim_encode(model, x0, s, n, refine=r), s, n) - x0).abs().amax()
        )

    plain = error(steps)
    assert 0.02 < plain < 1.0 and error(4 * steps) < plain / 2.5  # converges like 1/steps
    assert error(steps, refine) < tol


def test_partial_encoding_stops_at_t_max_and_round_trips():
    assert ddim_timesteps(1000, 5, t_max=400) == [0, 100, 200, 300, 400]
    with pytest.raises(ValueError, match="t_max"):
        ddim_timesteps(1000, 5, t_max=1000)
    sched = NoiseSchedule("linear")
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.2
    model = GaussianEps(lambda s: torch.full((s.shape[0], 3, 8, 8), 0.2), 0.5, sched)
    s = torch.zeros(2, 4)
    x_t = ddim_encode(model, x0, s, 10, refine=3, t_max=400)
    a = sched.alpha_bar(400)  # x at step 400 keeps √ᾱ of the image
    assert float(torch.corrcoef(torch.stack([x_t.flatten(), x0.flatten()]))[0, 1]) > a**0.5 * 0.9
    assert (ddim_decode(model, x_t, s, 10, t_max=400) - x0).abs().amax() < 3e-3


def test_ddim_round_trip_with_the_unet_is_finite():
    model = tiny_unet()
    x0, _, s = inputs(model)
    x_T = ddim_encode(model, x0, s, 3, refine=1)
    rec = ddim_decode(model, x_T, s, 3)
    assert x_T.shape == rec.shape == x0.shape and torch.isfinite(rec).all()


def test_mask_guided_decode_with_the_same_code_is_the_plain_decode():
    model = tiny_unet()
    x_T, _, s = inputs(model)
    image, mask = mask_guided_decode(model, x_T, s, s.clone(), 4, threshold=0.3)
    assert torch.equal(image, ddim_decode(model, x_T, s, 4))
    assert mask.shape == (2, 1, 16, 16) and torch.count_nonzero(mask) == 0


def test_mask_guided_decode_edits_only_where_the_codes_disagree():
    base = torch.rand(2, 3, 16, 16) * 2 - 1
    region = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    region[..., 3:7, 8:13] = True
    model = GaussianEps(lambda s: base + s[:, :1, None, None] * region)  # s moves the region only
    s, s_edit = torch.zeros(2, 2), torch.ones(2, 2)
    x_T = ddim_encode(model, base, s, 20)
    plain = ddim_decode(model, x_T, s, 20)
    image, mask = mask_guided_decode(model, x_T, s, s_edit, 20, threshold=0.3, smooth=3)
    assert mask[region.expand_as(mask)].all()  # the mask covers the region
    halo = torch.nn.functional.max_pool2d(region.float(), 5, stride=1, padding=2).bool()
    assert not mask[~halo.expand_as(mask)].any()  # and stays near it
    outside = ~region.expand_as(image)
    assert (image - plain)[outside].abs().amax() < 1e-5  # untouched pixels: the plain decode
    edited = (base + region)[region.expand_as(image)]
    assert torch.allclose(
        image[region.expand_as(image)], edited, atol=1e-3
    )  # region decoded under ŝ


def test_edit_guidance_extrapolates_the_edit_and_keeps_the_reconstruction():
    """For the exact single-image model ε is affine in the image mean: guidance w decodes μ(s) + w·(μ(ŝ) − μ(s))."""
    base = torch.rand(2, 3, 16, 16) * 2 - 1
    region = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    region[..., 3:7, 8:13] = True
    model = GaussianEps(lambda s: base + s[:, :1, None, None] * region)
    s, s_edit = torch.zeros(2, 2), torch.full((2, 2), 0.3)
    x_T = ddim_encode(model, base, s, 20)
    guided = EditGuidance(model, s, 2.0)
    assert torch.allclose(ddim_decode(guided, x_T, s_edit, 20), base + 0.6 * region, atol=1e-3)
    assert torch.allclose(
        ddim_decode(guided, x_T, s, 20), ddim_decode(model, x_T, s, 20)
    )  # ŝ = s: no edit
    assert torch.equal(
        ddim_decode(EditGuidance(model, s, 1.0), x_T, s_edit, 20),
        ddim_decode(model, x_T, s_edit, 20),
    )
    image, _ = mask_guided_decode(model, x_T, s, s_edit, 20, threshold=0.3, guidance=2.0)
    inside = region.expand_as(image)
    assert torch.allclose(image[inside], (base + 0.6 * region)[inside], atol=1e-3)


def test_stochastic_decoding_forgets_what_the_code_does_not_explain_and_is_seeded_per_call():
    """η > 0 replaces part of x_T's memory of the photo by fresh noise: for data N(μ(s), σ²), a detail d
    of the photo that μ does not explain survives a DDIM edit at η = 0 (where a moved object leaves its
    outline) and mostly fades at η = 1; the noise is a function of the seed alone, the same for every row."""
    sigma = 0.3
    region = torch.zeros(1, 1, 16, 16)
    region[..., 3:7, 8:13] = 1.0
    model = GaussianEps(lambda s: s[:, :1, None, None] * region, sigma)
    detail = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * sigma
    s, s_edit = torch.zeros(1, 2), torch.ones(1, 2)
    x_T = ddim_encode(model, detail, s, 20, refine=3)

    def kept(eta: float) -> float:
        left = ddim_decode(model, x_T, s_edit, 20, eta=eta, seed=0) - region  # minus μ(ŝ)
        return float(torch.cosine_similarity(left.flatten(), detail.flatten(), dim=0))

    assert kept(0.0) > 0.99 and kept(1.0) < 0.5
    assert torch.equal(  # η = 0 is the deterministic sampler whatever the seed
        ddim_decode(model, x_T, s_edit, 20, eta=0.0, seed=5), ddim_decode(model, x_T, s_edit, 20)
    )
    one = ddim_decode(model, x_T, s_edit, 20, eta=1.0, seed=7)
    two = ddim_decode(model, x_T.repeat(2, 1, 1, 1), s_edit.repeat(2, 1), 20, eta=1.0, seed=7)
    assert torch.allclose(two[0], one[0], atol=1e-6) and torch.allclose(two[1], one[0], atol=1e-6)
    assert not torch.allclose(ddim_decode(model, x_T, s_edit, 20, eta=1.0, seed=8), one, atol=1e-3)
    image, _ = mask_guided_decode(model, x_T, s, s, 20, eta=1.0, seed=7)
    assert torch.equal(
        image, ddim_decode(model, x_T, s, 20, eta=1.0, seed=7)
    )  # ŝ = s: the plain decode


def test_v_prediction_returns_the_eps_its_v_implies_and_trains_on_the_v_distance():
    """A v-model's forward is ε = √(1−ᾱ)·x_t + √ᾱ·v̂, so the samplers are unchanged; its loss is |v − v̂|."""
    model = tiny_unet(prediction="v")
    x0, t, s = inputs(model, batch=4)
    t = torch.tensor([0, 250, 600, 999])
    noise = torch.randn_like(x0)
    x_t = q_sample(x0, t, noise, model.schedule)
    a = model.schedule.alpha_bar_like(t, x0)
    raw = model._net(x_t, t, s)
    assert torch.allclose(model(x_t, t, s), (1 - a).sqrt() * x_t + a.sqrt() * raw, atol=1e-6)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    loss = simple_loss(model, x0, s, t, noise, prediction="v")
    assert torch.allclose(loss, (v - raw).abs().mean(), rtol=1e-3)
    assert not torch.allclose(loss, simple_loss(model, x0, s, t, noise))  # ε distance differs
    with pytest.raises(ValueError, match="prediction"):
        simple_loss(model, x0, s, t, noise, prediction="x0")


def test_render_conditioned_unet_sees_g_of_s_and_asks_for_it():
    model = tiny_unet(render_condition=True, prediction="v")
    x, t, s = inputs(model)
    r1, r2 = torch.rand(2, 2, 3, 16, 16) * 2 - 1
    out = model(x, t, model.condition(s, r1))
    assert torch.equal(out, model(x, t, model.condition(s, r1)))
    assert not torch.allclose(out, model(x, t, model.condition(s, r2)))
    with pytest.raises(ValueError, match="conditioned on G"):
        model.condition(s)
    with pytest.raises(ValueError, match=r"condition\(s, G\(s\)\)"):
        model(x, t, s)  # s alone is not this model's condition
    plain = tiny_unet()
    assert plain.condition(s, r1) is s and plain.condition_dim == plain.style_dim
    x_T = ddim_encode(model, x, model.condition(s, r1), 3, refine=1)
    assert torch.isfinite(ddim_decode(model, x_T, model.condition(s, r1), 3)).all()


def test_old_checkpoints_load_as_eps_models_without_the_rendering(tmp_path):
    model = tiny_unet()
    data = model.config.to_dict()
    for key in ("prediction", "render_condition"):  # a checkpoint written before these options
        data.pop(key)
    config = DiffusionConfig.from_dict(data)
    assert config.prediction == "eps" and config.render_condition is False
    model.save(str(tmp_path / "d.safetensors"))
    loaded = StyleUNet.from_checkpoint(str(tmp_path / "d.safetensors"))
    assert loaded.config == model.config


def test_the_edit_decoder_conditions_each_code_on_its_own_rendering():
    """DeltaEdit-D with G(s): the photo is encoded under (s, G(s)) and the edit decoded under (ŝ, G(ŝ)),
    with the source's toRGB styles; without the generator it says what is missing."""
    from infra.config import DiffusionEditConfig
    from models.imaging import pool_to
    from tasks.edit.diffusion import DiffusionDecoder

    model = tiny_unet(render_condition=True, prediction="v")
    x0, _, s = inputs(model)
    s_edit, rgb = s + 1.0, torch.randn(2, 5)

    def render(conv: torch.Tensor, col: torch.Tensor) -> torch.Tensor:  # 32 px, pooled to 16
        return torch.tanh(conv[:, :3, None, None] + col[:, :3, None, None]).expand(-1, 3, 32, 32)

    cfg = DiffusionEditConfig(steps=3, refine=1, encode_depth=1.0, guidance=1.0)
    dec = DiffusionDecoder(model, cfg, batch_size=1, render=render)
    x_t = dec.encode(x0, s, rgb)
    cond = model.condition(s, pool_to(render(s, rgb), 16))
    assert torch.allclose(x_t, ddim_encode(model, x0, cond, 3, refine=1), atol=1e-5)
    edit = model.condition(s_edit, pool_to(render(s_edit, rgb), 16))
    assert torch.allclose(
        dec.decode(x_t, s, s_edit, rgb), ddim_decode(model, x_t, edit, 3), atol=1e-5
    )
    with pytest.raises(ValueError, match="generator"):
        DiffusionDecoder(model, cfg, batch_size=1).encode(x0, s, rgb)


def test_region_mask_marks_where_the_renderings_differ_grown_and_feathered():
    from tasks.edit.diffusion import region_mask

    source = torch.zeros(1, 3, 16, 16)
    edited = source.repeat(2, 1, 1, 1)
    edited[0, :, 6:8, 6:8] = 1.0  # a 2×2 change
    edited[1] += 0.1  # below the threshold everywhere
    mask = region_mask(source, edited, threshold=0.15, dilate=2)
    assert mask.shape == (2, 1, 16, 16) and mask[1].sum() == 0
    assert (mask[0, 0, 4:10, 4:10] > 0.4).all() and (mask[0, 0, 5:9, 5:9] == 1).all()  # grown 2 px
    assert mask[0, 0, :3].sum() == 0 and mask[0, 0, 11:].sum() == 0  # and feathered 1 px more
    assert 0 < mask[0, 0, 3, 6] < 1


def test_edit_region_generator_encodes_the_photo_with_g_s_where_each_edit_acts():
    """``edit_region: generator``: each edit encodes the photo with G(s) inside its region mask (the
    photo's own detail there would be decoded in place whatever ŝ says); an edit that changes nothing
    encodes the photo itself."""
    from infra.config import DiffusionEditConfig
    from models.imaging import pool_to
    from tasks.edit.diffusion import DiffusionDecoder, region_mask

    model = tiny_unet()
    x0, _, s = inputs(model, batch=1)
    rgb = torch.zeros(1, 5)

    def render(
        conv: torch.Tensor, col: torch.Tensor
    ) -> torch.Tensor:  # a shape whose place is conv[0]
        image = -torch.ones(len(conv), 3, 32, 32)
        for row, c in enumerate(conv[:, 0].round().long().clamp(0, 24).tolist()):
            image[row, :, c : c + 8, c : c + 8] = 1.0
        return image

    s = torch.cat([torch.full((1, 1), 4.0), s[:, 1:]], 1)
    moved = torch.cat([torch.full((1, 1), 20.0), s[:, 1:]], 1)
    cfg = DiffusionEditConfig(steps=3, refine=1, edit_region="generator")
    dec = DiffusionDecoder(model, cfg, batch_size=1, render=render)
    starts = dec.encode_edits(x0, s, torch.cat([moved, s]), rgb)
    source, edited = pool_to(render(s, rgb), 16), pool_to(render(moved, rgb), 16)
    mask = region_mask(source, edited, cfg.region_threshold, cfg.region_dilate)
    assert 0 < mask.mean() < 0.6
    expected = dec.encode(mask * source + (1 - mask) * x0, s, rgb)
    assert torch.allclose(starts[:1], expected, atol=1e-5)
    assert torch.allclose(starts[1:], dec.encode(x0, s, rgb), atol=1e-5)  # ŝ = s: the photo
