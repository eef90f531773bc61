"""Run configuration: YAML files validated by typed models.

A config is data passed down explicitly. ``load_config`` reads a YAML file, applies ``key.path=value``
overrides, and validates it; a bad field raises ConfigError naming the file, the field and what was
expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models import zoo
from models.zoo import ModelSpec


class ConfigError(ValueError):
    """A config file that does not validate."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RayConfig(Strict):
    address: str | None = (
        None  # None: start a local cluster; "auto", "ray://host:10001" or host:port: attach
    )
    num_cpus: int | None = None  # CPUs of a local cluster (None: all)
    actors: int = Field(2, ge=1)  # actors in a stage's pool
    cpus_per_actor: float = Field(0.5, gt=0)  # fractional, so readers are never starved
    gpus_per_actor: float | Literal["auto"] = "auto"  # auto: the cluster's GPUs shared by the
    # actors (≤ 1 each, 0 without GPUs); < 1 shares one GPU
    use_gpu_if_available: bool = True  # false: auto asks for no GPU
    resources_per_actor: dict[str, float] = Field(default_factory=dict)  # custom Ray resources
    # per actor ({slot: 1} + `ray start --resources` pins nodes)
    ready_timeout_s: float = Field(600, gt=0)  # actors not placed by then fail the pool
    ship_code: bool | None = None  # runtime_env py_modules: flows, infra, models, tasks to
    # the workers; None: when attaching to an address
    train_storage: str | None = None  # Ray Train's storage_path: a shared path or URI (s3://...)
    # for multi-node training; None: local scratch (one node)

    @field_validator("gpus_per_actor")
    @classmethod
    def _placeable_gpus(cls, value: float | str) -> float | str:
        if value != "auto" and (value < 0 or (value > 1 and value != int(value))):
            raise ValueError("must be 'auto', a fraction in [0, 1] or a whole number of GPUs")
        return value


class PrefectConfig(Strict):
    retries: int = Field(1, ge=0)  # per-shard task retries
    retry_delay_seconds: float = Field(2, ge=0)
    cache: bool = True  # cross-run caching of per-shard results (INPUTS + TASK_SOURCE)


class AlignConfig(Strict):
    """FFHQ face alignment before resizing, for face generators (models/face_align.py,
    docs/alignment.md)."""

    landmarks: str  # TorchScript landmark model (path or URI; yours, never downloaded):
    # (1, 3, H, W) float in [0, 1] -> 68 (x, y) pixels in iBUG-68 order (dlib's shape_predictor_68)
    output_size: int | None = Field(None, ge=8)  # side of the aligned square (None: image_size)
    pad: bool = True  # fill what lies outside the picture as FFHQ does (false: black)


class IngestConfig(Strict):
    source: str | None = None  # dir, glob, s3:// prefix, *.tar (WebDataset) or *.parquet list
    shard_size: int = Field(1000, ge=1)  # samples per shard
    image_size: int = Field(256, ge=8)  # output side length
    resize: Literal["fit", "center_crop", "none"] = (
        "fit"  # fit: keep aspect, pad; center_crop; none
    )
    image_format: Literal["png", "jpg", "webp"] = "png"
    max_pixels: int = Field(178_956_970, ge=1)  # decompression-bomb guard (PIL's default limit)
    min_side: int = Field(8, ge=1)  # smaller images are rejected
    align: AlignConfig | None = None  # face alignment before resizing (None: off)


class SplitConfig(Strict):
    """The catalog's train/eval split by a stable key hash (``tasks.split``): an image is in the eval part
    when blake2b-64("split:" + key) / 2⁶⁴ < eval_fraction. Training (train-mapper, train-diffusion) reads
    only the train part of the catalog's images (generator samples are all training); bulk-edit edits only
    the eval part (evaluate measures what was edited). 0: no split."""

    eval_fraction: float = Field(0.0, ge=0, lt=1)  # FFHQ in the paper: 12 000 of 70 000 (0.1714…)


class SampleConfig(Strict):
    n: int = Field(0, ge=0)  # generator samples z → w → s (0: none)
    shard_size: int = Field(256, ge=1)
    batch_size: int = Field(32, ge=1)
    truncation_psi: float = Field(1.0, gt=0, le=1)  # 1: no truncation (the paper samples without)
    image_format: Literal["png", "jpg", "webp"] = "png"


class InvertConfig(Strict):
    batch_size: int = Field(16, ge=1)
    keep_wplus: bool = False  # also store W+ (the mapper needs only S)


class EmbedConfig(Strict):
    batch_size: int = Field(64, ge=1)


class TrainMapperConfig(Strict):
    """Delta Mapper training (official recipe by default: Adam lr 0.5 × lr_mul 0.01, batch 64, MSE + cosine)."""

    model: Literal["delta", "straightforward"] = (
        "delta"  # straightforward: the paper's (s₁, i₁, i₂) baseline
    )
    pools: list[Literal["codes", "samples"]] = [
        "codes",
        "samples",
    ]  # inverted images and/or generator samples
    steps: int = Field(201_562, ge=1)  # optimiser steps (the paper: one pass, 201,562 iterations)
    batch_size: int = Field(64, ge=1)  # per worker
    lr: float = Field(0.5, gt=0)  # Adam; EqualLinear's lr_mul 0.01 makes it 0.005 in effect
    betas: tuple[float, float] = (0.9, 0.999)
    mse_weight: float = Field(
        1.0, ge=0
    )  # loss = mse_weight·MSE(Δŝ, Δs) + cos_weight·(1 − cos(Δŝ, Δs))
    cos_weight: float = Field(1.0, ge=0)
    local_partners: float = Field(
        0.0, ge=0, le=1
    )  # share of partners drawn from the primary's nearest
    # neighbours in CLIP image space (official: 0, all uniform)
    neighbours: int = Field(16, ge=1)  # ... out of its this many nearest rows
    val_fraction: float = Field(0.01, ge=0, lt=1)  # held out by key hash
    val_every: int = Field(1000, ge=1)  # steps between validation passes
    val_pairs: int = Field(512, ge=1)  # fixed validation pairs
    checkpoint_every: int = Field(5000, ge=1)
    keep_checkpoints: int = Field(2, ge=1)  # older step checkpoints are deleted
    workers: int = Field(1, ge=1)  # > 1: Ray Train data-parallel (gloo on CPU, nccl on GPU)
    threads: int | None = Field(None, ge=1)  # torch CPU threads per worker (None: torch's default)
    cache_dir: str | None = None  # row cache: a local or shared path, or a URI (s3://:
    # built here, fetched by each node); None:
    # <root>/mapper_cache, or a temp dir


class DiffusionModelConfig(Strict):
    """The DeltaEdit-D U-Net (``models.diffusion.DiffusionConfig``; layout and image size come from the stores)."""

    base_channels: int = Field(64, ge=4)
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)  # one entry per resolution level, highest first
    num_res_blocks: int = Field(2, ge=1)
    norm_groups: int = Field(32, ge=1)
    emb_dim: int = Field(0, ge=0)  # 0: 4 × base_channels
    schedule: Literal["linear", "cosine"] = "linear"
    timesteps: int = Field(1000, ge=1)
    prediction: Literal["eps", "v"] = "eps"  # v: learns x₀ at high noise, where G(s) helps
    render_condition: bool = False  # the U-Net also sees G(s), rendered by models.generator


class TrainDiffusionConfig(Strict):
    """DeltaEdit-D training: ε-prediction with the L1 simple loss (the paper: AdamW lr 1e-4, wd 0.01, EMA)."""

    pools: list[Literal["codes", "samples"]] = [
        "codes",
        "samples",
    ]  # inverted images and/or generator samples
    model: DiffusionModelConfig = DiffusionModelConfig()
    # the decoder's side length: every image resized to it before caching; None: generator samples brought
    # to the ingested photos' size by block means (e4e's face_pool: FFHQ's 1024-px samples → 256 px), the
    # photos as ingested (bulk-edit DDIM-encodes them)
    image_size: int | None = Field(None, ge=8)
    steps: int = Field(100_000, ge=1)
    batch_size: int = Field(32, ge=1)  # per worker
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)  # linear lr warm-up from lr/warmup_steps (0: none)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0)  # max gradient norm (None: off)
    ema_decay: float = Field(
        0.9999, ge=0, lt=1
    )  # warmed up as min(decay, (1 + step) / (10 + step))
    val_fraction: float = Field(0.01, ge=0, lt=1)  # held out by key hash
    val_every: int = Field(1000, ge=1)
    val_images: int = Field(
        256, ge=1
    )  # fixed held-out images, fixed t and noise: a comparable loss
    checkpoint_every: int = Field(5000, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    workers: int = Field(1, ge=1)  # > 1: Ray Train data-parallel (gloo on CPU, nccl on GPU)
    threads: int | None = Field(None, ge=1)  # torch CPU threads per worker (None: torch's default)
    cache_dir: str | None = None  # row cache: a local or shared path, or a URI (s3://:
    # built here, fetched by each node); None:
    # <root>/diffusion_cache, or a temp dir


class RelevanceConfig(Strict):
    """Rₛ (StyleCLIP's fs3) for the run's generator and CLIP; stage `relevance_<mode>`, sharded by channel blocks."""

    mode: Literal["exact", "fast", "covariance", "imported"] = (
        "exact"  # exact: StyleCLIP's ±kσ renders; fast: Jacobian,
    )
    # check it first with `deltaedit relevance compare`; covariance:
    # from the run's samples (tasks/relevance_covariance.py); imported:
    # a published fs3.npy (`deltaedit relevance import`, from `source`)
    source: str | None = None  # imported: StyleCLIP's fs3.npy (a path or URI)
    pools: list[Literal["codes", "samples"]] = [
        "samples"
    ]  # covariance: the codes + CLIP stores it reads
    n_images: int = Field(100, ge=1)  # base images averaged over (StyleCLIP: 100)
    n_stat_samples: int = Field(
        100_000, ge=2
    )  # codes for the per-channel mean/std (StyleCLIP: 100k)
    sigma_scale: float = Field(5.0, gt=0)  # k in mean ± kσ
    block_size: int = Field(256, ge=1)  # channels per shard (the unit of resume)
    batch_size: int = Field(32, ge=1)  # exact: renders per forward
    jacobian_batch: int = Field(
        8, ge=1
    )  # fast: images per Jacobian pass (its graph is kept for D backwards)
    fast_rank: int = Field(
        0, ge=0
    )  # fast: 0 = full Jacobian; k = only k leading CLIP directions after batch 1
    compare_channels: int = Field(
        64, ge=1
    )  # `deltaedit relevance compare`: channels computed both ways
    compare_top_k: int = Field(10, ge=1)  # ... and the top-k overlap per prompt
    compare_prompts: list[str] = [
        "face -> face with smile",
        "a circle -> a square",  # "source -> target"
        "a shape -> a red shape",
        "a shape -> a large shape",
    ]


class DiffusionEditConfig(Strict):
    """How DeltaEdit-D decodes: DDIM-encode the input photo under s, decode under the edited ŝ."""

    steps: int = Field(50, ge=1)  # DDIM steps (encode and decode)
    refine: int = Field(0, ge=0)  # fixed-point refinements per encoding step (exact inversion)
    encode_depth: float = Field(
        1.0, gt=0, le=1
    )  # fraction of T to encode to (1: x_T; less keeps more)
    guidance: float = Field(
        1.0, ge=0
    )  # ε(s) + w·(ε(ŝ) − ε(s)); 1: the plain ε(ŝ), > 1: stronger edits
    eta: float = Field(
        0.0, ge=0, le=1
    )  # DDIM η of the decode: 0 deterministic (the paper); > 0 fresh noise, seeded per image
    edit_region: Literal["photo", "generator"] = (
        "photo"  # what each edit DDIM-encodes: the photo (the paper),
    )
    # or the photo with G(s) where the edit changes G's rendering, so the photo's detail there (a
    # moved shape's outline) is not carried over; one more encoding per edit (tasks/edit/diffusion.py)
    region_threshold: float = Field(
        0.15, gt=0
    )  # generator: pixels where |G(ŝ) − G(s)| (channel mean, [-1, 1] scale) is above this,
    region_dilate: int = Field(2, ge=0)  # ... grown by this many pixels
    mask_threshold: float = Field(
        0.5, gt=0, lt=1
    )  # diffusion_masked: |ε(ŝ) − ε(s)| above this × its max
    mask_smooth: int = Field(3, ge=1)  # ... box-smoothed over this many pixels (odd)
    methods: list[Literal["deltaedit", "straightforward", "styleclip_gd"]] | None = (
        None  # None: all methods
    )
    max_images: int | None = Field(None, ge=1)  # decode only the first N images of each edits shard


class BulkEditConfig(Strict):
    """Bulk text-guided edits: every image of the codes store × every prompt × every method × every decoder."""

    prompts: str | None = None  # YAML or CSV file/URI (see tasks/prompts.py)
    catalog: str | None = (
        None  # new images: ingested, inverted and embedded first (else: the run's)
    )
    methods: list[Literal["deltaedit", "straightforward", "styleclip_gd"]] = ["deltaedit"]
    tau: float = Field(
        0.03, ge=0
    )  # relevance threshold: zero channels with |Rs·Δt| < tau (paper: 0.03)
    threshold: Literal["absolute", "normalized", "relative"] = (
        "absolute"  # the paper's |Rs·Δt| < tau;
    )
    # normalized: |Rs·Δt|/‖Δt‖ < tau; relative: < tau × the prompt's
    # largest (scale-free; models/edit_directions.relevance_mask)
    condition: Literal["text", "retrieved"] = (
        "text"  # the Delta Mapper's condition: Δt itself (the paper),
    )
    # or the mean of the retrieve_k image-pair directions from the
    # mapper's training images that Δt points along best
    # (models/edit_directions.retrieved_direction, docs/text-condition.md)
    retrieve_k: int = Field(8, ge=1)  # image pairs averaged per edit (condition: retrieved)
    memory_rows: int = Field(
        65_536, ge=1
    )  # at most this many training embeddings searched (seeded subset)
    mask: Literal["text", "text+image"] = (
        "text"  # DeltaEdit's channels: those relevant to Δt (the paper), or
    )
    # also, per image, those its retrieved direction needs within the
    # prompt's image subspace (condition: retrieved; models/edit_directions
    # .image_mask, docs/relevance.md "Per-image mask")
    image_mask_rank: int = Field(
        2, ge=1
    )  # dimensions of the prompt's image subspace (mask: text+image)
    image_mask_tau: float = Field(
        0.3, gt=0, le=1
    )  # cosine a channel needs with the projected direction
    gd_alpha: float = 4.0  # StyleCLIP global direction: step α (its demo: 4)
    gd_beta: float = Field(0.15, ge=0, lt=1)  # ... and disentanglement threshold β (its demo: 0.15)
    templates: Literal["imagenet", "none"] = (
        "imagenet"  # prompt templates averaged (79 ImageNet ones)
    )
    long_prompts: Literal["fail", "truncate"] = (
        "fail"  # past the text context: fail those edits, or cut
    )
    reconstruction: bool = True  # also store G(s) of every image (the report's baseline column)
    images_per_shard: int = Field(
        64, ge=1
    )  # images per edits shard (the unit of resume; each costs a
    # Prefect task and a Ray call, so not too few)
    max_images: int | None = Field(None, ge=1)  # edit only the first N images of the codes store
    batch_size: int = Field(32, ge=1)  # codes per mapper / generator forward
    compile: bool = False  # torch.compile the generator (one compile per actor: seconds with a
    # warm Inductor cache, ~1 min cold; toy G decodes 1.9× faster on CPU)
    image_format: Literal["png", "jpg", "webp"] = "png"
    png_level: int = Field(
        1, ge=0, le=9
    )  # zlib level of PNG edits (lossless at any level): 1 writes 2.7× faster
    # than PIL's default 6 for 19% more bytes (toy); 9 for archives
    straightforward_mapper: ModelSpec | None = (
        None  # default: <root>/mapper_straightforward/mapper.safetensors
    )
    decoder: list[Literal["generator", "diffusion", "diffusion_masked"]] = [
        "generator"
    ]  # DeltaEdit-G and/or
    # -D (models.diffusion); diffusion_masked: mask-guided decoding
    diffusion: DiffusionEditConfig = DiffusionEditConfig()

    @field_validator("decoder", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _image_mask_needs_retrieval(self) -> BulkEditConfig:
        if self.mask == "text+image" and self.condition != "retrieved":
            raise ValueError(
                "mask: text+image needs condition: retrieved (the per-image part uses the image's "
                "retrieved direction)"
            )
        return self


class EvaluateConfig(Strict):
    """Metrics of the edits store and the HTML report. Learned metrics run only on weights the user gives."""

    features: Literal["auto", "clip", "inception"] = "auto"  # FID/KID features; auto: Inception
    # when inception_weights is set, else the run's CLIP (not comparable with the paper)
    inception_weights: str | None = None  # torch-fidelity's FID Inception: the file
    # weights-inception-2015-12-05-6726825d.pth (path or URI; never downloaded)
    lpips_weights: str | None = (
        None  # torchvision backbone state dict (e.g. alexnet-owt-7be5be79.pth)
    )
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    identity_model: str | None = None  # face-ID weights (path or URI): e4e's model_ir_se50.pth
    identity_format: Literal["arcface_ir_se50", "torchscript"] = "arcface_ir_se50"  # or a
    # TorchScript network: images in [-1, 1] at identity_input_size -> embeddings
    identity_input_size: int = Field(112, ge=8)  # torchscript only (ArcFace crops as e4e does)
    oracle: str | None = None  # toy attribute oracle (edit accuracy, preservation)
    batch_size: int = Field(64, ge=1)
    grid_images: int = Field(8, ge=1)  # rows of the report's image grids
    report_dir: str = "report"  # under the run root

    @property
    def feature_extractor(self) -> Literal["clip", "inception"]:
        """The FID/KID features ``features`` resolves to."""
        if self.features == "auto":
            return "inception" if self.inception_weights else "clip"
        return self.features


class ModelsConfig(Strict):
    """Which models a run uses: zoo specs such as ``{name: stylegan2, checkpoint: s3://b/ffhq.pt, size: 1024}``."""

    generator: ModelSpec | None = None
    encoder: ModelSpec | None = None
    clip: ModelSpec | None = None
    mapper: ModelSpec | None = None
    diffusion: ModelSpec | None = (
        None  # DeltaEdit-D decoder (default: <root>/diffusion/diffusion.safetensors)
    )

    @field_validator("generator", "encoder", "clip", "mapper", "diffusion")
    @classmethod
    def _known_to_the_zoo(cls, spec: ModelSpec | None) -> ModelSpec | None:
        if spec is not None:
            zoo.validate(spec)  # unknown names/options fail here, with the field's path
        return spec


class RunConfig(Strict):
    """Everything a run needs; sections grow with the stages."""

    name: str = "default"
    root: str = "runs/default"  # run root: a local path or any fsspec URI (s3://bucket/prefix)
    storage_options: dict[str, Any] = Field(
        default_factory=dict
    )  # fsspec options (endpoint_url, key, ...)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present
    ray: RayConfig = RayConfig()
    prefect: PrefectConfig = PrefectConfig()
    models: ModelsConfig = ModelsConfig()
    ingest: IngestConfig = IngestConfig()
    split: SplitConfig = SplitConfig()
    sample: SampleConfig = SampleConfig()
    invert: InvertConfig = InvertConfig()
    embed: EmbedConfig = EmbedConfig()
    relevance: RelevanceConfig = RelevanceConfig()
    train_mapper: TrainMapperConfig = TrainMapperConfig()
    train_diffusion: TrainDiffusionConfig = TrainDiffusionConfig()
    bulk_edit: BulkEditConfig = BulkEditConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (YAML; None = defaults), apply ``a.b=value`` overrides (values parsed as YAML), validate."""
    data: dict[str, Any] = {}
    where = str(path) if path else "<defaults>"
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: expected a mapping at the top level, got {type(data).__name__}"
            )
    for item in overrides or []:
        _apply_override(data, item, where)
    return validate(data, where)


def validate(data: dict[str, Any], where: str) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, where)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _apply_override(data: dict[str, Any], item: str, where: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' for {where}: expected key.path=value")
    key, raw = item.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}' for {where}: '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def _describe(exc: ValidationError, where: str) -> str:
    lines = [f"invalid config {where}:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<top level>"
        got = err.get("input")
        got_text = "" if err["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  field '{field}': {err['msg']}{got_text}")
    return "\n".join(lines)
