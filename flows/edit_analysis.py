"""`deltaedit analyze edits`: where an edit is lost, on a run's own stores (not a Prefect flow).

Builds what ``tasks.analysis.edits`` measures from a config, the way the bulk-edit stage does: the
``EditBuilder`` of ``tasks.edit_plan.edit_builder`` (DeltaEdit-G only: the baselines, the diffusion
decoder and compilation do not change DeltaEdit's codes), the run's codes and CLIP image
embeddings, and the classifier the evaluate stage reads edits with. Missing inputs are reported
before any model runs.

Pluggable for another domain: ``classifier`` and ``counterfactuals`` may name ``module:function``
factories, ``factory(cfg, device) → (images → {attribute: labels})`` and
``factory(generator, n, seed) → provider`` (``tasks.edit_analysis.CounterfactualProvider``).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

from infra.config import RunConfig
from infra.storage.fsio import Location
from infra.storage.store import StageStore
from models import zoo
from models.device import pick_device
from models.toy.captions import expected_values
from models.toy.counterfactual import ToyCounterfactuals, channel_owners
from models.toy.domain import ATTRIBUTES
from models.toy.oracle import Oracle
from tasks.analysis import edits as EA
from tasks.analysis.edits_condition import condition_rows
from tasks.edit.diffusion import DiffusionDecoder
from tasks.edit.plan import edit_builder, edit_variants, input_stages

TOY = "toy"
NONE = "none"


def analysis_config(cfg: RunConfig) -> RunConfig:
    """The run's config with bulk-edit reduced to DeltaEdit decoded by the generator, uncompiled."""
    be = cfg.bulk_edit.model_copy(
        update={"methods": ["deltaedit"], "decoder": ["generator"], "compile": False}
    )
    return cfg.model_copy(update={"bulk_edit": be})


def load_factory(spec: str, what: str) -> Callable[..., Any]:
    """``module:function`` → the function; a clear error otherwise."""
    module, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name) if name else None
    except (ImportError, AttributeError) as exc:
        raise EA.AnalysisError(f"{what} {spec!r}: cannot load it ({exc})") from None
    if not callable(factory):
        raise EA.AnalysisError(f"{what} {spec!r}: expected 'toy' or module:function")
    return factory


def load_classifier(spec: str | None, cfg: RunConfig, device: str, where: str) -> EA.Classifier:
    """The toy oracle of ``evaluate.oracle`` (the evaluate stage's reader), or a factory's."""
    if spec not in (None, TOY):
        return load_factory(spec, "classifier")(cfg, device)
    if not cfg.evaluate.oracle:
        raise EA.AnalysisError(
            f"{where}: the analysis needs an attribute classifier: set "
            "evaluate.oracle (the toy oracle, zoo/toy/oracle.safetensors) or "
            "pass --classifier module:function"
        )

    try:
        oracle = Oracle.load(cfg.evaluate.oracle, device=device, **cfg.storage_options)
    except FileNotFoundError:
        raise EA.AnalysisError(
            f"{where}: evaluate.oracle {cfg.evaluate.oracle} does not exist"
        ) from None
    return oracle.predict


def analyze_edits(
    cfg: RunConfig,
    where: str,
    n_images: int = 32,
    n_samples: int = 32,
    classifier: str | None = None,
    counterfactuals: str | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The ceiling per attribute and DeltaEdit per prompt (τ = 0 and the run's τ) as one dict.

    ``classifier``/``counterfactuals``: None or "toy" for the toy defaults (the counterfactuals
    default to the toy's only with the toy classifier), "none" skips the ceiling, else
    ``module:function``.
    """
    start = time.perf_counter()
    acfg = analysis_config(cfg)
    variants = edit_variants(acfg, where)
    builder = edit_builder(acfg, where, variants)  # missing mapper / Rₛ / model: ConfigError here
    root, stages = Location(cfg.root, cfg.storage_options), input_stages(acfg)
    keys, rows = EA.load_rows(
        StageStore(root, stages.codes), StageStore(root, stages.clip), n_images
    )
    device = pick_device(cfg.device)
    classify = load_classifier(classifier, cfg, device, where)
    toy = classifier in (None, TOY)
    processor = builder.build()
    gen = processor.models.generator
    owners = channel_owners(gen.layout) if toy else None
    seed = cfg.seed if seed is None else seed
    cf = counterfactuals or (TOY if toy else NONE)
    result: dict[str, Any] = {
        "config": where,
        "root": cfg.root,
        "generator": cfg.models.generator.model_dump(mode="json"),
        "threshold": cfg.bulk_edit.threshold,
        "tau": cfg.bulk_edit.tau,
        "images": len(rows),
        "image_keys": keys,
        "samples": n_samples if cf != NONE else 0,
        "seed": seed,
        "conv_channels": gen.layout.conv_total,
    }
    if toy:
        result["value_names"] = {a: list(v) for a, v in ATTRIBUTES.items()}
    if owners is not None:
        result["channels_per_attribute"] = {a: owners.count(a) for a in dict.fromkeys(owners)}
    if cf != NONE:
        provider = (
            ToyCounterfactuals(gen, n_samples, seed)
            if cf == TOY
            else load_factory(cf, "counterfactuals")(gen, n_samples, seed)
        )
        result["ceiling"] = EA.ceiling(
            processor.models.render,
            classify,
            provider,
            owners,
            acfg.bulk_edit.batch_size,
            diffusion_decode(cfg, processor.models.render, device),
        )
        result["condition_kind"] = acfg.bulk_edit.condition
        result["condition"] = condition_rows(
            processor, classify, provider, variants, expected_values
        )
    result["prompts"] = EA.prompt_rows(processor, classify, variants, rows, expected_values, owners)
    result["notes"] = notes(result, owners is not None)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def diffusion_decode(cfg: RunConfig, render: EA.Render, device: str) -> EA.Decode | None:
    """DeltaEdit-D's reach for the ceiling, when the run decodes with it (``bulk_edit.decoder``)."""
    if cfg.models.diffusion is None or set(cfg.bulk_edit.decoder) == {"generator"}:
        return None
    model = zoo.build(cfg.models.diffusion, device, cfg.storage_options).eval()
    decoder = DiffusionDecoder(model, cfg.bulk_edit.diffusion, cfg.bulk_edit.batch_size, render)
    return EA.diffusion_decode(decoder, render)


def notes(result: dict[str, Any], labelled: bool) -> list[str]:
    """What to keep in mind when reading the tables."""
    out = [
        "conv_only = the counterfactual's conv styles with the sample's toRGB styles: the most "
        "an edit of the conv channels (DeltaEdit's) can show; rgb_only the converse; "
        "full_swap = s'.",
    ]
    if any("diffusion" in r for r in result.get("ceiling", {}).values()):
        out.append(
            "diffusion = DeltaEdit-D's reach: G(s) DDIM-encoded under s, decoded under the "
            "conv_only code with the run's bulk_edit.diffusion settings; below conv_only, the "
            "decoder loses edits the generator lands."
        )
    if labelled:
        out.append(
            "channel labels: models.toy.train_generator.channel_attributes; "
            "own_channel_share = the part of an attribute's counterfactual conv change "
            "inside its labelled channels (labelled_fraction: what chance would give)."
        )
        misfit = [
            a
            for a, r in result.get("ceiling", {}).items()
            if not r["own_channel_share"] >= (1 + r["labelled_fraction"]) / 2
        ]
        if misfit:
            out.append(
                f"the channel labels do not fit this generator for {', '.join(misfit)}: "
                "own_channel_share is nearer the labelled fraction (chance) than 1, as for "
                "a generator not trained with attribute-owned channels; for those "
                "attributes the kept-channels table does not say which attribute the kept "
                "channels carry."
            )
    return out
