"""Where is an edit lost? The generator's S-space ceiling next to DeltaEdit with and without mask.

An edit "a shape" → "a red shape" can fail in three places, each with its own measurement here:

1. **the generator** (``ceiling``): can a change of the conv styles carry the attribute at all? For
   sample codes s and, per attribute value, a counterfactual s' that differs from s only in that
   attribute (a domain's ``CounterfactualProvider``), three mixes are decoded and read by the
   attribute classifier: conv styles of s' with toRGB of s (``conv_only``: all DeltaEdit can reach,
   as it never edits toRGB styles), toRGB of s' with conv of s (``rgb_only``) and s' itself
   (``full_swap``). Accuracy is the fraction read as the target value; ``unedited`` is how often s
   already shows it (chance).
2. **the relevance mask** (``prompt_rows``): DeltaEdit's edit at τ = 0 (every channel kept) next to
   the run's τ. A drop between the two is the threshold's; the kept channels counted per attribute
   (where the generator says which attribute a channel carries) show which channels went.
3. **the mapper**: a low τ = 0 accuracy under a high ``conv_only`` ceiling is the mapper's.
4. **the diffusion decoder** (``ceiling``'s ``diffusion`` column, when the run decodes with DeltaEdit-D):
   G(s), DDIM-encoded under s as the edit stage encodes a photo, decoded under the ``conv_only`` code.
   Below ``conv_only``, DeltaEdit-D loses edits that DeltaEdit-G lands with the same code.

Every edit goes through the bulk-edit stage's own ``EditProcessor._edit`` and is decoded and read as
the edit and evaluate stages do (8-bit pixels, ``models.metrics.oracle_scores``), so the numbers are
the report's. The classifier and the counterfactual provider are plain callables: the toy oracle and
``models.toy.counterfactual`` by default, a user's own for another domain.
``flows/edit_analysis.py`` builds the inputs from a run; this module only computes and formats.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from infra.config import ConfigError
from infra.runtime.upstream import plan_downstream
from infra.storage.fsio import Location
from infra.storage.readers import read_vectors, vectors_tensor
from infra.storage.store import StageStore
from models import edit_directions as ed
from models import metrics as M
from models.imaging import pool_to, to_uint8
from models.stylegan2 import StyleCode
from tasks.edit.diffusion import DiffusionDecoder
from tasks.edit.processor import EditProcessor
from tasks.layout import ANALYSIS_DIR
from tasks.prompts import EditVariant

MIXES = ("conv_only", "rgb_only", "full_swap")
JSON_FILE, MD_FILE = "analysis.json", "analysis.md"
Classifier = Callable[[Tensor], Mapping[str, Tensor]]  # images (B, 3, H, W) in [-1, 1] → labels
Expected = Callable[[str, str], dict[str, int]]  # (source, target text) → {attribute: label}
Row = tuple[Tensor, Tensor, Tensor]  # (s conv, s toRGB, CLIP image embedding)
Render = Callable[[Tensor, Tensor], Tensor]  # (conv, toRGB styles) → images
Decode = Callable[[StyleCode, Tensor], Tensor]  # (source codes, edited conv styles) → images


class AnalysisError(ConfigError):
    """An input of the analysis is missing; the message names it and how to make it."""


class CounterfactualProvider(Protocol):
    """A domain's counterfactual codes: ``attributes()`` (name → number of values, the classifier's
    label count) and ``provider(attribute, value) → (s, s')`` for the same n samples every call, s'
    differing from s in that attribute only (``models.toy.counterfactual.ToyCounterfactuals``)."""

    def attributes(self) -> dict[str, int]: ...

    def __call__(self, attribute: str, value: int) -> tuple[StyleCode, StyleCode]: ...


# --- decoding as the edit and evaluate stages do --------------------------------------------------


def as_stored(images: Tensor) -> Tensor:
    """Images as the evaluate stage reads them back: rounded to 8 bits (edits are stored as PNG)."""
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


@torch.no_grad()
def read(
    render: Render, classifier: Classifier, conv: Tensor, rgb: Tensor, batch_size: int = 64
) -> dict[str, Tensor]:
    """Classifier labels (B,) per attribute of the images ``render(conv, rgb)`` decodes, batched."""
    parts = []
    for start in range(0, len(conv), batch_size):
        images = render(conv[start : start + batch_size], rgb[start : start + batch_size])
        parts.append({k: v.cpu() for k, v in classifier(as_stored(images)).items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def mix(base: StyleCode, counterfactual: StyleCode, kind: str) -> StyleCode:
    """The code of one mix: the counterfactual's conv and/or toRGB styles, the base's otherwise."""
    conv = counterfactual.conv if kind in ("conv_only", "full_swap") else base.conv
    rgb = counterfactual.rgb if kind in ("rgb_only", "full_swap") else base.rgb
    return StyleCode(conv, rgb)


# --- 1. the generator's ceiling -------------------------------------------------------------------


def ceiling(
    render: Render,
    classifier: Classifier,
    provider: CounterfactualProvider,
    owners: Sequence[str] | None = None,
    batch_size: int = 64,
    decode: Decode | None = None,
) -> dict[str, dict[str, Any]]:
    """Per attribute: chance, ``unedited`` and each mix's accuracy (mean over values and samples;
    also per value); with ``decode`` (a diffusion decoder's edit of G(s)), the ``diffusion``
    accuracy of the ``conv_only`` code. With ``owners`` (the attribute of each conv channel),
    ``own_channel_share``: the part of ‖s'.conv − s.conv‖² in the channels labelled with the
    attribute (≈ 1 when the labels fit the generator, ≈ ``labelled_fraction``, their share of the
    channels, if not)."""
    out: dict[str, dict[str, Any]] = {}
    for attribute, n_values in provider.attributes().items():
        kinds = ("unedited", *MIXES, *(["diffusion"] if decode else []))
        hits: dict[str, list[float]] = {k: [] for k in kinds}
        energy = own = 0.0
        for value in range(n_values):
            base, cf = provider(attribute, value)
            if value == 0:
                before = read(render, classifier, base.conv, base.rgb, batch_size)[attribute]
            hits["unedited"].append(float((before == value).float().mean()))
            for kind in MIXES:
                code = mix(base, cf, kind)
                labels = read(render, classifier, code.conv, code.rgb, batch_size)[attribute]
                hits[kind].append(float((labels == value).float().mean()))
            if decode is not None:
                images = decode(base, mix(base, cf, "conv_only").conv)
                labels = {k: v.cpu() for k, v in classifier(as_stored(images)).items()}[attribute]
                hits["diffusion"].append(float((labels == value).float().mean()))
            if owners is not None:
                change = (cf.conv - base.conv).float().pow(2).sum(0).cpu()
                mine = torch.tensor([o == attribute for o in owners])
                energy, own = energy + float(change.sum()), own + float(change[mine].sum())
        row: dict[str, Any] = {
            "values": n_values,
            "chance": 1 / n_values,
            **{k: float(np.mean(v)) for k, v in hits.items()},
            "per_value": {k: [round(x, 4) for x in v] for k, v in hits.items()},
        }
        if owners is not None:
            row["own_channel_share"] = own / energy if energy > 0 else math.nan
            row["labelled_fraction"] = sum(o == attribute for o in owners) / len(owners)
        out[attribute] = row
    return out


def diffusion_decode(decoder: DiffusionDecoder, render: Render) -> Decode:
    """``ceiling``'s ``decode`` for DeltaEdit-D: G(s), stored as 8-bit like a photo, DDIM-encoded under
    s as the edit stage encodes photos (once per batch of source codes), decoded under the edited conv
    styles."""
    encoded: list[tuple[StyleCode, Tensor]] = []  # the last source batch (kept, so `is` is safe)

    def decode(base: StyleCode, conv: Tensor) -> Tensor:
        if not encoded or encoded[0][0] is not base:
            size = decoder.model.config.image_size
            photo = as_stored(pool_to(render(base.conv, base.rgb).clamp(-1, 1), size))
            encoded[:] = [(base, decoder.encode(photo, base.conv, base.rgb))]
        return decoder.decode(encoded[0][1], base.conv.cpu(), conv.cpu(), base.rgb.cpu())

    return decode


# --- 2. DeltaEdit per prompt, τ = 0 and the run's τ -----------------------------------------------


def load_rows(codes: StageStore, clip: StageStore, n: int) -> tuple[list[str], list[Row]]:
    """The first ``n`` ok codes in bulk-edit's order, with their CLIP image embeddings."""
    specs = plan_downstream(codes)
    keys = [i.key for s in specs for i in s.items][:n]
    if not keys:
        raise AnalysisError(
            f"no finished codes under {codes.loc.uri}: run `deltaedit run "
            "preprocess` (the analysis edits the run's inverted codes)"
        )
    chosen = set(keys)
    wanted = {s.shard_id for s in specs if any(i.key in chosen for i in s.items)}
    table = read_vectors(codes, wanted)
    index = {k: n for n, k in enumerate(table.column("key").to_pylist())}
    s, rgb = vectors_tensor(table, "s"), vectors_tensor(table, "s_rgb")
    try:
        emb_table = read_vectors(clip, [w for w in wanted if w in clip.finished()])
    except FileNotFoundError:
        raise AnalysisError(
            f"no CLIP image embeddings under {clip.loc.uri} for the codes shards "
            f"{sorted(wanted)}: run `deltaedit run preprocess` (its embed step)"
        ) from None
    emb = dict(zip(emb_table.column("key").to_pylist(), vectors_tensor(emb_table, "embedding")))
    missing = [k for k in keys if k not in emb]
    if missing:
        raise AnalysisError(
            f"{len(missing)} of the {len(keys)} images have no CLIP embedding "
            f"under {clip.loc.uri} (first {missing[:3]}); rerun `deltaedit run "
            "preprocess`"
        )
    return keys, [(s[index[k]], rgb[index[k]], emb[k]) for k in keys]


def kept_channels(processor: EditProcessor, variant: EditVariant) -> Tensor:
    """(C,) bool: the channels the relevance mask keeps for the variant at its τ (all, no Rₛ)."""
    dt, _ = processor._text(variant)
    relevance = processor.models.relevance
    if relevance is None:
        return torch.ones(processor.models.generator.layout.conv_total, dtype=torch.bool)
    return ed.relevance_mask(
        relevance, dt.to(relevance.device), variant.tau, processor.cfg.threshold
    ).cpu()


def edit_scores(
    processor: EditProcessor,
    classifier: Classifier,
    variant: EditVariant,
    rows: list[Row],
    before: dict[str, Tensor],
    expected: dict[str, int],
) -> dict[str, float]:
    """Mean edit accuracy and preservation of DeltaEdit's edit of ``rows`` by ``variant`` (at its
    τ), and the mean number of channels the edit changed."""
    conv, changed = processor._edit("deltaedit", variant, rows)
    rgb = torch.stack([r[1] for r in rows]).to(conv.device)
    after = read(processor.models.render, classifier, conv, rgb, processor.cfg.batch_size)
    scores = M.oracle_scores(before, after, expected)
    return {
        "edit_accuracy": nan_mean(scores["edit_accuracy"]),
        "preservation": nan_mean(scores["preservation"]),
        "channels_changed": float(changed.float().mean()),
    }


def prompt_rows(
    processor: EditProcessor,
    classifier: Classifier,
    variants: Sequence[EditVariant],
    rows: list[Row],
    expected_of: Expected,
    owners: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Per variant: kept channels at the run's τ (per attribute with ``owners``), the unedited rate
    and DeltaEdit's accuracy / preservation at τ = 0 and at the run's τ. Interpolation (ω) variants
    have no expected values, as in the evaluate stage, so their accuracy is NaN. The τ = 0 edit is
    the variant with its τ set to 0, so a per-prompt τ of the prompts file is switched off too."""
    device = next(processor.models.generator.parameters()).device
    rows = [tuple(x.to(device) for x in r) for r in rows]  # where the models are
    s, rgb = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    before = read(processor.models.render, classifier, s, rgb, processor.cfg.batch_size)
    out = []
    for v in variants:
        row: dict[str, Any] = {
            "variant": "__".join(p for p in (v.prompt_id, v.suffix) if p),
            "source": v.source_text,
            "target": v.target_text,
            "strength": v.strength,
            "tau": v.tau,
        }
        expected = {} if v.omega is not None else expected_of(v.source_text, v.target_text)
        row["expected"] = expected
        try:
            kept = kept_channels(processor, v)
            off = replace(v, tau=0.0)
            row["tau0"] = edit_scores(processor, classifier, off, rows, before, expected)
            row["tau_run"] = edit_scores(processor, classifier, v, rows, before, expected)
        except ed.PromptError as exc:
            out.append({**row, "error": str(exc)})
            continue
        row["kept_channels"], row["kept_fraction"] = int(kept.sum()), float(kept.float().mean())
        if owners is not None:
            kept_owners = [o for k, o in zip(kept.tolist(), owners) if k]
            row["kept_by_attribute"] = {a: kept_owners.count(a) for a in dict.fromkeys(owners)}
        row["unedited"] = nan_mean(M.oracle_scores(before, before, expected)["edit_accuracy"])
        out.append(row)
    return out


def nan_mean(x: Tensor) -> float:
    """Mean over the non-NaN entries; NaN when there are none."""
    return float(torch.nanmean(x.float())) if len(x) and not torch.isnan(x).all() else math.nan


# --- 3. output ------------------------------------------------------------------------------------

CONDITION_COLUMNS = (
    "cos_dt_di",
    "image_direction",
    "image_direction_pres",
    "condition",
    "condition_pres",
)
CEILING_COLUMNS = (
    "values",
    "chance",
    "unedited",
    *MIXES,
    "diffusion",
    "labelled_fraction",
    "own_channel_share",
)


def tables(result: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """The analysis as tables: ``analysis_ceiling`` (per attribute), ``analysis_prompts`` (per
    variant), with labelled channels ``analysis_kept_channels`` (kept ones per attribute) and, with
    counterfactuals, ``analysis_condition`` (the mapper given Δi vs the run's condition)."""
    out = {}
    if result.get("ceiling"):
        out["analysis_ceiling"] = pd.DataFrame(
            [
                {"attribute": a, **{k: r[k] for k in CEILING_COLUMNS if k in r}}
                for a, r in result["ceiling"].items()
            ]
        )
    prompts = [p for p in result.get("prompts", []) if "error" not in p]
    if prompts:
        out["analysis_prompts"] = pd.DataFrame(
            [
                {
                    "variant": p["variant"],
                    "expected": _expected_text(p["expected"], result),
                    "kept": p["kept_channels"],
                    "kept_fraction": p["kept_fraction"],
                    "unedited": p["unedited"],
                    "acc_tau0": p["tau0"]["edit_accuracy"],
                    "pres_tau0": p["tau0"]["preservation"],
                    "acc_tau": p["tau_run"]["edit_accuracy"],
                    "pres_tau": p["tau_run"]["preservation"],
                    "tau": p["tau"],
                }
                for p in prompts
            ]
        )
        if all("kept_by_attribute" in p for p in prompts):
            out["analysis_kept_channels"] = pd.DataFrame(
                [{"variant": p["variant"], **p["kept_by_attribute"]} for p in prompts]
            )
    if result.get("condition"):
        out["analysis_condition"] = pd.DataFrame(
            [
                {
                    "variant": c["variant"],
                    "expected": _expected_text(c["expected"], result),
                    **{k: c[k] for k in CONDITION_COLUMNS},
                }
                for c in result["condition"]
            ]
        )
    return out


def _expected_text(expected: Mapping[str, int], result: Mapping[str, Any]) -> str:
    """``shape_color=red``: value names where the result has them, else label indices."""
    names = result.get("value_names", {})

    def value(a: str, v: int) -> str:
        return str(names[a][v]) if v < len(names.get(a, [])) else str(v)

    return ", ".join(f"{a}={value(a, v)}" for a, v in expected.items()) or "–"


def format_result(result: Mapping[str, Any]) -> str:
    """The tables as text, with a header line each saying what was measured on what."""
    tabs, lines = tables(result), []
    if "analysis_ceiling" in tabs:
        lines += [
            f"S-space ceiling: {result['samples']} generator samples per attribute value; "
            "accuracy = the classifier reads the target value",
            _text(tabs["analysis_ceiling"]),
            "",
        ]
    if "analysis_prompts" in tabs:
        lines += [
            f"DeltaEdit per prompt on the first {result['images']} inverted images of "
            f"{result['root']} (threshold {result['threshold']}; tau = the run's τ; "
            f"{result['conv_channels']} conv channels)",
            _text(tabs["analysis_prompts"]),
            "",
        ]
    if "analysis_kept_channels" in tabs:
        total = ", ".join(f"{a} {n}" for a, n in result["channels_per_attribute"].items())
        lines += [
            f"kept channels at the run's τ per attribute (of {total})",
            _text(tabs["analysis_kept_channels"]),
            "",
        ]
    if "analysis_condition" in tabs:
        lines += [
            f"the mapper given each counterfactual's image direction Δi vs the run's condition "
            f"({result.get('condition_kind', 'text')}), τ = 0, on the {result['samples']} samples",
            _text(tabs["analysis_condition"]),
            "",
        ]
    for p in result.get("prompts", []):
        if "error" in p:
            lines.append(f"prompt {p['variant']}: failed: {p['error']}")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines).rstrip()


def _text(df: pd.DataFrame) -> str:
    return df.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="–")


def to_markdown(result: Mapping[str, Any]) -> str:
    """analysis.md: the same tables as Markdown."""
    parts = [
        "# Edit analysis",
        "",
        f"run `{result['root']}`, config `{result['config']}`, "
        f"{result['images']} images, {result['samples']} samples per value",
        "",
    ]
    for name, df in tables(result).items():
        parts += [f"## {name}", "", _markdown(df), ""]
    parts += [f"- {n}" for n in result.get("notes", [])]
    return "\n".join(parts) + "\n"


def _markdown(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "–" if math.isnan(v) else f"{v:.3f}"
        return str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def write_outputs(out: Location, result: Mapping[str, Any]) -> dict[str, str]:
    """analysis.json (NaN written as null) and analysis.md under ``out``; returns their URIs."""
    text = json.dumps(jsonable(result), indent=1, allow_nan=False)
    out.write_bytes(JSON_FILE, text.encode())
    out.write_bytes(MD_FILE, to_markdown(result).encode())
    return {name: out.url(name) for name in (JSON_FILE, MD_FILE)}


def jsonable(value: Any) -> Any:
    """``value`` with NaN as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


REPORT_NOTE = (
    "analysis_* tables: `deltaedit analyze edits` (<root>/analysis/analysis.json, as "
    "of its last run). analysis_ceiling: per attribute, how often the classifier reads "
    "the target value when a counterfactual's conv styles (conv_only), toRGB styles "
    "(rgb_only) or whole code (full_swap) replace a sample's. analysis_prompts: "
    "DeltaEdit-G on the first images at tau 0 (mask off) and at the run's tau, with the "
    "channels the mask keeps. analysis_condition: on generator samples, mask off, the "
    "mapper given each counterfactual's own image direction (image_direction) vs the "
    "run's condition (condition: Δt, or the retrieved direction); cos_dt_di: Δt vs Δi."
)


def report_tables(root: Location) -> dict[str, pd.DataFrame]:
    """The analysis tables of a run (``<root>/analysis/analysis.json``) for the evaluate report;
    none when the analysis has not been run."""
    loc = root.child(ANALYSIS_DIR)
    if not loc.exists(JSON_FILE):
        return {}
    return tables(json.loads(loc.read_bytes(JSON_FILE)))
