"""DeltaSpace analysis: are CLIP image and text features aligned, and are their *differences*?

DeltaEdit trains its mapper on image differences Δi only and feeds text differences Δt at inference.
That works only if CLIP's delta space is better aligned across modalities than CLIP space itself
(Lyu et al., "DeltaSpace", Fig. 1): image and text embeddings sit in two separate cones (the
"modality gap", Liang et al. 2022), but the difference between two images points roughly the same way
as the difference between their captions. This module measures that on paired features:

- mean paired cosine, raw (i vs t) and delta (Δi vs Δt), against a seeded shuffled-pairs baseline;
- image→text retrieval top-1 / top-5 (chance = k / rows), raw and delta;
- the modality gap: distance between the centroids of the L2-normalised image and text rows, and the
  mean cross-modal cosine over all (image, text) pairs (= dot product of those centroids);
- a two-panel PCA plot (fitted jointly on both modalities) of raw and delta space.
"""

from __future__ import annotations

import io
import json
from typing import Any, NamedTuple

import numpy as np
from matplotlib.figure import Figure

from infra.storage.fsio import Location, open_uri


class FeatureError(ValueError):
    """Bad input features; the message names the offending file or column."""


class Features(NamedTuple):
    i: np.ndarray
    t: np.ndarray
    di: np.ndarray | None = None
    dt: np.ndarray | None = None


def _open(uri: str, storage_options: dict | None):
    try:
        return open_uri(uri, "rb", storage_options)
    except FileNotFoundError:
        raise FeatureError(f"file not found: {uri}") from None


def _load_npy(uri: str, storage_options: dict | None = None) -> np.ndarray:
    with _open(uri, storage_options) as f:
        try:
            return np.load(f, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise FeatureError(f"{uri}: not a readable .npy array ({exc})") from None


def _column_matrix(table: Any, name: str, source: str) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if name not in table.column_names:
        raise FeatureError(
            f"{source}: no column {name!r} (columns: {', '.join(table.column_names)})"
        )
    col = table.column(name).combine_chunks()
    if not any(
        f(col.type) for f in (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    ):
        raise FeatureError(f"{source}: column {name!r} is {col.type}, expected a list of numbers")
    if col.null_count:
        raise FeatureError(f"{source}: column {name!r} has {col.null_count} null rows")
    lengths = np.unique(pc.list_value_length(col).to_numpy())
    if len(lengths) > 1:
        raise FeatureError(f"{source}: column {name!r} has vectors of lengths {lengths.tolist()}")
    values = col.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(col), int(lengths[0]) if len(lengths) else 0)


def _load_parquet(uri: str, columns: list[str], storage_options: dict | None) -> list[np.ndarray]:
    import pyarrow.parquet as pq

    with _open(uri, storage_options) as f:
        try:
            table = pq.read_table(f)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise FeatureError(f"{uri}: not a readable Parquet file ({exc})") from None
    return [_column_matrix(table, c, uri) for c in columns]


def _check(named: list[tuple[str, np.ndarray]]) -> None:
    """Every array 2-D, finite, ≥ 2 rows, one width; pairs (i, t) and (Δi, Δt) row-aligned. Messages
    name the offending source."""
    for src, x in named:
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise FeatureError(f"{src}: expected numbers, got dtype {x.dtype}")
        if x.ndim != 2:
            raise FeatureError(f"{src}: expected a 2-D array (rows, dim), got shape {x.shape}")
        if len(x) < 2:
            raise FeatureError(f"{src}: needs at least 2 rows, got {len(x)}")
        if not np.isfinite(x).all():
            raise FeatureError(f"{src}: contains NaN or infinite values")
    if len({x.shape[1] for _, x in named}) > 1:
        raise FeatureError(
            "feature widths differ: " + ", ".join(f"{s} has {x.shape[1]}" for s, x in named)
        )
    for (sa, a), (sb, b) in zip(named[::2], named[1::2]):
        if len(a) != len(b):
            raise FeatureError(
                f"rows differ: {sa} has {len(a)}, {sb} has {len(b)}; rows must be paired"
            )


def load_features(
    images: str | None = None,
    texts: str | None = None,
    delta_images: str | None = None,
    delta_texts: str | None = None,
    parquet: str | None = None,
    image_column: str = "image",
    text_column: str = "text",
    delta_image_column: str | None = None,
    delta_text_column: str | None = None,
    storage_options: dict | None = None,
) -> Features:
    """Paired features from .npy files (local or fsspec URIs) or from one Parquet table's vector columns.
    Deltas are optional but come both or neither."""
    if parquet and (images or texts or delta_images or delta_texts):
        raise FeatureError("give either a Parquet table or .npy files, not both")
    if parquet:
        cols = [image_column, text_column]
        if bool(delta_image_column) != bool(delta_text_column):
            raise FeatureError("give both delta columns or neither")
        cols += [delta_image_column, delta_text_column] if delta_image_column else []
        arrays = _load_parquet(parquet, cols, storage_options)
        names = [f"{parquet}[{c}]" for c in cols]
    else:
        if not (images and texts):
            raise FeatureError("need image and text features (.npy files or a Parquet table)")
        if bool(delta_images) != bool(delta_texts):
            raise FeatureError("give both delta files (images and texts) or neither")
        names = [p for p in (images, texts, delta_images, delta_texts) if p]
        arrays = [_load_npy(p, storage_options) for p in names]
    _check(list(zip(names, arrays)))
    return Features(*[a.astype(np.float32, copy=False) for a in arrays])


def random_pairs(n: int, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded row pairs (a, b) with a ≠ b, drawn uniformly as DeltaEdit draws a sample's partner."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, n_pairs)
    return a, (a + rng.integers(1, n, n_pairs)) % n


def make_deltas(
    i: np.ndarray, t: np.ndarray, n_pairs: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Δi = i[a] − i[b] and Δt = t[a] − t[b] with the same seeded pairs."""
    a, b = random_pairs(len(i), n_pairs, seed)
    return i[a] - i[b], t[a] - t[b]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation with no fixed point (one random cycle), so no shuffled row keeps its pair."""
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def retrieval(
    q: np.ndarray, k: np.ndarray, tops: tuple[int, ...] = (1, 5), chunk: int = 1024
) -> dict:
    """Row r of q should retrieve row r of k by cosine; ties count against it."""
    qn, kn, n = _unit(q), _unit(k), len(q)
    hits = dict.fromkeys(tops, 0)
    for s in range(0, n, chunk):
        sim = qn[s : s + chunk] @ kn.T
        true = sim[np.arange(len(sim)), s + np.arange(len(sim))]
        rank = (sim >= true[:, None]).sum(1) - 1
        for top in tops:
            hits[top] += int((rank < top).sum())
    out = {f"top{top}": hits[top] / n for top in tops}
    out.update({f"chance_top{top}": min(top, n) / n for top in tops})
    return out


def _space(x: np.ndarray, y: np.ndarray, seed: int) -> dict:
    xn, yn = _unit(x), _unit(y)
    cx, cy = xn.mean(0), yn.mean(0)
    return {
        "paired_cosine": float((xn * yn).sum(1).mean()),
        "shuffled_cosine": float((xn * yn[_derangement(len(y), seed)]).sum(1).mean()),
        "retrieval": retrieval(x, y),
        "modality_gap": float(np.linalg.norm(cx - cy)),
        "cross_modal_cosine": float(cx @ cy),
        "centroid_norm_image": float(np.linalg.norm(cx)),
        "centroid_norm_text": float(np.linalg.norm(cy)),
        "rows": len(x),
    }


def analyze(i: np.ndarray, t: np.ndarray, di: np.ndarray, dt: np.ndarray, seed: int = 0) -> dict:
    """The metrics of raw CLIP space (i, t) and delta space (Δi, Δt), each normalised per row."""
    return {
        "raw": _space(i, t, seed),
        "delta": _space(di, dt, seed),
        "seed": seed,
        "dim": int(i.shape[1]),
    }


def _pca2(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    both = np.concatenate([_unit(x), _unit(y)])
    both = both - both.mean(0)
    _, s, vt = np.linalg.svd(both, full_matrices=False)
    proj = both @ vt[:2].T
    return proj[: len(x)], proj[len(x) :], s[:2] ** 2 / (s**2).sum()


def plot(
    i: np.ndarray,
    t: np.ndarray,
    di: np.ndarray,
    dt: np.ndarray,
    seed: int = 0,
    max_points: int = 1000,
    title: str = "",
) -> Figure:
    """Fig. 1 of the paper: raw space (two clouds) beside delta space (overlapping), PCA per panel."""
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    rng = np.random.default_rng(seed)
    panels = [("CLIP space", i, t, "image i", "text t"), ("delta space", di, dt, "Δi", "Δt")]
    for ax, (name, x, y, lx, ly) in zip(fig.subplots(1, 2), panels):
        px, py, var = _pca2(x, y)
        keep = np.sort(rng.permutation(len(x))[:max_points])
        ax.scatter(*px[keep].T, s=5, alpha=0.5, color="tab:blue", label=lx, linewidths=0)
        ax.scatter(*py[keep].T, s=5, alpha=0.5, color="tab:orange", label=ly, linewidths=0)
        ax.set(title=name, xlabel=f"PC1 ({var[0]:.0%})", ylabel=f"PC2 ({var[1]:.0%})")
        ax.legend(loc="best", markerscale=3)
    fig.suptitle(title or "PCA of L2-normalised features, fitted jointly on both modalities")
    return fig


def write_outputs(
    out: str, result: dict, figure: Figure, storage_options: dict | None = None
) -> dict[str, str]:
    """Write deltaspace.json / .png / .svg into a folder or URI; returns their URIs."""
    loc = Location(out, storage_options)
    loc.write_bytes("deltaspace.json", json.dumps(result, indent=1).encode())
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        figure.savefig(buf, format=fmt, dpi=120, metadata={"Date": None} if fmt == "svg" else None)
        loc.write_bytes(f"deltaspace.{fmt}", buf.getvalue())
    return {name: loc.url(f"deltaspace.{name}") for name in ("json", "png", "svg")}


def format_result(result: dict) -> str:
    """A short table: raw vs delta space."""
    raw, dlt = result["raw"], result["delta"]
    rows = [
        ("paired cosine", "paired_cosine"),
        ("shuffled cosine", "shuffled_cosine"),
        ("modality gap (centroid dist.)", "modality_gap"),
        ("mean cross-modal cosine", "cross_modal_cosine"),
    ]
    lines = [f"{'':32s}{'raw (i, t)':>14s}{'delta (Δi, Δt)':>16s}"]
    lines += [f"{label:32s}{raw[key]:14.3f}{dlt[key]:16.3f}" for label, key in rows]
    for top in (1, 5):
        cells = [
            f"{s['retrieval'][f'top{top}']:.3f} ({s['retrieval'][f'chance_top{top}']:.3f})"
            for s in (raw, dlt)
        ]
        lines.append(f"{f'i→t top-{top} (chance)':32s}{cells[0]:>14s}{cells[1]:>16s}")
    lines.append(
        f"rows: raw {raw['rows']}, delta {dlt['rows']}; dim {result['dim']}; seed {result['seed']}"
    )
    return "\n".join(lines)
