"""Image grids as one PNG: a row per image, a column per prompt variant (input, reconstruction, edits),
with column headers and row labels; a failed cell is grey with its error. The report embeds each grid
and writes it as ``grid_<name>.png`` for READMEs (``tasks.reporting.html``)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PAD = 4  # px between grid cells
HEADER_LINES = 2  # lines of column header text in grid_png
FAILED_GREY = (150, 150, 150)


@dataclass
class GridCell:
    image: bytes | None  # PNG bytes; None when this cell failed
    caption: str = ""
    error: str | None = None


@dataclass
class Grid:
    columns: list[str]
    rows: list[tuple[str, list[GridCell]]] = field(
        default_factory=list
    )  # (row label, one cell per column)
    titles: list[str] | None = None  # the columns' tooltips in the HTML (e.g. each prompt's text)


def _fit_text(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int, lines: int
) -> str:
    """Wrap ``text`` greedily into at most ``lines`` lines of ``width`` px, ending in "…" if cut."""
    words, out, cur = text.split(), [], ""
    for word in words:
        trial = f"{cur} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not cur:
            cur = trial
        else:
            out.append(cur)
            cur = word
    out.append(cur)
    out = [line for line in out if line] or [""]
    if len(out) > lines:
        out = out[:lines]
        out[-1] += "…"
    for i, line in enumerate(out):  # a single word can still be too wide: cut characters
        while draw.textlength(line, font=font) > width and len(line) > 1:
            line = line[:-2] + "…"
        out[i] = line
    return "\n".join(out)


def _cell_image(png: bytes, size: int) -> Image.Image:
    """Fit into size×size: nearest-neighbour upscaling by an integer factor keeps small images crisp."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    scale = size / max(img.size)
    if scale >= 1:
        k = max(1, int(scale))
        return img.resize((img.width * k, img.height * k), Image.Resampling.NEAREST)
    return img.resize(
        (max(1, round(img.width * scale)), max(1, round(img.height * scale))),
        Image.Resampling.LANCZOS,
    )


def _font(size: int = 11) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans from matplotlib's data (covers accents, dashes, most scripts); PIL's default otherwise."""
    try:
        import matplotlib

        return ImageFont.truetype(
            str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), size
        )
    except (ImportError, OSError):
        return ImageFont.load_default()


def grid_png(grid: Grid, cell_px: int = 96, label_px: int | None = None) -> bytes:
    """The grid as one PNG: column headers on top, row labels on the left, failed cells as grey boxes.

    Size: ``label_px + len(columns) * (cell_px + PAD) + PAD`` wide (``label_px`` defaults to
    ``cell_px``); each row is ``cell_px + PAD`` high, plus one text line when any cell has a caption.
    """
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(probe.textbbox((0, 0), "Ag", font=font)[3]) + 2
    label_px = cell_px if label_px is None else label_px
    has_captions = any(c.caption for _, cells in grid.rows for c in cells)
    row_h = cell_px + PAD + (line_h if has_captions else 0)
    header_h = HEADER_LINES * line_h + PAD
    width = label_px + len(grid.columns) * (cell_px + PAD) + PAD
    height = header_h + len(grid.rows) * row_h + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(grid.columns):
        x = label_px + PAD + j * (cell_px + PAD)
        draw.multiline_text(
            (x, 2),
            _fit_text(draw, name, font, cell_px, HEADER_LINES),
            fill="black",
            font=font,
            spacing=2,
        )
    for i, (label, cells) in enumerate(grid.rows):
        y = header_h + i * row_h
        max_lines = max(1, cell_px // line_h)
        draw.multiline_text(
            (2, y),
            _fit_text(draw, label, font, label_px - PAD, max_lines),
            fill="black",
            font=font,
            spacing=2,
        )
        for j in range(len(grid.columns)):
            cell = cells[j] if j < len(cells) else GridCell(None, error="missing")
            x = label_px + PAD + j * (cell_px + PAD)
            try:  # unreadable bytes are shown as a failed cell, not a failed report
                img = (
                    _cell_image(cell.image, cell_px)
                    if cell.image is not None and cell.error is None
                    else None
                )
            except Exception:
                img = None
            if img is None:
                draw.rectangle((x, y, x + cell_px - 1, y + cell_px - 1), fill=FAILED_GREY)
                tw = draw.textlength("failed", font=font)
                draw.text(
                    (x + (cell_px - tw) / 2, y + cell_px / 2 - line_h / 2),
                    "failed",
                    fill="white",
                    font=font,
                )
            else:
                canvas.paste(img, (x + (cell_px - img.width) // 2, y + (cell_px - img.height) // 2))
            if cell.caption:
                draw.text(
                    (x, y + cell_px + 1),
                    _fit_text(draw, cell.caption, font, cell_px, 1),
                    fill="black",
                    font=font,
                )
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
