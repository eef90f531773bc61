"""A tiny model zoo (random weights, our safetensors format) and catalogs of good and bad images."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from helpers_models import TINY_E, TINY_G
from PIL import Image

from models.clip import ClipEncoder
from models.e4e import Encoder
from models.stylegan2 import Generator

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_zoo(folder: Path, seed: int = 0) -> list[str]:
    """Save a tiny generator, a paired e4e-style encoder and a tiny CLIP; return config overrides."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = Generator(**TINY_G)
    enc = Encoder(**TINY_E, generator=gen)
    clip = ClipEncoder.load("tiny", model_config=TINY_CLIP)
    gen.save(str(folder / "g.safetensors"))
    enc.save(str(folder / "e.safetensors"))
    clip.save(str(folder / "clip.safetensors"))
    return [
        f"models.generator={{name: stylegan2, checkpoint: {folder / 'g.safetensors'}}}",
        f"models.encoder={{name: e4e, checkpoint: {folder / 'e.safetensors'}}}",
        f"models.clip={{name: open_clip, checkpoint: {folder / 'clip.safetensors'}}}",
    ]


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _huge_png() -> bytes:
    """A valid PNG whose header declares 100000 × 100000 pixels (a decompression bomb)."""
    data = bytearray(_png(np.zeros((4, 4, 3), np.uint8)))
    ihdr = struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def bad_catalog(folder: Path) -> dict[str, str]:
    """Files of every awkward kind → 'ok' or 'failed', what ingest must make of each."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, format="JPEG")
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="JPEG")
    files = {
        "good.png": (_png(rgb), "ok"),
        "corrupt.png": (rng.bytes(300), "failed"),
        "truncated.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "failed"),
        "empty.png": (b"", "failed"),
        "notes.jpg": (b"this is a text file, not an image\n", "failed"),
        "one_pixel.png": (_png(np.zeros((1, 1, 3), np.uint8)), "failed"),
        "bomb.png": (_huge_png(), "failed"),
        "cmyk.jpg": (cmyk.getvalue(), "ok"),
        "sixteen_bit.png": (_png((rng.integers(0, 65535, (20, 20))).astype(np.uint16)), "ok"),
        "rgba.png": (_png(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8)), "ok"),
        "gray.png": (_png(rng.integers(0, 255, (20, 20), dtype=np.uint8)), "ok"),
        "dup/a.png": (_png(rgb), "ok"),
        "dup2/a.png": (_png(rgb[::-1].copy()), "ok"),
        "a.jpg": (jpeg.getvalue(), "ok"),
        "my.photo.v2.png": (_png(rgb), "ok"),
        "café_日本.png": (_png(rgb), "ok"),
    }
    for name, (data, _) in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return {name: expected for name, (_, expected) in files.items()}


def parquet_list(path: Path, uris: list[str]) -> None:
    pq.write_table(pa.table({"uri": uris}), path)


def store_snapshot(root: Path) -> dict[str, bytes]:
    """Every data file of a run (tars, vector and manifest Parquet) and the markers' counts."""
    snap: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if "_prefect" in rel or not path.is_file():
            continue
        if path.name.endswith(".done.json"):
            marker = json.loads(path.read_text())
            snap[rel] = json.dumps(
                [marker["counts"], marker["input_fingerprint"], marker["code_fingerprint"]]
            ).encode()
        elif path.suffix in (".tar", ".parquet"):
            snap[rel] = path.read_bytes()
    return snap


def training_overrides(
    root: Path, section: str, settings: dict[str, Any], *extra: str
) -> list[str]:
    """Overrides of a small CPU training run under ``root``: ``<section>.<key>=<value>`` per setting."""
    return [
        f"root={root}",
        "device=cpu",
        "prefect.retries=0",
        *(f"{section}.{k}={v}" for k, v in settings.items()),
        *extra,
    ]


def write_config(path: Path, overrides: list[str]) -> Path:
    """A YAML config file equal to ``key.path=value`` overrides (for runs in a subprocess)."""
    data: dict = {}
    for item in overrides:
        key, value = item.split("=", 1)
        node = data
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[key.split(".")[-1]] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(data))
    return path


def kill_after_first_shard(
    args: list[str], cwd: Path, stage_dir: Path, poll_s: float = 0.05
) -> None:
    """Run `deltaedit <args>` in its own process group and SIGKILL the whole group (driver, Ray cluster,
    Prefect server) as soon as ``stage_dir`` holds a done-marker (or after 5 minutes)."""
    cli = str(Path(sys.executable).with_name("deltaedit"))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.Popen(
        [cli, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list(stage_dir.glob("*.done.json")):
        time.sleep(poll_s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def tiny_mappers(folder: Path, clip_dim: int = TINY_CLIP["embed_dim"]) -> list[str]:
    """Seeded random Delta and straightforward mappers for TINY_G; return config overrides."""
    from models.delta_mapper import DeltaMapper, MapperConfig, StraightforwardMapper
    from models.layout import StyleLayout

    layout = StyleLayout.for_generator(TINY_G["size"], channels=TINY_G["channels"]).to_dict()
    torch.manual_seed(0)
    for name, cls in (("delta", DeltaMapper), ("straight", StraightforwardMapper)):
        mapper = cls(MapperConfig(layout=layout, clip_dim=clip_dim))
        mapper.save(str(folder / f"{name}.safetensors"))
    return [
        f"models.mapper={{name: delta_mapper, checkpoint: {folder / 'delta.safetensors'}}}",
        "bulk_edit.straightforward_mapper={name: straightforward_mapper, "
        f"checkpoint: {folder / 'straight.safetensors'}}}",
    ]


def run_directly(builder: Any, specs: list[Any], root: str) -> None:
    """Run every shard of ``specs`` through ``builder``'s processor here (no Prefect, no Ray)."""
    from infra.runtime.stage import execute_shard, open_store

    proc, code_fp = builder.build(), builder.fingerprint()
    store = open_store(root, {}, builder.stage)
    for spec in specs:
        execute_shard(proc, spec, store, code_fp)
