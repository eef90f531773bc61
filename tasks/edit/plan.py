"""Edit planning from a config, shared by bulk-edit, evaluate, `analyze edits` and the Editor.

``edit_variants`` reads the prompts file and resolves each variant's τ once (its own ``tau:``, else the
run's ``bulk_edit.tau``): everything downstream (whether Rₛ is loaded, the relevance mask, the manifest's
``tau`` column) uses that one value. ``edit_builder`` locates the models, mappers and Rₛ the edit stage
needs and reports what is missing before any work; ``planned_edits`` lists the edits shards.
``write_plan`` records in the edits store what bulk-edit planned (shards, variants, methods, decoders);
evaluate reads that record (``read_plan``), so it measures what was edited, not what the prompts file
says today.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from infra.config import ConfigError, RunConfig
from infra.runtime.shards import Item, ShardSpec, assign
from infra.storage.fsio import Location
from infra.storage.store import StageStore
from models.zoo import ModelSpec
from tasks.edit.builder import EditBuilder, item_models
from tasks.edit.memory import memory_shards
from tasks.edit.processor import GENERATOR, plan_edits
from tasks.layout import DIFFUSION_DIR, EDIT_PLAN, MAPPER_POOLS, Stages, mapper_dir, relevance_stage
from tasks.prompts import EditVariant, load_prompts, resolve_tau
from tasks.relevance import load_relevance
from tasks.split import eval_keys
from tasks.train.diffusion import FINAL as DIFFUSION_FILE
from tasks.train.mapper import FINAL as MAPPER_FILE


def input_stages(cfg: RunConfig) -> Stages:
    """The stages of this config's edits: a bulk_edit.catalog's own (prefixed), else the run's."""
    return Stages.of(catalog=bool(cfg.bulk_edit.catalog))


def edit_variants(cfg: RunConfig, where: str) -> list[EditVariant]:
    """The prompts file's variants, each with the τ it is edited with."""
    if not cfg.bulk_edit.prompts:
        raise ConfigError(
            f"{where}: bulk-edit needs bulk_edit.prompts (a YAML or CSV prompts file)"
        )
    return resolve_tau(load_prompts(cfg.bulk_edit.prompts, cfg.storage_options), cfg.bulk_edit.tau)


def planned_edits(
    cfg: RunConfig, variants: Sequence[EditVariant], builder: EditBuilder | None = None
) -> list[ShardSpec]:
    """The edits shards of this config (prompts × methods × the ok codes; of the run's own catalog, only
    its eval part, ``tasks.split``).

    With a ``builder`` whose ``models_per_item`` is set, every edit's item also names the models it
    depends on (its method's mapper, the diffusion decoder), and a plain diffusion edit whether its
    mask-guided twin is planned (that twin's mask scores it): each edit's item fingerprint then covers
    everything that edit depends on beyond the stage's fingerprint, so a new prompt, method or decoder
    computes only its own edits (the others are copied, ``infra.runtime.stage``)."""
    root = Location(cfg.root, cfg.storage_options)
    codes = StageStore(root, input_stages(cfg).codes)
    # the run's catalog: only its eval part is edited (split.eval_fraction); a bulk_edit.catalog: all
    keep = None if cfg.bulk_edit.catalog else eval_keys(cfg.split.eval_fraction)
    specs = plan_edits(codes, variants, cfg.bulk_edit.methods, cfg.bulk_edit, keep)
    if builder is None or not builder.models_per_item:
        return specs
    if cfg.bulk_edit.diffusion.max_images is None:  # else an image's decoders depend on its group
        specs = _stable_groups(specs, StageStore(root, input_stages(cfg).edits), cfg)
    models = item_models(builder)
    return [ShardSpec(s.shard_id, _with_models(s.items, models)) for s in specs]


def _stable_groups(specs: list[ShardSpec], edits: StageStore, cfg: RunConfig) -> list[ShardSpec]:
    """Each image keeps the edits shard a finished shard put it in; new images go to new groups of
    ``images_per_shard`` (``infra.runtime.shards.assign``), so removing an image rewrites only its own
    group and adding one touches no old group."""
    previous: dict[str, str] = {}
    for shard_id in sorted(edits.all_finished()):
        table = edits.manifest(shard_id)
        if "image_key" in table.column_names:
            for key in table.column("image_key").to_pylist():
                previous.setdefault(key, shard_id)
    if not previous:
        return specs
    by_codes: dict[str, dict[str, list[Item]]] = {}
    for spec in specs:
        for item in spec.items:
            shard = item.meta["codes_shard"]
            by_codes.setdefault(shard, {}).setdefault(item.meta["image"], []).append(item)
    out = []
    for shard, images in by_codes.items():
        mine = {k: v for k, v in previous.items() if v.startswith(f"{shard}-")}
        groups = assign(
            list(images), cfg.bulk_edit.images_per_shard, mine, f"{shard}-{{:03d}}".format
        )
        out += [
            ShardSpec(sid, tuple(i for k in keys for i in images[k]))
            for sid, keys in groups.items()
        ]
    return sorted(out, key=lambda s: s.shard_id)


def _with_models(items: Sequence[Item], models: dict[str, Any]) -> tuple[Item, ...]:
    keys = {i.key for i in items}
    out = []
    for item in items:
        method, decoder = item.meta["method"], item.meta["decoder"]
        meta = dict(item.meta)
        if method in models:
            meta["mapper"] = models[method]
        if decoder != GENERATOR:
            meta["diffusion"] = models.get("diffusion")
        if decoder == "diffusion" and f"{item.key}_masked" in keys:
            meta["masked_twin"] = True
        out.append(Item(item.key, item.source, meta))
    return tuple(out)


def edit_builder(cfg: RunConfig, where: str, variants: Sequence[EditVariant] = ()) -> EditBuilder:
    """The edit stage for this config; missing models, mappers or Rₛ are reported before any work.

    Rₛ is loaded when any variant's τ is positive (without variants: the run's τ, for prompts to come), or
    StyleCLIP-GD runs.
    """
    be = cfg.bulk_edit
    missing = [f"models.{m}" for m in ("generator", "clip") if getattr(cfg.models, m) is None]
    if missing:
        raise ConfigError(f"{where}: bulk-edit needs {', '.join(missing)}")
    mappers = tuple((m, _mapper_spec(cfg, m, where)) for m in be.methods if m != "styleclip_gd")
    taus = [v.tau for v in variants] if variants else [be.tau]
    relevance = relevance_stage(cfg.relevance.mode)
    needs_relevance = any(t > 0 for t in taus) or "styleclip_gd" in be.methods
    if needs_relevance:
        _require_relevance(cfg, relevance, where)
    stages = input_stages(cfg)
    return EditBuilder(
        generator=cfg.models.generator,
        clip=cfg.models.clip,
        root=cfg.root,
        cfg=be,
        mappers=mappers,
        relevance_stage=relevance if needs_relevance else None,
        diffusion=_diffusion_spec(cfg, where)
        if any(d != "generator" for d in be.decoder)
        else None,
        memory_stages=memory_stages(cfg, where)
        if be.condition == "retrieved" and "deltaedit" in be.methods
        else (),
        eval_fraction=cfg.split.eval_fraction,
        models_per_item=True,
        n_stat_samples=cfg.relevance.n_stat_samples,
        seed=cfg.seed,
        storage_options=cfg.storage_options,
        device=cfg.device,
        cpus=cfg.ray.cpus_per_actor,
        codes_stage=stages.codes,
        clip_stage=stages.clip,
        images_stage=stages.images,
        stage=stages.edits,
    )


def memory_stages(cfg: RunConfig, where: str) -> tuple[str, ...]:
    """The CLIP image-embedding stages of the mapper's training pools: the memory of condition=retrieved."""
    stages = tuple(MAPPER_POOLS[pool][1] for pool in cfg.train_mapper.pools)
    if not memory_shards(Location(cfg.root, cfg.storage_options), stages):
        raise ConfigError(
            f"{where}: bulk_edit.condition=retrieved searches the CLIP image embeddings the mapper "
            f"was trained on ({', '.join(stages)} under {cfg.root}); none is finished: run "
            "`deltaedit run preprocess` first, or set bulk_edit.condition=text "
            "bulk_edit.mask=text"
        )
    return stages


@dataclass(frozen=True)
class EditPlan:
    """What bulk-edit planned into an edits store (its ``plan.json``)."""

    shards: tuple[str, ...]
    variants: tuple[EditVariant, ...]
    methods: tuple[str, ...]
    decoders: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards": list(self.shards),
            "variants": [v.to_dict() for v in self.variants],
            "methods": list(self.methods),
            "decoders": list(self.decoders),
        }


def write_plan(
    cfg: RunConfig, specs: Sequence[ShardSpec], variants: Sequence[EditVariant]
) -> EditPlan:
    """Record this config's plan (every planned shard, even those not run now) in its edits store."""
    plan = EditPlan(
        tuple(s.shard_id for s in specs),
        tuple(variants),
        tuple(cfg.bulk_edit.methods),
        tuple(cfg.bulk_edit.decoder),
    )
    edits = StageStore(Location(cfg.root, cfg.storage_options), input_stages(cfg).edits)
    edits.loc.write_bytes(
        EDIT_PLAN, json.dumps(plan.to_dict(), indent=1, ensure_ascii=False).encode()
    )
    return plan


def read_plan(edits: StageStore) -> EditPlan:
    """The plan bulk-edit recorded in ``edits``; a ConfigError when it has none."""
    if not edits.loc.exists(EDIT_PLAN):
        raise ConfigError(
            f"{edits.loc.url(EDIT_PLAN)} does not exist: run `deltaedit run bulk-edit` first "
            "(finished edits are skipped; it records what it planned)"
        )
    data = json.loads(edits.loc.read_bytes(EDIT_PLAN))
    return EditPlan(
        tuple(data["shards"]),
        tuple(EditVariant.from_dict(v) for v in data["variants"]),
        tuple(data["methods"]),
        tuple(data["decoders"]),
    )


def _mapper_spec(cfg: RunConfig, method: str, where: str) -> ModelSpec:
    """The configured mapper, else the one train-mapper wrote into this run."""
    if method == "deltaedit" and cfg.models.mapper is not None:
        return cfg.models.mapper
    if method == "straightforward" and cfg.bulk_edit.straightforward_mapper is not None:
        return cfg.bulk_edit.straightforward_mapper
    model = "delta" if method == "deltaedit" else "straightforward"
    folder = Location(cfg.root, cfg.storage_options).child(mapper_dir(model))
    if not folder.exists(MAPPER_FILE):
        setting = "models.mapper" if model == "delta" else "bulk_edit.straightforward_mapper"
        raise ConfigError(
            f"{where}: method '{method}' needs a trained mapper: {folder.url(MAPPER_FILE)} does "
            f"not exist (run `deltaedit run train-mapper train_mapper.model={model}` to "
            f"finish training, or set {setting})"
        )
    name = "delta_mapper" if model == "delta" else "straightforward_mapper"
    return ModelSpec(name=name, checkpoint=folder.url(MAPPER_FILE))


def _diffusion_spec(cfg: RunConfig, where: str) -> ModelSpec:
    """The configured diffusion decoder, else the one train-diffusion wrote into this run."""
    if cfg.models.diffusion is not None:
        return cfg.models.diffusion
    folder = Location(cfg.root, cfg.storage_options).child(DIFFUSION_DIR)
    if not folder.exists(DIFFUSION_FILE):
        raise ConfigError(
            f"{where}: bulk_edit.decoder {cfg.bulk_edit.decoder} needs a diffusion decoder: "
            f"{folder.url(DIFFUSION_FILE)} does not exist (run `deltaedit run train-diffusion`, "
            "or set models.diffusion)"
        )
    return ModelSpec(name="style_diffusion", checkpoint=folder.url(DIFFUSION_FILE))


def _require_relevance(cfg: RunConfig, stage: str, where: str) -> None:
    try:
        load_relevance(cfg.root, stage, cfg.storage_options)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(
            f"{where}: bulk-edit with tau > 0 or styleclip_gd needs the relevance matrix "
            f"({exc}); run `deltaedit run relevance` first, or set bulk_edit.tau=0"
        ) from None
