"""Small processors and catalogs for store/flow tests."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from infra.runtime.shards import Item, ShardSpec
from infra.storage.records import Sink


def png_bytes(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_catalog(folder: Path, n: int, size: int = 24) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:03d}.png"
        path.write_bytes(png_bytes(i, size))
        paths.append(path)
    return paths


def items(n: int) -> list[Item]:
    return [Item(f"k{i:03d}", f"mem://{i}") for i in range(n)]


@dataclass
class FlakyProcessor:
    """Writes an image and a vector per item; fails the keys in ``fail`` while ``fail`` is not empty."""

    fail: set[str] = field(default_factory=set)
    calls: list[list[str]] = field(default_factory=list)
    output_metadata: dict[str, Any] = field(default_factory=lambda: {"model": "test"})

    def __call__(self, spec: ShardSpec, sink: Sink) -> None:
        self.calls.append([i.key for i in spec.items])
        for n, item in enumerate(spec.items):
            if item.key in self.fail:
                sink.add_failure(item.key, item.source, "simulated read error")
            else:
                seed = int(item.key[1:])
                sink.add(
                    item.key,
                    item.source,
                    image=png_bytes(seed),
                    image_ext="png",
                    sample_meta={"seed": seed},
                    vectors={"emb": np.full(4, seed, np.float32)},
                    width=8,
                )
