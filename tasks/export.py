"""`deltaedit export`: a run's (or a bulk_edit.catalog's) edits written back as files named after the
user's own source paths, with a manifest.

The chain: edits store manifest (image_key, prompt_id, method, decoder, texts, τ, strength) and its
WebDataset images → ``image_key`` → images store manifest (``source``: the user's file URI,
``orig_width`` / ``orig_height``) and, when the evaluate flow ran, the metrics store (same key as the edit).
Each ok edit goes to::

    <DEST>/<source path relative to the catalog root, without extension>/<prompt id>__<method>[__<decoder>].<ext>

(the name is the edit key after the image key, so sweep points keep their suffix), optionally resized
back to the source's size by undoing what ingest did (``fit``: the black padding is cut off and the
content scaled back; ``center_crop``: the edited central square, scaled to the source's shorter side;
``none``: scaled to the source's size; a face aligned by ``ingest.align``: its aligned square, as
the alignment is not undone). The manifest (``manifest.csv`` or ``manifest.parquet`` in DEST)
has one row per exported file.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
from PIL import Image, ImageOps

from infra.storage.fsio import Location
from infra.storage.readers import encoded_image, iter_image_samples
from infra.storage.store import StageStore
from infra.storage.tables import STATUS_OK, table_to_parquet_bytes
from models.imaging import encode_image
from tasks.edit.processor import RECON
from tasks.layout import Stages

FORMATS = ("png", "jpg", "webp")
MANIFESTS = ("csv", "parquet")
RESIZES = ("fit", "center_crop", "none")
EDIT_COLUMNS = (
    "prompt_id",
    "method",
    "decoder",
    "source_text",
    "target_text",
    "tau",
    "strength",
    "omega",
    "channels_changed",
)
NOT_METRICS = {
    "key",
    "source",
    "status",
    "error",
    "image_key",
    "prompt_id",
    "method",
    "decoder",
    "source_text",
    "target_text",
    "terms",
    "tau",
    "strength",
    "omega",
    "channels_changed",
    "mask_fraction",
    "psnr_outside_mask",
}


class ExportError(FileNotFoundError):
    """Nothing to export (no finished edits, no images store); the message says what is missing."""


@dataclass
class ExportResult:
    written: list[dict[str, Any]] = field(default_factory=list)  # the manifest rows
    skipped: dict[str, str] = field(default_factory=dict)  # edit key -> why
    manifest: str = ""  # where the manifest went
    stage: str = ""
    catalog_root: str = ""


# --- which stores ----------------------------------------------------------------------------------


def pick_edits_stage(root: Location, stage: str | None = None) -> str:
    """``stage`` if given, else a catalog's edits when they exist, else the run's; finished shards required."""
    candidates = [stage] if stage else [Stages.of(catalog=True).edits, Stages.of().edits]
    for name in candidates:
        if StageStore(root, name).finished():
            return name
    raise ExportError(
        f"{root.uri} has no finished edits (looked for {' and '.join(candidates)}; "
        "run `deltaedit run bulk-edit` first)"
    )


def edit_rows(store: StageStore) -> list[dict[str, Any]]:
    """The ok edits of a store's finished shards (reconstructions left out), in shard and key order."""
    rows = []
    for shard in sorted(store.finished()):
        rows += [
            r
            for r in store.manifest(shard).to_pylist()
            if r["status"] == STATUS_OK and r.get("method") != RECON
        ]
    return rows


def manifest_rows(store: StageStore) -> dict[str, dict[str, Any]]:
    """key -> manifest row of every ok sample of a stage's finished shards (empty when there is none)."""
    out: dict[str, dict[str, Any]] = {}
    for shard in sorted(store.finished()):
        out.update(
            {r["key"]: r for r in store.manifest(shard).to_pylist() if r["status"] == STATUS_OK}
        )
    return out


def metric_columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The measurement columns of metrics rows (what evaluate added beyond the edit's own columns)."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(k for k in row if k not in NOT_METRICS))
    return list(names)


# --- names -----------------------------------------------------------------------------------------


def source_path(source: str) -> str:
    """A source URI as a path: ``<tar>#<member>`` becomes ``<tar without .tar>/<member>``."""
    if "#" in source and source.split("#", 1)[0].endswith(".tar"):
        tar, member = source.split("#", 1)
        return f"{tar[: -len('.tar')]}/{member}"
    return source


def catalog_root(sources: Sequence[str]) -> str:
    """The deepest folder holding every source (the folder of the catalog that was ingested)."""
    paths = [source_path(s) for s in sources]
    if not paths:
        return ""
    return (
        posixpath.commonpath([posixpath.dirname(p) or "." for p in paths])
        if len(paths) > 1
        else posixpath.dirname(paths[0])
    )


def relative_stems(sources: Sequence[str], root: str) -> dict[str, str]:
    """source -> its path relative to ``root`` without the extension; sources whose stems collide
    (``cat.png`` and ``cat.jpg``) keep their extension."""
    rel = {s: posixpath.relpath(source_path(s), root) if root else source_path(s) for s in sources}
    stems = {s: posixpath.splitext(r)[0] for s, r in rel.items()}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    return {s: stem if counts[stem] == 1 else rel[s] for s, stem in stems.items()}


def edit_name(edit_key: str, image_key: str) -> str:
    """``<prompt id>[__<sweep point>]__<method>[__<decoder>]``: the edit key after its image key."""
    return edit_key[len(image_key) + 2 :] if edit_key.startswith(image_key + "__") else edit_key


# --- pixels ----------------------------------------------------------------------------------------


def restore_size(
    image: Image.Image, width: int, height: int, policy: str
) -> tuple[Image.Image, str]:
    """The edit at the source's size, undoing ingest's ``policy``; returns it and what was done."""
    side = image.width
    if policy == "fit" and image.width == image.height:
        box = ImageOps.contain(Image.new("L", (width, height)), (side, side)).size
        left, top = (side - box[0]) // 2, (side - box[1]) // 2
        out = image.crop((left, top, left + box[0], top + box[1])).resize(
            (width, height), Image.Resampling.LANCZOS
        )
        what = "padding cut off, " if box != (side, side) else ""
        return out, f"{what}resized {side}x{side} -> {width}x{height}"
    if policy == "center_crop":
        c = min(width, height)
        return (
            image.resize((c, c), Image.Resampling.LANCZOS),
            f"central {c}x{c} square of the source (the crop cut the rest), resized {side}x{side} -> {c}x{c}",
        )
    return image.resize(
        (width, height), Image.Resampling.LANCZOS
    ), f"resized {image.width}x{image.height} -> {width}x{height}"


def encode(
    data: bytes, fmt: str, original: dict[str, Any] | None, policy: str
) -> tuple[bytes, int, int, str]:
    """The stored edit re-encoded as ``fmt`` (at the source's size when ``original`` is given)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    done = ""
    if original is not None and original.get("aligned_size"):  # ingest.align cut a face square
        side = int(original["aligned_size"])
        image, done = restore_size(image, side, side, policy)
        done += " (the face-aligned square of ingest.align; not pasted back into the source)"
    elif original is not None and original.get("orig_width") and original.get("orig_height"):
        image, done = restore_size(
            image, int(original["orig_width"]), int(original["orig_height"]), policy
        )
    return encode_image(image, fmt), image.width, image.height, done


# --- the export ------------------------------------------------------------------------------------


def export_edits(
    root: str,
    dest: str,
    *,
    stage: str | None = None,
    original_size: bool = False,
    fmt: str = "png",
    manifest: str = "csv",
    resize: str = "fit",
    root_of_catalog: str | None = None,
    storage_options: dict[str, Any] | None = None,
    dest_storage_options: dict[str, Any] | None = None,
) -> ExportResult:
    """Write every ok edit under ``root`` into ``dest`` (a folder or URI) under its source's name."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")
    if manifest not in MANIFESTS:
        raise ValueError(f"unknown manifest kind {manifest!r}; one of {MANIFESTS}")
    if resize not in RESIZES:
        raise ValueError(f"unknown resize policy {resize!r}; one of {RESIZES}")
    run = Location(root, storage_options)
    edits_stage = pick_edits_stage(run, stage)
    stages = Stages.of_edits(edits_stage)
    images_stage, metrics_stage = stages.images, stages.metrics
    edits = StageStore(run, edits_stage)
    rows = edit_rows(edits)
    if not rows:
        raise ExportError(f"{edits.loc.uri} has finished shards but no ok edits")
    images = manifest_rows(StageStore(run, images_stage))
    if not images:
        raise ExportError(
            f"{run.uri}/{images_stage} has no finished images: the edits' sources are unknown"
        )
    metrics = manifest_rows(StageStore(run, metrics_stage))
    result = ExportResult(stage=edits_stage)
    wanted = {}
    for row in rows:
        if row["image_key"] in images:
            wanted[row["key"]] = row
        else:
            result.skipped[row["key"]] = (
                f"image {row['image_key']} is not in {images_stage} (not a catalog image)"
            )
    sources = sorted({images[r["image_key"]]["source"] for r in wanted.values()})
    result.catalog_root = (
        root_of_catalog.rstrip("/") if root_of_catalog is not None else catalog_root(sources)
    )
    stems = relative_stems(sources, result.catalog_root)
    out = Location(
        dest, dest_storage_options if dest_storage_options is not None else storage_options
    )
    columns = metric_columns(metrics.get(k, {}) for k in wanted)
    for sample in iter_image_samples(edits):
        row = wanted.get(sample["__key__"])
        if row is None:
            continue
        image = images[row["image_key"]]
        data, width, height, done = encode(
            encoded_image(sample), fmt, image if original_size else None, resize
        )
        rel = f"{stems[image['source']]}/{edit_name(row['key'], row['image_key'])}.{fmt}"
        write(out, rel, data)
        scores = metrics.get(row["key"], {})
        result.written.append(
            {
                "file": rel,
                "uri": out.url(rel),
                "source": image["source"],
                "image_key": row["image_key"],
                "edit_key": row["key"],
                **{c: row.get(c) for c in EDIT_COLUMNS},
                "width": width,
                "height": height,
                "resized": done,
                **{c: scores.get(c) for c in columns},
            }
        )
    result.manifest = write_manifest(out, result.written, manifest)
    return result


def write(out: Location, rel: str, data: bytes) -> None:
    """``rel`` (with folders) inside ``out``, committed atomically by the store's opener."""
    folder, name = posixpath.split(rel)
    (out.child(*folder.split("/")) if folder else out).write_bytes(name, data)


def write_manifest(out: Location, rows: list[dict[str, Any]], kind: str) -> str:
    """``manifest.csv`` / ``manifest.parquet`` of the exported files; returns its URI."""
    table = pa.Table.from_pylist(rows) if rows else pa.table({"file": pa.array([], pa.string())})
    if kind == "parquet":
        data = table_to_parquet_bytes(table)
    else:
        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        data = buf.getvalue()
    out.write_bytes(f"manifest.{kind}", data)
    return out.url(f"manifest.{kind}")
