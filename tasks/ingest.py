"""Ingest stage: read each catalog file, validate and normalise it to RGB at a fixed size, store as PNG.

With ``ingest.align`` set, each face is first aligned as FFHQ's were (models/face_align.py) by the
user's landmark model, loaded once per processor; its file is checked before any work
(``IngestBuilder.from_config``). Every failure is caught per sample and recorded with a readable
reason; the shard always completes.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from typing import IO, Any

from PIL import Image, ImageOps

from infra.config import ConfigError, IngestConfig, RunConfig
from infra.runtime.shards import Item, ShardSpec
from infra.runtime.stage import code_fingerprint
from infra.storage.fsio import open_uri
from infra.storage.lmdb_catalog import LmdbReader, lmdb_entry
from infra.storage.records import Sink
from infra.storage.tarstream import tar_members
from models.face_align import LandmarkError, LandmarkModel, align_face
from models.imaging import encode_image
from tasks.layout import IMAGES


class BadImage(ValueError):
    """An input that cannot become a training image; the message says why."""


def tar_member(source: str) -> tuple[str, str] | None:
    """(tar URI, member name) of a ``<tar>#<member>`` source; None for a plain file or URI."""
    if "#" in source and source.split("#", 1)[0].endswith(".tar"):
        tar_uri, member = source.split("#", 1)
        return tar_uri, member
    return None


def read_source(source: str, storage_options: dict[str, Any]) -> bytes:
    """Bytes of a file/URI, or of one member of a tar (``<tar>#<member>``: the tar read up to it)."""
    with SourceReader(storage_options) as reader:
        return reader.read(Item(source, source))


class SourceReader:
    """Reads the sources of a shard: a file whole; a tar member (``<tar>#<member>``, listed with its data
    offset and size by ``infra.storage.catalog.list_tars``) with one seek and one read from a handle opened
    once per tar, so a tar of N members costs one open and N reads, not a scan of the tar per member
    (sequential in the listing's order, which a shard keeps). A member listed without an offset is found by
    reading the tar from its start (``tarstream``)."""

    def __init__(self, storage_options: dict[str, Any]):
        self.storage_options = storage_options
        self._tars: dict[str, IO[bytes]] = {}
        self._lmdb = LmdbReader()  # <lmdb folder>#<id> sources (infra.storage.lmdb_catalog)

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, item: Item) -> bytes:
        entry = lmdb_entry(item.source)
        if entry is not None:
            return self._lmdb.read(*entry)
        where = tar_member(item.source)
        if where is None:
            with open_uri(item.source, "rb", self.storage_options) as f:
                return f.read()
        tar_uri, member = where
        f = self._tars.get(tar_uri)
        if f is None:
            f = self._tars[tar_uri] = open_uri(tar_uri, "rb", self.storage_options)
        offset, size = item.meta.get("offset"), item.meta.get("size")
        if offset is None or size is None:
            f.seek(0)
            found = next((data for name, data in tar_members(f) if name == member), None)
            if found is None:
                raise FileNotFoundError(f"no member {member!r} in {tar_uri}")
            return found
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{tar_uri} ends inside member {member!r} (changed since it was listed?)")
        return data

    def close(self) -> None:
        for f in self._tars.values():
            f.close()
        self._tars.clear()
        self._lmdb.close()


def decode(data: bytes, cfg: IngestConfig) -> tuple[Image.Image, dict[str, Any]]:
    """Decode and validate: size guards before pixels are decoded, EXIF orientation, any mode → RGB."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadImage(f"declared size too large: {exc}") from None
    except Exception as exc:
        raise BadImage(f"not a decodable image ({type(exc).__name__}: {exc})") from None
    w, h = img.size
    info = {"orig_width": w, "orig_height": h, "orig_mode": img.mode, "orig_format": img.format}
    if w * h > cfg.max_pixels:
        raise BadImage(
            f"declared size {w}x{h} exceeds the {cfg.max_pixels}-pixel limit (decompression bomb guard)"
        )
    if min(w, h) < cfg.min_side:
        raise BadImage(f"image too small: {w}x{h} (minimum side {cfg.min_side})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
        img = ImageOps.exif_transpose(img)
    except Exception as exc:
        raise BadImage(f"corrupt or truncated image data ({type(exc).__name__}: {exc})") from None
    return to_rgb(img), info


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode: alpha composited on white, 16-bit and float scaled to 8 bits, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    elif img.mode == "F":
        img = img.convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize(img: Image.Image, size: int, policy: str) -> Image.Image:
    """``fit``: keep aspect, pad to a square (DeltaEdit keeps aspect); ``center_crop``; ``none``."""
    if policy == "none":
        return img
    if policy == "center_crop":
        return ImageOps.fit(img, (size, size), Image.Resampling.LANCZOS)
    fitted = ImageOps.contain(img, (size, size), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(fitted, ((size - fitted.width) // 2, (size - fitted.height) // 2))
    return canvas


ALIGN_KEY = "ingest.align.landmarks"


@dataclass(frozen=True)
class FaceAligner:
    """``ingest.align`` loaded: the landmark model and what ``align_face`` is asked for."""

    model: LandmarkModel
    size: int
    pad: bool
    digest: str  # of the model file's bytes: a new model re-ingests (IngestBuilder.fingerprint)

    def __call__(self, img: Image.Image) -> tuple[Image.Image, dict[str, Any]]:
        """The aligned face and its record; BadImage (this sample fails) when it cannot be aligned."""
        try:
            landmarks = self.model(img)
            out, done = align_face(img, landmarks, self.size, self.pad)
        except LandmarkError as exc:
            raise BadImage(f"face alignment ({ALIGN_KEY}): {exc}") from None
        except Exception as exc:  # the user's network failed on this image
            raise BadImage(
                f"face alignment ({ALIGN_KEY}): the landmark model failed on this image "
                f"({type(exc).__name__}: {exc})"
            ) from None
        return out, done.to_dict()


def load_aligner(cfg: IngestConfig, storage_options: dict[str, Any]) -> FaceAligner | None:
    """``cfg.align``'s landmark model, or None when alignment is off; a ConfigError naming the key
    and the path when the file is missing, unreadable or not TorchScript."""
    if cfg.align is None:
        return None
    uri = cfg.align.landmarks
    try:
        with open_uri(uri, "rb", storage_options) as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(
            f"{ALIGN_KEY}: landmark model file not found: {uri} (face alignment needs your "
            "TorchScript landmark network; docs/alignment.md)"
        ) from None
    except Exception as exc:
        raise ConfigError(
            f"{ALIGN_KEY}: cannot read the landmark model {uri} ({type(exc).__name__}: {exc})"
        ) from None
    try:
        model = LandmarkModel.load(io.BytesIO(data))
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"{ALIGN_KEY}: {uri} is not a TorchScript file (save one with torch.jit.save; "
            f"{type(exc).__name__}: {first_line})"
        ) from None
    digest = hashlib.blake2b(data, digest_size=8).hexdigest()
    return FaceAligner(model, cfg.align.output_size or cfg.image_size, cfg.align.pad, digest)


@dataclass
class IngestProcessor:
    cfg: IngestConfig
    storage_options: dict[str, Any] = field(default_factory=dict)
    output_metadata: dict[str, Any] = field(default_factory=dict)
    aligner: FaceAligner | None = field(init=False, default=None)  # ingest.align, loaded once
    reuse_items = True  # records depend only on their own item (infra.runtime.stage)

    def __post_init__(self) -> None:
        self.aligner = load_aligner(self.cfg, self.storage_options)

    def __call__(self, spec: ShardSpec, sink: Sink) -> None:
        with SourceReader(self.storage_options) as reader:
            for item in spec.items:
                self.one(item, sink, reader)

    def one(self, item: Item, sink: Sink, reader: SourceReader) -> None:
        try:
            img, info = decode(reader.read(item), self.cfg)
            meta = dict(info)
            if self.aligner is not None:
                img, meta["align"] = self.aligner(img)
                info["aligned_size"] = img.width
            out = resize(img, self.cfg.image_size, self.cfg.resize)
            data = encode_image(out, self.cfg.image_format)
        except BadImage as exc:
            sink.add_failure(item.key, item.source, str(exc))
        except Exception as exc:  # unreadable object, permission error, ...: recorded, never fatal
            sink.add_failure(
                item.key, item.source, f"cannot read input ({type(exc).__name__}: {exc})"
            )
        else:
            sink.add(
                item.key,
                item.source,
                image=data,
                image_ext=self.cfg.image_format,
                sample_meta=meta,
                width=out.width,
                height=out.height,
                **info,
            )


@dataclass(frozen=True)
class IngestBuilder:
    cfg: IngestConfig
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    stage: str = IMAGES
    align_digest: str | None = None  # of ingest.align's landmark model file, when checked

    @classmethod
    def from_config(cls, cfg: RunConfig, stage: str = IMAGES) -> IngestBuilder:
        """The builder, with ``ingest.align``'s landmark model checked here, before any work."""
        aligner = load_aligner(cfg.ingest, cfg.storage_options)
        digest = aligner.digest if aligner is not None else None
        return cls(cfg.ingest, cfg.storage_options, stage, digest)

    def build(self) -> IngestProcessor:
        return IngestProcessor(self.cfg, self.storage_options)

    def fingerprint(self) -> str:
        config = self.cfg.model_dump(exclude={"source"})
        if self.cfg.align is None:
            return code_fingerprint(IngestProcessor, encode_image, config=config)
        config["align"]["model_digest"] = self.align_digest
        return code_fingerprint(IngestProcessor, encode_image, align_face, config=config)
