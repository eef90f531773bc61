"""A static evaluation report: one self-contained ``index.html`` (images as data URIs, plots as inline
SVG, no scripts or remote assets) plus one ``grid_<name>.png`` per image grid, for READMEs."""

from __future__ import annotations

import base64
import html
import io
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from infra.storage.fsio import Location

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


def _svg(fig) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "deltaedit"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    svg = buf.getvalue()
    return svg[
        svg.index("<svg") :
    ]  # drop the XML declaration and DOCTYPE so it can sit inside HTML


def _figure(title: str):
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in worker threads

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return fig, ax


def bar_plot_svg(
    table: pd.DataFrame, x: str, y: str, hue: str | None = None, title: str = ""
) -> str:
    """Bars of ``y`` per ``x`` value (in order of appearance), grouped side by side by ``hue``; SVG text."""
    fig, ax = _figure(title)
    xs = list(dict.fromkeys(table[x].astype(str)))
    hues = list(dict.fromkeys(table[hue].astype(str))) if hue else [None]
    width = 0.8 / len(hues)
    for k, h in enumerate(hues):
        part = table if h is None else table[table[hue].astype(str) == h]
        values = part.groupby(part[x].astype(str))[y].mean()
        heights = [float(values.get(v, float("nan"))) for v in xs]
        ax.bar(
            [i + (k - (len(hues) - 1) / 2) * width for i in range(len(xs))], heights, width, label=h
        )
    ax.set_xticks(
        range(len(xs)),
        [textwrap.shorten(v, 24, placeholder="…") for v in xs],
        rotation=30 if len(xs) > 4 else 0,
        ha="right" if len(xs) > 4 else "center",
    )
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if hue:
        ax.legend(title=hue, fontsize="small")
    return _svg(fig)


def scatter_plot_svg(
    table: pd.DataFrame, x: str, y: str, hue: str | None = None, title: str = ""
) -> str:
    """``y`` against ``x``, one colour per ``hue`` value (e.g. identity vs. CLIP direction per method)."""
    fig, ax = _figure(title)
    ax.grid(axis="x", alpha=0.3)
    groups = table.groupby(table[hue].astype(str), sort=False) if hue else [(None, table)]
    for name, part in groups:
        ax.scatter(part[x], part[y], s=14, alpha=0.7, label=name)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if hue:
        ax.legend(title=hue, fontsize="small")
    return _svg(fig)


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right} th{background:#f4f4f4}
td.l,th.l{text-align:left} .grid td{text-align:center;vertical-align:top}
.grid img{width:96px;height:96px;object-fit:contain;image-rendering:pixelated}
.fail{display:inline-block;width:96px;height:96px;background:#999;color:#fff;font-size:.8em;overflow:hidden}
.cap{font-size:.75em;max-width:110px;overflow-wrap:anywhere} .plot svg{max-width:100%;height:auto}
"""


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "grid"


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(
        index=False, escape=True, float_format=lambda v: f"{v:.4g}", na_rep="–", border=0
    )


def _grid_html(grid: Grid, png_name: str) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in grid.columns)
    body = []
    for label, cells in grid.rows:
        tds = []
        for j in range(len(grid.columns)):
            cell = cells[j] if j < len(cells) else GridCell(None, error="missing")
            if cell.image is not None and cell.error is None:
                mime = Image.MIME.get(
                    Image.open(io.BytesIO(cell.image)).format or "PNG", "image/png"
                )
                uri = f"data:{mime};base64," + base64.b64encode(cell.image).decode("ascii")
                inner = f'<img src="{uri}" alt="{e(cell.caption or label)}">'
            else:
                inner = f'<span class="fail" title="{e(cell.error or "")}">failed<br>{e(cell.error or "")}</span>'
            tds.append(f'<td>{inner}<div class="cap">{e(cell.caption)}</div></td>')
        body.append(f'<tr><th class="l">{e(label)}</th>{"".join(tds)}</tr>')
    return (
        f'<table class="grid"><tr><th></th>{head}</tr>{"".join(body)}</table>'
        f'<p><a href="{e(png_name)}">{e(png_name)}</a> (the same grid as one picture)</p>'
    )


def write_report(
    out: Location,
    *,
    title: str,
    summary: dict[str, str],
    tables: dict[str, pd.DataFrame],
    grids: dict[str, Grid],
    plots: dict[str, str],
    notes: list[str],
) -> str:
    """Write ``index.html`` and ``grid_<name>.png`` per grid into ``out``; returns index.html's URI.

    Every user string is HTML-escaped; ``plots`` values are SVG text as ``bar_plot_svg`` returns it.
    """
    e = html.escape
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{e(title)}</h1>"
    ]
    if summary:
        rows = "".join(
            f'<tr><th class="l">{e(str(k))}</th><td class="l">{e(str(v))}</td></tr>'
            for k, v in summary.items()
        )
        parts.append(f"<table>{rows}</table>")
    for name, df in tables.items():
        parts.append(f"<h2>{e(name)}</h2>{_table_html(df)}")
    for name, svg in plots.items():
        parts.append(f'<h2>{e(name)}</h2><div class="plot">{svg}</div>')
    used: set[str] = set()
    for name, grid in grids.items():
        png_name = f"grid_{_slug(name)}.png"
        k = 2
        while png_name in used:  # two names that slug alike must not overwrite each other
            png_name, k = f"grid_{_slug(name)}_{k}.png", k + 1
        used.add(png_name)
        out.write_bytes(png_name, grid_png(grid))
        parts.append(f"<h2>{e(name)}</h2>{_grid_html(grid, png_name)}")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>\n")
    out.write_bytes("index.html", "\n".join(parts).encode("utf-8"))
    return out.url("index.html")
