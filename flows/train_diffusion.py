"""Train the DeltaEdit-D decoder from the run's stores: `deltaedit run train-diffusion --config FILE`.

    images + codes  ┐
                    ├─ row cache (one pass, shard by shard) ─ fit (ε-prediction, EMA) ─► <root>/diffusion/
    samples         ┘

The flow body is ``flows.training``'s: a rerun continues from the last checkpoint; ``overwrite`` starts over;
with ``train_diffusion.workers > 1`` the same ``fit`` runs on Ray Train (TorchTrainer, DDP; gloo on CPU, nccl
on GPUs), each worker on its own slice of the images.
"""

from __future__ import annotations

from flows.training import TrainingFlow, training_flow
from infra.config import ConfigError, RunConfig
from tasks.layout import DIFFUSION_DIR
from tasks.train.diffusion import DiffusionTrainer
from tasks.train.diffusion_data import GeneratorRender, ImageCache, build_image_cache

train_diffusion_flow = training_flow(
    TrainingFlow(
        name="train-diffusion",
        section="train_diffusion",
        tag="diffusion",
        build_cache=build_image_cache,
        open_cache=ImageCache,
        trainer=DiffusionTrainer,
        out_dir=lambda _: DIFFUSION_DIR,
        cache_options=lambda cfg: {
            "image_size": cfg.train_diffusion.image_size,  # None: the generator samples at the
            # ingested photos' size (1024-px FFHQ samples → 256 px)
            "render": generator_render(cfg),
        },
    )
)


def generator_render(cfg: RunConfig) -> GeneratorRender | None:
    """G(s) for the cache of a decoder conditioned on it (``train_diffusion.model.render_condition``)."""
    if not cfg.train_diffusion.model.render_condition:
        return None
    if cfg.models.generator is None:
        raise ConfigError(
            "train-diffusion: train_diffusion.model.render_condition renders G(s) with "
            "models.generator, which is not set"
        )
    return GeneratorRender(cfg.models.generator, cfg.storage_options)
