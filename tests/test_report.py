"""The static HTML report: one offline file, escaped text, embedded images, grid picture sizes."""

from __future__ import annotations

import io
import re

import pandas as pd
from PIL import Image

from infra.storage.fsio import Location
from tasks.reporting.html import (
    PAD,
    Grid,
    GridCell,
    bar_plot_svg,
    grid_png,
    scatter_plot_svg,
    write_report,
)


def png(color, size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


PROMPT = 'a <b>face</b> & "smile" — café'


def make_grid(n_rows=2, captions=False) -> Grid:
    rows = [
        (
            f"image {i}",
            [
                GridCell(png("red"), caption="0.91" if captions else ""),
                GridCell(png("blue")),
                GridCell(None, error="CUDA <oom>"),
            ],
        )
        for i in range(n_rows)
    ]
    return Grid(columns=["input", "reconstruction", PROMPT], rows=rows)


def test_grid_png_size_and_cells():
    one, two = (
        Image.open(io.BytesIO(grid_png(make_grid(n, captions=False), cell_px=64))) for n in (1, 2)
    )
    assert one.width == 64 + 3 * (64 + PAD) + PAD == two.width
    assert two.height - one.height == 64 + PAD
    captioned = Image.open(io.BytesIO(grid_png(make_grid(2, captions=True), cell_px=64)))
    assert captioned.height > two.height
    # the 16 px red input is upscaled with nearest neighbour to fill its 64 px cell exactly
    img = two.convert("RGB")
    header_h = two.height - 2 * (64 + PAD) - PAD
    x0, y0 = 64 + PAD, header_h
    assert img.getpixel((x0, y0)) == (255, 0, 0) and img.getpixel((x0 + 63, y0 + 63)) == (255, 0, 0)
    assert img.getpixel((x0 + 64 + PAD + 5, y0 + 5)) == (0, 0, 255)
    assert img.getpixel((x0 + 2 * (64 + PAD) + 3, y0 + 3)) == (
        150,
        150,
        150,
    )  # failed cell: grey box


def test_plots_are_svg():
    table = pd.DataFrame(
        {
            "prompt": ["smile", "smile", "<old>"],
            "method": ["a", "b", "a"],
            "kid": [0.1, 0.2, 0.3],
            "clip": [0.5, 0.1, 0.2],
        }
    )
    bar = bar_plot_svg(table, "prompt", "kid", hue="method", title="KID & co")
    assert bar.startswith("<svg") and bar.rstrip().endswith("</svg>") and "&lt;old&gt;" in bar
    assert "KID &amp; co" in bar
    assert scatter_plot_svg(table, "clip", "kid", hue="method").startswith("<svg")


def test_write_report(tmp_path):
    out = Location(str(tmp_path / "report"))
    table = pd.DataFrame(
        {"method": ["delta<mapper>"], "prompt": [PROMPT], "psnr": [23.456789], "ssim": [0.9123456]}
    )
    uri = write_report(
        out,
        title="Eval <toy>",
        summary={"run": "toy & friends", "prompts": "3"},
        tables={"per prompt": table},
        grids={"edits/toy": make_grid()},
        plots={"psnr": bar_plot_svg(table, "method", "psnr")},
        notes=["KID < FID here"],
    )
    assert uri == out.url("index.html")
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert (
        "a &lt;b&gt;face&lt;/b&gt; &amp; &quot;smile&quot; — café" in page
    )  # escaped, non-ASCII kept
    assert "<b>face" not in page and "delta&lt;mapper&gt;" in page and "Eval &lt;toy&gt;" in page
    assert "KID &lt; FID here" in page and "CUDA &lt;oom&gt;" in page
    assert "23.46" in page and "0.9123" in page and "23.456789" not in page  # 4 significant digits
    assert page.count("data:image/png;base64,") == 4  # 2 rows × 2 good cells
    assert "<svg" in page and "<?xml" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from the network
    assert not re.search(r"<script|<link", page)
    grid = Image.open(tmp_path / "report" / "grid_edits_toy.png")
    assert grid.size == Image.open(io.BytesIO(grid_png(make_grid()))).size
    assert 'href="grid_edits_toy.png"' in page
