"""The run layout, declared once: every stage's name, every output folder under the run root, and which
stage reads which. Flows, tasks and the app name stages and folders only through this module.

    catalog ──ingest──► images ──invert──► codes ─────────────────┐
                          └──────embed───► clip_images ───────────┤
    generator ──sample──► samples ──embed──► clip_samples         ├─► train-mapper ──► mapper[_<model>]/
                                                                  ├─► train-diffusion ──► diffusion/
    generator + CLIP (+ samples, covariance) ──relevance──► relevance_<mode>
    codes + clip_images + images (+ mapper, relevance, diffusion) ──edit──► edits
    edits + images ──metrics──► metrics ──► <evaluate.report_dir>/ (the HTML report)

A ``bulk_edit.catalog`` (a second catalog edited with the run's models) has its own images, codes,
clip_images, edits and metrics, each prefixed ``catalog_`` (``Stages.of``).
"""

from __future__ import annotations

from typing import NamedTuple

IMAGES = "images"
CODES = "codes"
SAMPLES = "samples"
EDITS = "edits"
METRICS = "metrics"
CATALOG_PREFIX = "catalog_"  # a bulk_edit.catalog's stages

DIFFUSION_DIR = "diffusion"  # train-diffusion's model folder
ANALYSIS_DIR = "analysis"  # `deltaedit analyze edits`' outputs
EDIT_PLAN = "plan.json"  # in an edits stage: what bulk-edit planned (evaluate reads it)


def clip_stage(images: str) -> str:
    """The CLIP image embeddings of an image stage (``images`` → ``clip_images``)."""
    return f"clip_{images}"


def relevance_stage(mode: str) -> str:
    """Rₛ's blocks for a ``relevance.mode``."""
    return f"relevance_{mode}"


def mapper_dir(model: str) -> str:
    """Where train-mapper writes a model under the run root: ``mapper`` (Delta Mapper) or ``mapper_<model>``."""
    return "mapper" if model == "delta" else f"mapper_{model}"


CLIP_IMAGES = clip_stage(IMAGES)
CLIP_SAMPLES = clip_stage(SAMPLES)

# the training pools (train_mapper.pools, train_diffusion.pools, relevance.pools) and the stages each reads
MAPPER_POOLS: dict[str, tuple[str, str]] = {
    CODES: (CODES, CLIP_IMAGES),
    SAMPLES: (SAMPLES, CLIP_SAMPLES),
}
DIFFUSION_POOLS: dict[str, tuple[str, str]] = {CODES: (IMAGES, CODES), SAMPLES: (SAMPLES, SAMPLES)}


class Stages(NamedTuple):
    """The stages of one catalog's edits, from its images to its metrics."""

    images: str
    codes: str
    clip: str
    edits: str
    metrics: str

    @classmethod
    def of(cls, catalog: bool = False) -> Stages:
        """The run's own stages, or (``catalog``) a bulk_edit.catalog's prefixed ones."""
        return cls.with_prefix(CATALOG_PREFIX if catalog else "")

    @classmethod
    def with_prefix(cls, prefix: str) -> Stages:
        images = prefix + IMAGES
        return cls(images, prefix + CODES, clip_stage(images), prefix + EDITS, prefix + METRICS)

    @classmethod
    def of_edits(cls, edits: str) -> Stages:
        """The stages an edits stage belongs to (``catalog_edits`` → catalog_images, ...; an edits stage
        of another name: the run's)."""
        return cls.with_prefix(edits[: -len(EDITS)] if edits.endswith(EDITS) else "")

    def reads(self) -> dict[str, tuple[str, ...]]:
        """Which stage reads which (each stage: the stages its builder opens)."""
        return {
            self.codes: (self.images,),
            self.clip: (self.images,),
            self.edits: (self.codes, self.clip, self.images),
            self.metrics: (self.images, self.edits),
        }
