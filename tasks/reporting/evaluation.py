"""From the metrics store to tables, FID/KID per prompt, image grids and the HTML report.

Tables (also written as Parquet next to the report):
- ``by_method``: every metric averaged per method over all its edits, with FID/KID of all its edits
  against the inputs — the report's headline, DeltaEdit next to its baselines at fixed settings; a method
  decoded by the diffusion decoder is its own row, ``<method>+diffusion`` (DeltaEdit-D) or
  ``<method>+diffusion_masked`` (mask-guided), with the PSNR outside the edit mask of both;
- ``by_prompt``: the same per (method, prompt variant);
- ``reconstruction``: per decoder, the reconstruction's fidelity against the input x — G(E(x)) for
  DeltaEdit-G, the DDIM encode → decode under s for DeltaEdit-D (the paper's Table 3).

The HTML headers say what each number is measured against (``vs recon``: the reconstruction by the same
decoder; ``vs input``: the input photo) and mark with † the columns measured as the paper's Tab. 1
measures them (``tab1_columns``); the Parquet tables keep the plain column names.

The page answers what a reader asks, in that order: did the edits land and which method is best
(``lead``; ``headline``: by_method on its side, rounded, the best of each row in bold, each metric
explained in a line, ``METRICS``), what the edits look like (the grids), per prompt (``plots``: edit
accuracy against its unedited level, accuracy against preservation), then every table folded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from infra.storage.fsio import Location
from infra.storage.readers import encoded_image, iter_image_samples
from infra.storage.store import StageStore
from infra.storage.tables import column_to_numpy
from models import metrics as M
from tasks.edit.processor import GENERATOR, RECON, recon_key
from tasks.reporting import html as R
from tasks.reporting.grid_image import Grid, GridCell
from tasks.reporting.plots import hbar_plot_svg, scatter_plot_svg

HEADLINE = [
    "n",
    "edit_accuracy",
    "unedited_accuracy",
    "preservation",
    "clip_direction",
    "psnr",
    "ssim",
    "psnr_input",
    "ssim_input",
    "lpips",
    "identity",
    "fid",
    "kid",
    "channels_changed",
    "psnr_outside_mask",
    "mask_fraction",
]


# What each column of by_method / by_prompt is measured against, and of the reconstruction table.
EDIT_LABELS = {
    "psnr": "psnr vs recon",
    "ssim": "ssim vs recon",
    "psnr_input": "psnr vs input",
    "ssim_input": "ssim vs input",
    "lpips": "lpips vs recon",
    "identity": "identity vs input",
    "fid": "fid vs inputs",
    "kid": "kid vs inputs",
}
RECON_LABELS = {
    "psnr": "psnr vs input",
    "ssim": "ssim vs input",
    "mse": "mse vs input",
    "lpips": "lpips vs input",
}
TAB1_MARK = " †"
# docs/paper-setting.md, "Reported in the paper"
TAB1_REFERENCE = (
    "DeltaEdit-G FID 10.29 / PSNR 22.92 / IDS 0.90; DeltaEdit-D FID 9.36 / PSNR 23.51 / IDS 0.93"
)


def _pct(v: float) -> str:
    return f"{100 * float(v):.1f} %"


def _fixed(decimals: int):
    return lambda v: f"{float(v):.{decimals}f}"


# The headline's rows, in order: column, label (EDIT_LABELS where it says what the number is measured
# against), one line on what it is, which way is better (None: not ranked), how it is shown.
METRICS = [
    ("n", "edits", "edits measured (a +diffusion method decodes only some images)", None, None),
    (
        "edit_accuracy",
        "edit accuracy",
        "share of edits in which the attribute oracle reads every attribute the prompt asks for",
        "higher",
        _pct,
    ),
    (
        "unedited_accuracy",
        "unedited level",
        "the same read on the unedited reconstruction: what edit accuracy must beat",
        None,
        _pct,
    ),
    (
        "preservation",
        "preservation",
        "share of the other attributes the oracle reads as before the edit",
        "higher",
        _pct,
    ),
    (
        "clip_direction",
        "CLIP direction",
        "cosine between the image's change and the text's change in CLIP space",
        "higher",
        _fixed(3),
    ),
    ("psnr", None, "PSNR in dB: how little else the edit changed", "higher", _fixed(2)),
    ("ssim", None, "structural similarity (1: identical)", "higher", _fixed(3)),
    ("psnr_input", None, "PSNR in dB: inversion and edit together", "higher", _fixed(2)),
    ("ssim_input", None, "structural similarity, inversion and edit together", "higher", _fixed(3)),
    ("lpips", None, "perceptual distance (0: identical)", "lower", _fixed(3)),
    ("identity", None, "cosine of face-identity embeddings of edit and input", "higher", _fixed(3)),
    (
        "fid",
        None,
        "Fréchet distance between the edits' and the inputs' feature statistics",
        "lower",
        None,
    ),
    ("kid", None, "kernel distance, the same comparison, unbiased on small sets", "lower", None),
    (
        "channels_changed",
        "channels changed",
        "style channels the edit moves (fewer: a more local edit)",
        None,
        _fixed(1),
    ),
    (
        "psnr_outside_mask",
        "psnr outside mask",
        "PSNR in dB against the diffusion reconstruction outside the edit mask",
        "higher",
        _fixed(2),
    ),
    ("mask_fraction", "mask fraction", "share of the image inside the edit mask", None, _pct),
]
# Plain names for the other columns of by_method / by_prompt in the HTML.
PLAIN_LABELS = {c: label for c, label, *_ in METRICS if label and c not in EDIT_LABELS}
TABLE_CAPTIONS = {
    "by_method": "every metric per method, unrounded (the headline's numbers)",
    "by_prompt": "every metric per method and prompt",
    "reconstruction": "the inversion alone: each decoder's reconstruction against the input",
}
PLOT_CAPTIONS = {
    "edit accuracy per prompt": "Bars: the share of edits in which the oracle reads the prompt's "
    "target; black tick: the same on the unedited images, the level an edit must beat. "
    "Interpolations have no target and are left out.",
    "accuracy vs preservation": "One point per prompt and method: up is a stronger edit, right "
    "keeps more of the rest; the top right corner is best.",
    "CLIP direction per prompt": "The cosine between the image's change and the text's change in "
    "CLIP space, per prompt and method (no attribute oracle configured: no edit accuracy).",
}


def tab1_columns(features: str, identity: str | None) -> list[str]:
    """The columns measured as DeltaEdit's Tab. 1 (FID, PSNR, IDS) measures them: PSNR of the edit
    against the input; FID on the TF Inception's pool3 features (``features == "inception"``); IDS the
    cosine of ArcFace IR-SE-50 embeddings (``identity == "arcface_ir_se50"``)."""
    return (
        ["psnr_input"]
        + (["fid"] if features == "inception" else [])
        + (["identity"] if identity == "arcface_ir_se50" else [])
    )


def tab1_note(features: str, identity: str | None) -> str:
    """The report's footnote to the † columns, with why the others are not comparable here."""
    marked = ", ".join(EDIT_LABELS[c] for c in tab1_columns(features, identity))
    off = []
    if features != "inception":
        off.append(
            "FID/KID use the run's CLIP features, not Inception (evaluate.inception_weights)"
        )
    if identity is None:
        off.append("no identity network (evaluate.identity_model: e4e's model_ir_se50.pth)")
    elif identity != "arcface_ir_se50":
        off.append(f"identity uses a {identity} network, not ArcFace IR-SE-50")
    return (
        f"† measured as the paper's Tab. 1 (FID, PSNR, IDS against the input images): {marked}. "
        f"The paper reports {TAB1_REFERENCE}; the numbers compare when the test images, their "
        "resolution and the models are the paper's too (docs/paper-setting.md). "
        "Not comparable here: " + ("; ".join(off) if off else "none") + ". "
        "ssim vs input is measured the same way, but Tab. 1 has no SSIM; the vs recon columns "
        "measure the edit alone (without the inversion's error)."
    )


def method_label(method: str, decoder: str) -> str:
    """How the report names a method decoded by ``decoder``: ``deltaedit`` (G), ``deltaedit+diffusion``."""
    return method if decoder == GENERATOR or method == RECON else f"{method}+{decoder}"


def load_metrics(
    store: StageStore, shards: Sequence[str] | None = None
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Manifest rows of the finished metrics shards (all, or ``shards``; ok rows only; ``method`` named by
    ``method_label``) and their two feature matrices, aligned."""
    done = set(store.finished())
    shards = sorted(done if shards is None else done & set(shards))
    if not shards:
        raise FileNotFoundError(f"no finished shards under {store.loc.uri}")
    manifest = pa.concat_tables(
        [store.manifest(s) for s in shards], promote_options="default"
    ).to_pandas()
    vectors = pa.concat_tables(
        [store.vectors(s) for s in shards if store.loc.exists(f"{s}.parquet")]
    )
    order = {k: n for n, k in enumerate(vectors.column("key").to_pylist())}
    rows = manifest[manifest["status"] == "ok"].reset_index(drop=True)
    rows["method"] = [method_label(m, d) for m, d in zip(rows["method"], rows["decoder"])]
    index = [order[k] for k in rows["key"]]
    return (
        rows,
        column_to_numpy(vectors, "features")[index],
        column_to_numpy(vectors, "input_features")[index],
    )


def distances(
    rows: pd.DataFrame, feats: np.ndarray, feats_in: np.ndarray, by: Sequence[str]
) -> pd.DataFrame:
    """FID and KID of each group's edits against the inputs of the same images (NaN under 2 rows)."""
    out = []
    for keys, group in rows.groupby(list(by), sort=True):
        idx = group.index.to_numpy()
        _, first = np.unique(group["image_key"].to_numpy(), return_index=True)
        real, fake = feats_in[idx[first]], feats[idx]
        fid = kid = float("nan")
        if len(real) >= 2 and len(fake) >= 2:
            import torch

            fid = M.frechet_distance(torch.from_numpy(real), torch.from_numpy(fake))
            kid = M.kernel_distance(torch.from_numpy(real), torch.from_numpy(fake))
        out.append(
            {**dict(zip(by, keys if isinstance(keys, tuple) else (keys,))), "fid": fid, "kid": kid}
        )
    return pd.DataFrame(out)


def tables(rows: pd.DataFrame, feats: np.ndarray, feats_in: np.ndarray) -> dict[str, pd.DataFrame]:
    edits = rows[rows["method"] != RECON]
    recon = rows[rows["method"] == RECON]
    numeric = [c for c in HEADLINE if c in edits.columns and c not in ("n", "fid", "kid")]
    by_method = M.summarize(edits[["method", *numeric]], ["method"], overall=None)
    by_method = by_method.merge(distances(edits, feats, feats_in, ["method"]), on="method")
    by_prompt = M.summarize(
        edits[["method", "variant", *numeric]], ["method", "variant"], overall=None
    )
    by_prompt = by_prompt.merge(
        distances(edits, feats, feats_in, ["method", "variant"]), on=["method", "variant"]
    )
    texts = edits.groupby("variant").first()
    by_prompt.insert(
        2, "prompt", by_prompt["variant"].map(texts["source_text"] + " → " + texts["target_text"])
    )
    fidelity = [
        c for c in ("psnr", "ssim", "mse", "lpips", "preservation") if recon[c].notna().any()
    ]
    reconstruction = recon.groupby("decoder")[fidelity].agg(["mean", "count"])
    reconstruction.columns = [c if stat == "mean" else "n" for c, stat in reconstruction.columns]
    reconstruction = (
        reconstruction.loc[:, ~reconstruction.columns.duplicated()]
        .reset_index()
        .rename(columns={"preservation": "oracle_agreement"})
    )
    return {
        "by_method": _columns(by_method),
        "by_prompt": _columns(by_prompt),
        "reconstruction": reconstruction,
    }


def _columns(df: pd.DataFrame) -> pd.DataFrame:
    """Key columns first, then the headline metrics that have any value."""
    keys = [c for c in ("method", "variant", "prompt") if c in df.columns]
    metrics = [c for c in HEADLINE if c in df.columns and df[c].notna().any()]
    return df[keys + metrics]


def grids(
    rows: pd.DataFrame, edits: StageStore, images: StageStore, n_images: int
) -> dict[str, Grid]:
    """One grid per method: input | reconstruction | one column per prompt variant, for the first
    ``n_images`` images the method edited (a decoder may edit only some of them)."""
    methods = [m for m in rows["method"].unique() if m != RECON]
    keys = {
        m: sorted(rows.loc[rows["method"] == m, "image_key"].unique())[:n_images] for m in methods
    }
    chosen = rows[rows["image_key"].isin({k for ks in keys.values() for k in ks})]
    shards = sorted(set(chosen["source"].str.split("/").str[-1]))
    pictures = _pngs(edits, shards, set(chosen["key"]))
    inputs = _pngs(images, sorted({s.rsplit("-", 1)[0] for s in shards}), set(chosen["image_key"]))
    out = {}
    for method in methods:
        mine = chosen[chosen["method"] == method]
        decoder, variants = mine["decoder"].iloc[0], list(dict.fromkeys(mine["variant"]))
        edit_of = dict(zip(zip(mine["image_key"], mine["variant"]), mine["key"]))
        grid_rows = []
        for key in keys[method]:
            cells = [GridCell(inputs.get(key)), GridCell(pictures.get(recon_key(key, decoder)))]
            cells += [
                GridCell(
                    pictures.get(edit_of.get((key, v))),
                    error=None if edit_of.get((key, v)) in pictures else "failed",
                )
                for v in variants
            ]
            grid_rows.append((key[:18], cells))
        texts = dict(
            zip(
                mine["variant"],
                mine["source_text"].astype(str) + " → " + mine["target_text"].astype(str),
            )
        )
        out[method] = Grid(
            ["input", "reconstruction", *variants],
            grid_rows,
            titles=["the input image", f"its reconstruction ({decoder})"]
            + [texts[v] for v in variants],
        )
    return out


def _pngs(store: StageStore, shards: list[str], wanted: set[str]) -> dict[str, bytes]:
    """Encoded images by key (any format: the grid decodes them with PIL)."""
    return {
        s["__key__"]: encoded_image(s)
        for s in iter_image_samples(store, shards)
        if s["__key__"] in wanted
    }


def plots(tabs: dict[str, pd.DataFrame]) -> dict[str, str]:
    """Per prompt: edit accuracy against its unedited level (or CLIP direction without an oracle),
    and accuracy against preservation."""
    by_prompt = tabs["by_prompt"]
    texts = by_prompt["prompt"] if "prompt" in by_prompt.columns else by_prompt["variant"]
    names = {
        v: f"{v}: {p}" if isinstance(p, str) and p != v else v
        for v, p in zip(by_prompt["variant"].astype(str), texts)
    }
    out = {}
    if "edit_accuracy" in by_prompt.columns:
        scored = by_prompt[by_prompt["edit_accuracy"].notna()]
        out["edit accuracy per prompt"] = hbar_plot_svg(
            scored,
            "variant",
            "edit_accuracy",
            hue="method",
            reference="unedited_accuracy" if "unedited_accuracy" in scored.columns else None,
            reference_label="unedited level",
            labels=names,
            xlabel="edit accuracy",
            percent=True,
        )
        if "preservation" in by_prompt.columns:
            out["accuracy vs preservation"] = scatter_plot_svg(
                scored,
                "preservation",
                "edit_accuracy",
                hue="method",
                xlabel="preservation (other attributes kept)",
                ylabel="edit accuracy",
            )
    elif "clip_direction" in by_prompt.columns:
        out["CLIP direction per prompt"] = hbar_plot_svg(
            by_prompt,
            "variant",
            "clip_direction",
            hue="method",
            labels=names,
            xlabel="CLIP direction",
        )
    return out


def _label(column: str, comparable: Sequence[str]) -> str:
    label = EDIT_LABELS.get(column) or PLAIN_LABELS.get(column) or column
    return label + (TAB1_MARK if column in comparable else "")


def headline(by_method: pd.DataFrame, comparable: Sequence[str] = ()) -> R.Headline:
    """by_method turned on its side: one column per method, one row per metric with a line on what it
    is, rounded, the best of each ranked row in bold."""
    rows = [
        R.Metric(c, _label(c, comparable), explain, better, fmt)
        for c, _, explain, better, fmt in METRICS
        if c in by_method.columns and by_method[c].notna().any()
    ]
    marked = [c for c in comparable if c in by_method.columns]
    return R.Headline(
        by_method,
        "method",
        rows,
        title="Which method is best",
        caption="Means over each method's edits (FID and KID: over all of them at once); "
        "vs recon: against the reconstruction by the same decoder, the edit alone; vs input: "
        "against the input photo, inversion and edit together. ↑ higher is better, ↓ lower is "
        "better; the best of each such row in bold.",
        footnote="† measured as the paper's Tab. 1 (see Notes)." if marked else "",
    )


def lead(
    tabs: dict[str, pd.DataFrame], n_images: int, comparable: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """The report's first lines: did the edits land, which method is best, what they look like."""
    by_method = tabs["by_method"].set_index("method")
    out = []

    def span(column: str, fmt) -> str:
        values = by_method[column].dropna()
        lo, hi = fmt(values.min()), fmt(values.max())
        return lo if lo == hi else f"{lo}–{hi}".replace(" %–", "–")

    if "edit_accuracy" in by_method.columns and by_method["edit_accuracy"].notna().any():
        text = f"The attribute oracle reads the prompt's target in {span('edit_accuracy', _pct)}"
        text += " of the edits" + (" (by method)" if len(by_method) > 1 else "")
        if "unedited_accuracy" in by_method.columns:
            text += f", against {span('unedited_accuracy', _pct)} on the unedited images"
        if "preservation" in by_method.columns:
            text += f"; the other attributes stay as they were in {span('preservation', _pct)}"
        out.append(("Did the edits land?", text + "."))
    elif "clip_direction" in by_method.columns:
        out.append(
            (
                "Did the edits land?",
                f"CLIP direction (0: no change along the text, 1: all of it) is "
                f"{span('clip_direction', _fixed(3))}; no attribute oracle is configured, so edit "
                "accuracy is not measured.",
            )
        )
    if len(by_method) > 1:
        best = []
        for c, _, _, better, fmt in METRICS:
            if better and c in by_method.columns and by_method[c].notna().any():
                if c in ("psnr", "ssim", "ssim_input", "kid", "psnr_outside_mask"):
                    continue  # the headline has them; the lead names the ones a reader asks about
                values = by_method[c].dropna()
                show = fmt or R.number_formatter(values.tolist(), 3)
                top = show(values.max() if better == "higher" else values.min())
                leaders = [m for m, v in values.items() if show(v) == top]
                if len(leaders) == len(values):
                    continue  # all alike as shown: nobody is best at it
                word = "highest" if better == "higher" else "lowest"
                word = word if best else word.capitalize()
                best.append(f"{word} {_label(c, comparable)}: {', '.join(leaders)} ({top})")
        if best:
            out.append(("Which method is best?", "; ".join(best) + "."))
    if n_images:
        out.append(
            (
                "What do they look like?",
                f"The grids below show {n_images} images per method: the input, its "
                "reconstruction, then one column per prompt.",
            )
        )
    return out


def labelled(
    tabs: dict[str, pd.DataFrame], comparable: Sequence[str] = ()
) -> dict[str, pd.DataFrame]:
    """The tables with headers saying what each metric is measured against, † on ``comparable``;
    by_method / by_prompt's other metric columns in plain words (``PLAIN_LABELS``)."""
    edits = {c: label + (TAB1_MARK if c in comparable else "") for c, label in EDIT_LABELS.items()}
    edits.update(PLAIN_LABELS)
    labels = {"by_method": edits, "by_prompt": edits, "reconstruction": RECON_LABELS}
    return {name: df.rename(columns=labels.get(name, {})) for name, df in tabs.items()}


def write(
    out: Location,
    tabs: dict[str, pd.DataFrame],
    grid: dict[str, Grid],
    summary: dict[str, str],
    notes: list[str],
    comparable: Sequence[str] = (),
) -> str:
    """Parquet tables (plain column names) + index.html + grid PNGs under ``out``; returns the
    report's URI. The page leads with what a reader asks (``lead``), the ``headline`` per method and
    the grids, then the per-prompt plots; every table (``labelled`` headers) folded below."""
    for name, df in tabs.items():
        out.write_bytes(f"{name}.parquet", _parquet(df))
    shown = labelled(tabs, comparable)
    tips = {
        _label(c, comparable): f"{c}: {explain}" for c, _, explain, *_ in METRICS if c not in ("n",)
    }
    n_images = max((len(g.rows) for g in grid.values()), default=0)
    has_methods = "by_method" in tabs and "method" in tabs["by_method"].columns
    subtitle = " · ".join(
        f"{k} {summary[k]}" for k in ("run", "edits", "methods") if summary.get(k)
    )
    return R.write_report(
        out,
        title="DeltaEdit evaluation",
        subtitle=subtitle,
        lead=lead(tabs, n_images, comparable) if has_methods else [],
        headline=headline(tabs["by_method"], comparable) if has_methods else None,
        summary=summary,
        tables=shown,
        grids=grid,
        plots=plots(tabs) if "by_prompt" in tabs and "variant" in tabs["by_prompt"] else {},
        notes=notes,
        captions={
            **TABLE_CAPTIONS,
            **PLOT_CAPTIONS,
            **{name: _grid_caption(g) for name, g in grid.items()},
            **{
                n: "from `deltaedit analyze edits` (Notes)"
                for n in tabs
                if n.startswith("analysis")
            },
        },
        headings={
            "grids": "What the edits look like",
            "plots": "Per prompt",
            "tables": "All numbers",
            "summary": "Run",
        },
        titles=tips,
    )


def _grid_caption(grid: Grid) -> str:
    return (
        f"{len(grid.rows)} images; the input, its reconstruction by the method's decoder, then one "
        f"column per prompt ({len(grid.columns) - 2}; a header shows its prompt on hover"
        + ("; the box scrolls sideways)." if len(grid.columns) > 10 else ").")
    )


def _parquet(df: pd.DataFrame) -> bytes:
    import io

    buf = io.BytesIO()
    df.astype({c: str for c in df.columns if df[c].dtype == object}).to_parquet(buf, index=False)
    return buf.getvalue()
