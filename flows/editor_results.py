"""What `Editor.edit` returns (per input, per edit) and how the CLI writes it out."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from tasks.edit.processor import GENERATOR


@dataclass
class InputReport:
    """One input image: where it came from and what was done to it before inversion."""

    index: int
    source: str  # the path given, or "<image N>" for an in-memory image
    error: str | None = None  # why it could not be edited (then every edit of it failed)
    original_size: tuple[int, int] | None = None  # (width, height) as read
    size: tuple[int, int] | None = None  # (width, height) the pipeline inverted
    done: str = ""  # in words: resized, padded, cropped
    content_box: tuple[float, float, float, float] | None = None  # (left, top, right, bottom) of
    # the picture inside the frame, as fractions of its side
    inversion_psnr: float | None = None  # dB, G(s) against the resized input
    reconstruction: Image.Image | None = None  # G(s) (bulk_edit.reconstruction)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Edit:
    """One edit: an input × a prompt × a method × a decoder, and what was done."""

    image_index: int
    prompt_index: int
    source: str  # the input (path or "<image N>")
    prompt: str  # "source -> target" (terms joined with " + ")
    method: str
    decoder: str
    image: Image.Image | None = None  # the edited image, at the generator's resolution
    error: str | None = None
    tau: float | None = None  # relevance threshold applied (None: none: StyleCLIP-GD)
    strength: float | None = None
    channels_changed: int | None = None  # conv style channels the edit moved
    seconds: float = 0.0  # the edit stage's time for its shard, shared equally by
    # its items (a diffusion decode costs far more than G's)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able description (no image)."""
        return {k: v for k, v in self.__dict__.items() if k != "image"}


@dataclass
class EditResult:
    """``edits`` in the order images × prompts × methods × decoders; ``images`` alike (None where
    the edit failed)."""

    edits: list[Edit]
    inputs: list[InputReport]
    timings: dict[str, float]  # seconds per stage of this call, and in total
    requirements: str  # what the generator needs of an input, in words
    seed: int = 0

    @property
    def images(self) -> list[Image.Image | None]:
        return [e.image for e in self.edits]

    @property
    def failures(self) -> list[Edit]:
        return [e for e in self.edits if not e.ok]


def save_edits(
    result: EditResult, out: str | Path, reconstructions: bool = False, image_format: str = "png"
) -> dict[int, Path]:
    """Write each ok edit as ``<out>/<input stem>__<target>__<method>[__<decoder>].<ext>`` and
    ``edits.json`` (every edit, failed ones with their error); returns edit index → path.

    Input stems repeated (``a/x.png``, ``b/x.png``) get ``-<n>``; so do targets repeated among
    prompts. With ``reconstructions``, also ``<stem>__recon.<ext>`` (G(s): the inversion).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stems = unique_names(
        [
            slug(Path(r.source).stem if not r.source.startswith("<") else f"image{r.index}")
            for r in result.inputs
        ]
    )
    prompts = dict(sorted({e.prompt_index: e.prompt for e in result.edits}.items()))
    targets = dict(
        zip(prompts, unique_names([slug(p.split(" -> ", 1)[-1]) for p in prompts.values()]))
    )
    paths: dict[int, Path] = {}
    rows = []
    for n, e in enumerate(result.edits):
        parts = [stems[e.image_index], targets[e.prompt_index], e.method]
        if e.decoder != GENERATOR:
            parts.append(e.decoder)
        row = {**e.to_dict(), "input": result.inputs[e.image_index].source, "output": None}
        if e.image is not None:
            paths[n] = out / f"{'__'.join(parts)}.{image_format}"
            e.image.save(paths[n])
            row["output"] = str(paths[n])
        rows.append(row)
    if reconstructions:
        for r in result.inputs:
            if r.reconstruction is not None:
                r.reconstruction.save(out / f"{stems[r.index]}__recon.{image_format}")
    inputs = [{k: v for k, v in r.__dict__.items() if k != "reconstruction"} for r in result.inputs]
    (out / "edits.json").write_text(
        json.dumps(
            {
                "requirements": result.requirements,
                "seed": result.seed,
                "timings": result.timings,
                "inputs": inputs,
                "edits": rows,
            },
            indent=1,
            ensure_ascii=False,
            default=str,
        )
    )
    return paths


def slug(text: str) -> str:
    return re.sub(r"[^\w-]+", "_", text, flags=re.UNICODE).strip("_")[:60] or "x"


def unique_names(names: list[str]) -> list[str]:
    """Names with repeats told apart by ``-<n>`` (the first one kept as is)."""
    counts = Counter(names)
    seen: Counter[str] = Counter()
    out = []
    for name in names:
        seen[name] += 1
        out.append(name if counts[name] == 1 or seen[name] == 1 else f"{name}-{seen[name]}")
    return out
