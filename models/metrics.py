"""Evaluation metrics for edited images: pure functions over tensors, no Prefect or Ray in here.

Images are float (B, 3, H, W) in [-1, 1]. Nothing here downloads weights: every learned backbone
(Inception, LPIPS' AlexNet/VGG, a face-ID network, CLIP) comes from a file or object the caller gives.

Where the field's libraries define a metric, they compute it: PSNR/SSIM, LPIPS and FID (on any feature
rows) are torchmetrics'; the FID Inception is torch-fidelity's TF-exact port (through torchmetrics);
identity is the cosine of ArcFace IR-SE-50 embeddings (models/arcface.py, e4e's model_ir_se50.pth). KID
is ours (kernel_distance says why) and checked against torchmetrics' on equal-size sets.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Collection
from functools import partial

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from models.arcface import identity_features, load_arcface
from models.checkpoint import read_bytes
from models.errors import CheckpointError
from models.imaging import resize_to

FeatureExtractor = Callable[[Tensor], Tensor]  # images (B, 3, H, W) in [-1, 1] -> features (B, D)


PSNR_CAP = 100.0  # dB; 8-bit images that differ at all stay below ~60 dB


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here: its weights or package are missing (the message says which)."""


def _match_size(pred: Tensor, ref: Tensor) -> Tensor:
    if pred.shape[-2:] == ref.shape[-2:]:
        return pred
    return F.interpolate(
        pred, size=tuple(ref.shape[-2:]), mode="bilinear", antialias=True, align_corners=False
    )


def pixel_metrics(pred: Tensor, ref: Tensor) -> dict[str, Tensor]:
    """Per-image ``psnr`` (dB, capped at ``PSNR_CAP``), ``ssim`` and ``mse``, each (B,).

    The cap keeps means finite: identical images (a strength-0 edit) would otherwise give inf.

    If the sizes differ, ``pred`` is resized to ``ref``'s size (bilinear, antialiased) first, so a
    generator's output can be compared with an input photo of another resolution.
    """
    # torchmetrics is imported here, not at the top: its import pulls torchvision/dynamo (~10 s on 2 cores)
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    if pred.ndim != 4 or ref.ndim != 4 or pred.shape[:2] != ref.shape[:2]:
        raise ValueError(
            f"expected two (B, 3, H, W) batches, got {tuple(pred.shape)} and {tuple(ref.shape)}"
        )
    pred, ref = _match_size(pred.float(), ref), ref.float()
    mse = (pred - ref).square().mean(dim=(1, 2, 3))
    psnr = peak_signal_noise_ratio(pred, ref, data_range=2.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(pred, ref, data_range=2.0, reduction="none")
    return {"psnr": psnr.reshape(-1).clamp(max=PSNR_CAP), "ssim": ssim.reshape(-1), "mse": mse}


def _pair(real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    for name, x in (("real", real), ("fake", fake)):
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(
                f"{name}: need a feature matrix (N, D) with N >= 2 rows, got {tuple(x.shape)}"
            )
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} vs {fake.shape[1]}")
    return real.detach().to("cpu", torch.float64), fake.detach().to("cpu", torch.float64)


class GivenFeatures(torch.nn.Module):
    """Features in, features out: lets torchmetrics' FID/KID (which run a network on what they are given)
    take precomputed feature rows. ``num_features`` is what torchmetrics sizes its states by."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """FID ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) of two feature matrices (N, D), in float64, by
    torchmetrics' ``FrechetInceptionDistance`` fed the rows themselves (``GivenFeatures``): the library's
    moments and matrix square root (eigenvalues of S1 S2), whatever network made the features."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # slow import: only when used

    a, b = _pair(real, fake)
    fid = FrechetInceptionDistance(feature=GivenFeatures(a.shape[1]))
    fid.update(a, real=True)
    fid.update(b, real=False)
    return float(fid.compute())


def _mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    n, m, kernel = len(x), len(y), lambda u, v: (u @ v.T / u.shape[1] + 1.0) ** 3
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    return (
        (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def kernel_distance(
    real: Tensor, fake: Tensor, subset_size: int | None = None, subsets: int = 100, seed: int = 0
) -> float:
    """KID: unbiased MMD² with the cubic polynomial kernel (x·y/D + 1)³, on feature matrices (N, D).

    Unbiased, so unlike FID it has no bias that depends on N: the better number for the few dozen
    samples per prompt we have (≈ 0 for two samples of one distribution, and it can be negative). With
    ``subset_size`` it is averaged over ``subsets`` random subsets of that size (seeded), as torchmetrics
    and the KID paper do for large sets; by default all rows are used once.

    Ours, not torchmetrics' ``KernelInceptionDistance``: that one takes precomputed features
    (``GivenFeatures``) but always draws its subsets from the global RNG and its MMD estimator assumes
    both sets have the same size m (cross term / m²), while we compare one input per image with every
    edit of it (sizes differ). On equal-size sets with one subset of all rows the two agree
    (tests/test_metrics.py).
    """
    a, b = _pair(real, fake)
    if subset_size is None:
        return float(_mmd2_unbiased(a, b))
    if not 2 <= subset_size <= min(len(a), len(b)):
        raise ValueError(f"subset_size must be in [2, {min(len(a), len(b))}], got {subset_size}")
    gen = torch.Generator().manual_seed(seed)
    values = [
        _mmd2_unbiased(
            a[torch.randperm(len(a), generator=gen)[:subset_size]],
            b[torch.randperm(len(b), generator=gen)[:subset_size]],
        )
        for _ in range(subsets)
    ]
    return float(torch.stack(values).mean())


INCEPTION_FILE = (
    "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception weights
)


def inception_extractor(
    uri: str | None, device: str | torch.device = "cpu", **storage_options: object
) -> FeatureExtractor:
    """Inception-v3 pool3 features (B, 2048) as the TF FID/KID code computes them, from a weights file.

    The network is torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's TF-ported Inception of the
    2015-12-05 graph; its file ``weights-inception-2015-12-05-6726825d.pth`` is given by path or URI and
    never downloaded), with ``antialias=False``: torch-fidelity's bit-exact port of TF1's bilinear resize
    to 299 px, where torchmetrics' default would resize with antialiasing and leave the TF definition.
    Images are quantised to uint8 first, as the reference implementations read PNGs.
    """
    if not uri:
        raise MetricUnavailable(
            f"Inception features need torch-fidelity's weights file {INCEPTION_FILE} "
            "(evaluate.inception_weights); it is never downloaded"
        )
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError as exc:  # pragma: no cover - both are dependencies
        raise MetricUnavailable(f"Inception features need torchmetrics: {exc}") from exc
    if not _TORCH_FIDELITY_AVAILABLE:
        raise MetricUnavailable("Inception features need the torch-fidelity package")
    try:
        data = read_bytes(uri, **storage_options)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except CheckpointError as exc:
        raise MetricUnavailable(f"Inception weights ({INCEPTION_FILE}): {exc}") from exc
    except (
        Exception
    ) as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise MetricUnavailable(f"{uri}: not a tensors-only state dict ({exc})") from exc
    if not isinstance(state, dict):
        raise MetricUnavailable(f"{uri}: expected a state dict ({INCEPTION_FILE} format)")
    try:
        # torch-fidelity torch.load()s what it is given, with weights_only=False: it gets the same bytes,
        # which just loaded with weights_only=True, so unpickling them runs nothing else.
        net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=io.BytesIO(data),  # type: ignore[arg-type]
            antialias=False,
        ).to(device)
    except (
        RuntimeError
    ) as exc:  # load_state_dict(strict=True): names the missing/unexpected/misshapen
        raise MetricUnavailable(
            f"{uri}: not torch-fidelity's Inception-v3 weights ({INCEPTION_FILE} format): {exc}"
        ) from exc

    return InceptionFeatures(net, device)


class InceptionFeatures:
    """``InceptionFeatures(net)(images in [-1, 1])`` → (B, 2048) float32 pool3 features on the CPU; built
    by ``inception_extractor`` (``net``: torchmetrics' NoTrainInceptionV3 with its weights)."""

    def __init__(self, net: torch.nn.Module, device: str | torch.device = "cpu"):
        self.net, self.device = net, device

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        as_bytes = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.net(as_bytes.to(self.device)).float().cpu()


def clip_extractor(clip: object) -> FeatureExtractor:
    """Features from any object with ``encode_images(images in [-1, 1]) -> (B, D)`` (e.g. ClipEncoder)."""
    encode = getattr(clip, "encode_images", None)
    if not callable(encode):
        raise TypeError(f"{type(clip).__name__} has no encode_images(images) method")

    @torch.no_grad()
    def extract(images: Tensor) -> Tensor:
        return encode(images).float().cpu()

    return extract


def clip_direction(edited: Tensor, original: Tensor, delta_text: Tensor) -> Tensor:
    """CLIP directional similarity cos(E(edited) - E(original), Δt) per image, (B,), from embeddings.

    0 when an image did not change at all (its direction is the zero vector).
    """
    delta_image = (edited.float() - original.float()).reshape(len(edited), -1)
    delta_text = delta_text.float().reshape(-1, delta_image.shape[1]).expand_as(delta_image)
    return F.cosine_similarity(delta_image, delta_text, dim=1, eps=1e-8)


def identity_similarity(extractor: FeatureExtractor, a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of ``extractor`` features per image pair, (B,); e.g. a face-ID network."""
    with torch.no_grad():
        fa, fb = extractor(a).float().flatten(1), extractor(b).float().flatten(1)
    return F.cosine_similarity(fa, fb, dim=1, eps=1e-8)


def arcface_extractor(
    uri: str, device: str | torch.device = "cpu", **storage_options: object
) -> FeatureExtractor:
    """The field's identity features: ArcFace IR-SE-50 from a ``model_ir_se50.pth``-format file (e4e's),
    with e4e's face crop (models/arcface.py)."""
    try:
        model = load_arcface(uri, device, **storage_options)
    except CheckpointError as exc:
        raise MetricUnavailable(f"identity model: {exc}") from exc
    return partial(identity_features, model)


def torchscript_extractor(
    uri: str, input_size: int, device: str | torch.device = "cpu", **storage_options: object
) -> FeatureExtractor:
    """Features from a user's TorchScript network (e.g. a face-ID model such as ArcFace exported with
    ``torch.jit.save``): images are resized to ``input_size`` and kept in [-1, 1]."""
    try:
        model = torch.jit.load(
            io.BytesIO(read_bytes(uri, **storage_options)), map_location=device
        ).eval()
    except (CheckpointError, RuntimeError) as exc:
        raise MetricUnavailable(f"{uri}: not a loadable TorchScript network ({exc})") from exc

    @torch.no_grad()
    def extract(images: Tensor) -> Tensor:
        return model(resize_to(images.to(device), input_size)).float().flatten(1).cpu()

    return extract


class Lpips:
    """LPIPS per image pair, (B,): ``Lpips(...)(a, b)``; lower is more similar. Built by ``lpips_metric``."""

    def __init__(
        self, model: torch.nn.Module, device: str | torch.device = "cpu", batch_size: int = 32
    ):
        self.model, self.device, self.batch_size = model.to(device).eval(), device, batch_size

    @torch.no_grad()
    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        k, a = self.batch_size, _match_size(a.float(), b).clamp(-1, 1).to(self.device)
        b = b.float().clamp(-1, 1).to(self.device)
        return torch.cat(
            [torch.empty(0)]
            + [
                self.model(a[i : i + k], b[i : i + k]).reshape(-1).cpu()
                for i in range(0, len(a), k)
            ]
        )


def lpips_metric(
    weights_path: str | None, net: str = "alex", device: str | torch.device = "cpu"
) -> Lpips:
    """LPIPS (torchmetrics' implementation) from a local backbone file; nothing is downloaded.

    ``weights_path``: a ``torch.save``'d state dict of either the torchvision backbone (``alexnet``,
    ``vgg16`` or ``squeezenet1_1``; keys ``features.N...``, e.g. torchvision's ``alexnet-owt-7be5be79.pth``)
    or a whole LPIPS model (keys ``net.sliceK.N...`` and ``linK.model.1.weight``). The LPIPS v0.1 linear
    layers ship inside torchmetrics (``lpips_models/<net>.pth``) and are used when the file has none.
    Raises ``MetricUnavailable`` without a path or when the file lacks backbone weights.
    """
    if not weights_path:
        raise MetricUnavailable(
            f"LPIPS needs the ImageNet {net} backbone weights as a local file (torchvision's "
            "state dict); none given, and they are never downloaded"
        )
    if net not in ("alex", "vgg", "squeeze"):
        raise ValueError(f"net must be alex, vgg or squeeze, got {net!r}")
    from torchmetrics.functional.image import lpips as tm_lpips

    # pnet_rand: backbone built with weights=None (no download); pretrained=False: we load the linears.
    model = tm_lpips._NoTrainLpips(net=net, pretrained=False, pnet_rand=True)  # type: ignore[arg-type]
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    state, wanted, loaded = (
        {k.removeprefix("module."): v for k, v in state.items()},
        model.state_dict(),
        {},
    )
    if not any(k.startswith("lin") for k in state):
        shipped = os.path.join(os.path.dirname(tm_lpips.__file__), "lpips_models", f"{net}.pth")
        state.update(torch.load(shipped, map_location="cpu", weights_only=True))
    for (
        key
    ) in wanted:  # net.sliceK.N.x <- features.N.x (torchvision); lins.K.x <- linK.x (same module)
        alias = (
            "features." + key.split(".", 2)[2]
            if key.startswith("net.")
            else "lin" + key[len("lins.") :]
            if key.startswith("lins.")
            else key
        )
        if key in state or alias in state:
            loaded[key] = state.get(key, state.get(alias))
    missing = sorted(set(wanted) - set(loaded))
    if missing:
        raise MetricUnavailable(
            f"{weights_path}: no LPIPS/{net} weights for {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''} ({len(missing)} missing)"
        )
    try:
        model.load_state_dict(loaded, strict=True)
    except RuntimeError as e:  # shape mismatch: a different network's file
        raise MetricUnavailable(f"{weights_path}: not {net} weights: {e}") from e
    return Lpips(model, device)


def _indices(x: Tensor) -> Tensor:
    return x.argmax(-1) if x.ndim == 2 else x.reshape(-1)  # accept logits (B, C) or indices (B,)


def oracle_scores(
    before: dict[str, Tensor],
    after: dict[str, Tensor],
    expected: dict[str, int],
    changing: Collection[str] = (),
) -> dict[str, Tensor]:
    """Per-image ``edit_accuracy`` and ``preservation`` from attribute-oracle readings (B,) per attribute.

    ``edit_accuracy``: 1.0 where every attribute in ``expected`` is read as its expected index, else 0.0.
    ``preservation``: fraction of the other attributes read the same after as before; attributes in
    ``changing`` (the prompt changes them without one expected value: an interpolation between two
    colours) are not counted either. Either is NaN when it has nothing to measure (no expected attributes /
    every attribute expected). Readings are class indices as ``Oracle.predict`` returns them (logits are
    argmax-ed).
    """
    unknown = sorted(set(expected) - set(after))
    if unknown:
        raise ValueError(
            f"expected attributes {unknown} are not among the readings {sorted(after)}"
        )
    nan = torch.full((len(next(iter(after.values()))) if after else 0,), float("nan"))
    others = [k for k in after if k in before and k not in expected and k not in changing]
    hits = [_indices(after[k]) == int(v) for k, v in expected.items()]
    same = [_indices(after[k]) == _indices(before[k]) for k in others]
    return {
        "edit_accuracy": torch.stack(hits).all(0).float() if hits else nan,
        "preservation": torch.stack(same).float().mean(0) if same else nan,
    }


def summarize(rows: pd.DataFrame, by: list[str], overall: str | None = "method") -> pd.DataFrame:
    """Mean of every numeric (and bool) column per ``by`` group, NaN skipped, with ``n`` = rows per group.

    Adds one "overall" row per ``overall`` value (default: per method) with the other ``by`` columns
    set to "overall". NaN group keys are kept as their own group.
    """
    missing = [c for c in by if c not in rows.columns]
    if missing:
        raise KeyError(f"group columns {missing} not in {list(rows.columns)}")
    metrics = [
        c
        for c in rows.columns
        if c not in by
        and c != "n"
        and (pd.api.types.is_numeric_dtype(rows[c]) or pd.api.types.is_bool_dtype(rows[c]))
    ]
    data = rows[by + metrics].copy()
    data[metrics] = data[metrics].astype("float64")

    def agg(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
        grouped = df.groupby(keys, dropna=False, sort=True)
        out = grouped[metrics].mean() if metrics else grouped.size().to_frame()[[]]
        out.insert(0, "n", grouped.size())
        return out.reset_index()

    parts = [agg(data, by)]
    if overall and overall in by and len(by) > 1:
        total = agg(data, [overall]).assign(**{c: "overall" for c in by if c != overall})
        parts[0] = parts[0].astype({c: object for c in by if c != overall})
        parts.append(total[parts[0].columns])
    return pd.concat(parts, ignore_index=True)
