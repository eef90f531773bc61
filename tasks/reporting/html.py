"""A static report: one self-contained ``index.html`` (images as data URIs, plots as inline SVG, no
scripts or remote assets) plus one ``grid_<name>.png`` per image grid, for READMEs.

The page reads top-down in the order a person asks: a few lead lines, a headline table (``Headline``:
one column per item, one row per metric, the best of each row in bold, each metric explained in a
line), the image grids, the plots, then every table folded (``<details>``) in a scrolling box, the
run's settings and the notes. Nothing is wider than the window at a laptop's width: wide grids and
tables scroll inside their own box (tests/test_report.py opens a report in headless Chromium).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image

from infra.storage.fsio import Location
from tasks.reporting.grid_image import Grid, GridCell, grid_png

STYLE = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;
 padding:1.5em 1.25em 3em;color:#222;line-height:1.45;overflow-wrap:break-word}
h1{font-size:1.6em;margin:.2em 0 .1em} .sub{color:#666;margin:0 0 1em}
h2{font-size:1.3em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2.2em}
h3{font-size:1.05em;margin:1.6em 0 .3em} .cap{color:#555;margin:.2em 0 .6em;max-width:60em}
.lead p{margin:.35em 0;max-width:60em}
table{border-collapse:collapse;font-size:.85em;margin:.4em 0}
th,td{border:1px solid #ddd;padding:.3em .55em;text-align:right;vertical-align:top}
th{background:#f4f4f4;font-weight:600} td{font-variant-numeric:tabular-nums;white-space:nowrap}
.t{text-align:left} td.wide{white-space:normal;min-width:16em;max-width:34em}
.scroll{overflow:auto;max-width:100%;margin:.4em 0}
.scroll.tall{max-height:70vh} .scroll thead th{position:sticky;top:0;z-index:1}
.headline{width:100%} .headline td{min-width:5.5em} .headline th.m{text-align:left;min-width:9em}
.headline td.why{white-space:normal;color:#444;min-width:16em;width:40%}
.headline td.best{font-weight:700;background:#e3f1e6} .dim{color:#666;font-weight:400}
.grid td,.grid th{text-align:center} .grid th:first-child{position:sticky;left:0;z-index:2}
.grid thead th{max-width:110px;white-space:normal;font-weight:500;font-size:.92em}
.grid img{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;display:block}
.fail{display:flex;align-items:center;justify-content:center;flex-direction:column;width:96px;
 height:96px;background:#999;color:#fff;font-size:.8em;overflow:hidden}
.gcap{font-size:.75em;max-width:100px;overflow-wrap:anywhere}
.plot svg{max-width:100%;height:auto;display:block}
details{margin:.5em 0} summary{cursor:pointer;font-weight:600} summary .dim{font-weight:400}
.run td{white-space:normal;overflow-wrap:anywhere;text-align:left}
ul.notes li{margin:.3em 0;max-width:62em}
"""


@dataclass
class Metric:
    """One row of the headline: ``column`` of the headline's table, shown as ``label``."""

    column: str
    label: str
    explain: str = ""  # one line: what the number is
    better: str | None = (
        None  # "higher" / "lower": the row's best value is marked; None: not ranked
    )
    fmt: Callable[[float], str] | None = None  # None: the row's values to 3 significant digits


@dataclass
class Headline:
    """The table a reader looks at first: one column per item (``key`` of ``table``, e.g. each method),
    one row per metric, the best value of each ranked row in bold, each metric explained in a line."""

    table: pd.DataFrame
    key: str
    metrics: list[Metric]
    title: str = "Summary"
    caption: str = ""
    footnote: str = ""


def _decimals(values, digits: int) -> int:
    """Decimals that show the column's largest magnitude with ``digits`` significant digits (0–6)."""
    finite = [abs(float(v)) for v in values if v == v and abs(float(v)) != math.inf]
    top = max(finite, default=0.0)
    if top == 0:
        return 0
    return min(6, max(0, digits - 1 - math.floor(math.log10(top))))


def number_formatter(values, digits: int = 4) -> Callable[[object], str]:
    """One format for a column: integers as integers; floats with the same decimals in every row
    (``digits`` significant for the largest), never in exponent notation; NaN as "–"."""
    values = list(values)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return lambda v: f"{int(v)}"
    finite = [float(v) for v in values if v is not None and v == v and abs(float(v)) != math.inf]
    d = 0 if finite and all(v.is_integer() for v in finite) else _decimals(values, digits)

    def fmt(v) -> str:
        if v is None or v != v:
            return "–"
        text = f"{float(v):.{d}f}"
        return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.00"

    return fmt


def _is_number(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _table_html(
    df: pd.DataFrame, titles: dict[str, str] | None = None, digits: int = 4, cls: str = ""
) -> str:
    """``df`` as an HTML table: text columns left-aligned (long ones wrap in a wide cell), numbers
    right-aligned with one format per column (``number_formatter``); ``titles``: header tooltips."""
    e, titles = html.escape, titles or {}
    head, columns = [], []
    for name in df.columns:
        col = df[name]
        if _is_number(col):
            columns.append(("n", number_formatter(col.tolist(), digits)))
            klass = ""
        else:
            wide = col.astype(str).str.len().max() > 24 if len(col) else False
            columns.append(("t wide" if wide else "t", lambda v: "–" if v is None else str(v)))
            klass = ' class="t"'
        tip = f' title="{e(titles[name])}"' if name in titles else ""
        head.append(f"<th{klass}{tip}>{e(str(name))}</th>")
    rows = []
    for values in df.itertuples(index=False):
        tds = "".join(
            f"<td>{e(f(v))}</td>" if k == "n" else f'<td class="{k}">{e(f(v))}</td>'
            for (k, f), v in zip(columns, values)
        )
        rows.append(f"<tr>{tds}</tr>")
    klass = f' class="{cls}"' if cls else ""
    return (
        f"<table{klass}><thead><tr>{''.join(head)}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _breakable(text: str) -> str:
    """Escaped ``text`` that may break after "+" or "__" (long names in narrow headers)."""
    return re.sub(r"(\+|__)", r"\1<wbr>", html.escape(text))


def _unsigned_zero(text: str) -> str:
    """ "-0.000" (a small negative rounded away) as "0.000": it ties with "0.000"."""
    return text[1:] if re.fullmatch(r"-0(\.0*)?(\s*%)?", text) else text


def headline_html(head: Headline) -> str:
    """The headline table (items as columns, metrics as rows, "what it measures" last)."""
    e = html.escape
    items = [str(v) for v in head.table[head.key]]
    cols = "".join(f"<th>{_breakable(i)}</th>" for i in items)
    rows = []
    for m in head.metrics:
        if m.column not in head.table.columns:
            continue
        values = head.table[m.column].tolist()
        fmt = m.fmt or number_formatter(values, 3)
        shown = [("–" if v is None or v != v else _unsigned_zero(fmt(v))) for v in values]
        best = set()
        finite = [(float(v), s) for v, s in zip(values, shown) if v is not None and v == v]
        if m.better in ("higher", "lower") and len({s for _, s in finite}) > 1:
            pick = max if m.better == "higher" else min
            top = pick(finite)[1]
            best = {s for _, s in finite if s == top}
        tds = "".join(
            f'<td class="best" title="best">{e(s)}</td>' if s in best else f"<td>{e(s)}</td>"
            for s in shown
        )
        arrow = {"higher": " ↑", "lower": " ↓"}.get(m.better or "", "")
        rows.append(
            f'<tr><th class="t m">{e(m.label)}{arrow}</th>{tds}'
            f'<td class="t why">{e(m.explain)}</td></tr>'
        )
    table = (
        f'<table class="headline"><thead><tr><th class="t m"></th>{cols}'
        f'<th class="t">what it measures</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )
    parts = [f"<h2>{e(head.title)}</h2>"]
    if head.caption:
        parts.append(f'<p class="cap">{e(head.caption)}</p>')
    parts.append(f'<div class="scroll">{table}</div>')
    if head.footnote:
        parts.append(f'<p class="cap">{e(head.footnote)}</p>')
    return "".join(parts)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "grid"


def _grid_html(grid: Grid, png_name: str) -> str:
    e = html.escape
    titles = grid.titles or []
    head = "".join(
        f'<th title="{e(titles[j])}">{_breakable(c)}</th>'
        if j < len(titles) and titles[j]
        else f"<th>{_breakable(c)}</th>"
        for j, c in enumerate(grid.columns)
    )
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
                err = e(cell.error or "")
                inner = f'<span class="fail" title="{err}">failed<br>{err}</span>'
            cap = f'<div class="gcap">{e(cell.caption)}</div>' if cell.caption else ""
            tds.append(f"<td>{inner}{cap}</td>")
        body.append(f'<tr><th class="t">{e(label)}</th>{"".join(tds)}</tr>')
    return (
        f'<div class="scroll"><table class="grid"><thead><tr><th></th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
        f'<p class="cap"><a href="{e(png_name)}">{e(png_name)}</a> (the same grid as one picture)</p>'
    )


HEADINGS = {
    "grids": "Images",
    "plots": "Plots",
    "tables": "Tables",
    "summary": "Run",
    "notes": "Notes",
}


def write_report(
    out: Location,
    *,
    title: str,
    summary: dict[str, str],
    tables: dict[str, pd.DataFrame],
    grids: dict[str, Grid],
    plots: dict[str, str],
    notes: list[str],
    subtitle: str = "",
    lead: Sequence[tuple[str, str]] = (),
    headline: Headline | None = None,
    captions: dict[str, str] | None = None,
    headings: dict[str, str] | None = None,
    titles: dict[str, str] | None = None,
) -> str:
    """Write ``index.html`` and ``grid_<name>.png`` per grid into ``out``; returns index.html's URI.

    In reading order: ``title``, ``subtitle``, ``lead`` (question, answer) lines, the ``headline``,
    the grids, the plots, every table folded in a scrolling box, the ``summary`` (the run's settings)
    and the notes. ``captions``: a line under a grid, plot or table of that name; ``headings``:
    section titles (``HEADINGS``' keys); ``titles``: tooltips of table headers by column name.
    Every user string is HTML-escaped; ``plots`` values are SVG text as ``bar_plot_svg`` returns it.
    """
    e, captions, heads = html.escape, captions or {}, {**HEADINGS, **(headings or {})}

    def cap(name: str) -> str:
        return f'<p class="cap">{e(captions[name])}</p>' if captions.get(name) else ""

    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{STYLE}</style></head><body><h1>{e(title)}</h1>"
    ]
    if subtitle:
        parts.append(f'<p class="sub">{e(subtitle)}</p>')
    if lead:
        parts.append(
            '<div class="lead">'
            + "".join(f"<p><strong>{e(q)}</strong> {e(a)}</p>" for q, a in lead)
            + "</div>"
        )
    if headline is not None:
        parts.append(headline_html(headline))
    used: set[str] = set()
    if grids:
        parts.append(f"<h2>{e(heads['grids'])}</h2>")
    for name, grid in grids.items():
        png_name = f"grid_{_slug(name)}.png"
        k = 2
        while png_name in used:  # two names that slug alike must not overwrite each other
            png_name, k = f"grid_{_slug(name)}_{k}.png", k + 1
        used.add(png_name)
        out.write_bytes(png_name, grid_png(grid))
        parts.append(f"<h3>{e(name)}</h3>{cap(name)}{_grid_html(grid, png_name)}")
    if plots:
        parts.append(f"<h2>{e(heads['plots'])}</h2>")
    for name, svg in plots.items():
        parts.append(f'<h3>{e(name)}</h3>{cap(name)}<div class="plot">{svg}</div>')
    if tables:
        parts.append(f"<h2>{e(heads['tables'])}</h2>")
    for name, df in tables.items():
        what = f" — {captions[name]}" if captions.get(name) else ""
        parts.append(
            f'<details><summary>{e(name)}<span class="dim">{e(what)} ({len(df)} rows)</span>'
            f'</summary><div class="scroll tall">{_table_html(df, titles)}</div></details>'
        )
    if summary:
        rows = "".join(
            f'<tr><th class="t">{e(str(k))}</th><td>{e(str(v))}</td></tr>'
            for k, v in summary.items()
        )
        parts.append(f'<h2>{e(heads["summary"])}</h2><table class="run">{rows}</table>')
    if notes:
        parts.append(
            f'<h2>{e(heads["notes"])}</h2><ul class="notes">'
            + "".join(f"<li>{e(n)}</li>" for n in notes)
            + "</ul>"
        )
    parts.append("</body></html>\n")
    out.write_bytes("index.html", "\n".join(parts).encode("utf-8"))
    return out.url("index.html")
