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
) -> dict[str, R.Grid]:
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
            cells = [R.GridCell(inputs.get(key)), R.GridCell(pictures.get(recon_key(key, decoder)))]
            cells += [
                R.GridCell(
                    pictures.get(edit_of.get((key, v))),
                    error=None if edit_of.get((key, v)) in pictures else "failed",
                )
                for v in variants
            ]
            grid_rows.append((key[:18], cells))
        out[method] = R.Grid(["input", "reconstruction", *variants], grid_rows)
    return out


def _pngs(store: StageStore, shards: list[str], wanted: set[str]) -> dict[str, bytes]:
    """Encoded images by key (any format: the grid decodes them with PIL)."""
    return {
        s["__key__"]: encoded_image(s)
        for s in iter_image_samples(store, shards)
        if s["__key__"] in wanted
    }


def plots(tabs: dict[str, pd.DataFrame]) -> dict[str, str]:
    by_method, by_prompt = tabs["by_method"], tabs["by_prompt"]
    out = {}
    for metric in ("edit_accuracy", "preservation", "clip_direction"):
        if metric in by_method.columns:
            out[f"{metric} per method"] = R.bar_plot_svg(by_method, "method", metric, title=metric)
            out[f"{metric} per prompt"] = R.bar_plot_svg(
                by_prompt, "variant", metric, hue="method", title=f"{metric} per prompt"
            )
    if {"edit_accuracy", "preservation"} <= set(by_prompt.columns):
        out["accuracy vs preservation"] = R.scatter_plot_svg(
            by_prompt, "preservation", "edit_accuracy", hue="method", title="per prompt"
        )
    return out


def labelled(
    tabs: dict[str, pd.DataFrame], comparable: Sequence[str] = ()
) -> dict[str, pd.DataFrame]:
    """The tables with headers saying what each metric is measured against, † on ``comparable``."""
    edits = {c: label + (TAB1_MARK if c in comparable else "") for c, label in EDIT_LABELS.items()}
    labels = {"by_method": edits, "by_prompt": edits, "reconstruction": RECON_LABELS}
    return {name: df.rename(columns=labels.get(name, {})) for name, df in tabs.items()}


def write(
    out: Location,
    tabs: dict[str, pd.DataFrame],
    grid: dict[str, R.Grid],
    summary: dict[str, str],
    notes: list[str],
    comparable: Sequence[str] = (),
) -> str:
    """Parquet tables (plain column names) + index.html (``labelled`` headers) + grid PNGs under
    ``out``; returns the report's URI."""
    for name, df in tabs.items():
        out.write_bytes(f"{name}.parquet", _parquet(df))
    return R.write_report(
        out,
        title="DeltaEdit evaluation",
        summary=summary,
        tables=labelled(tabs, comparable),
        grids=grid,
        plots=plots(tabs),
        notes=notes,
    )


def _parquet(df: pd.DataFrame) -> bytes:
    import io

    buf = io.BytesIO()
    df.astype({c: str for c in df.columns if df[c].dtype == object}).to_parquet(buf, index=False)
    return buf.getvalue()
