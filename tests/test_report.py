"""The static HTML report: one offline file, escaped text, embedded images, grid picture sizes."""

from __future__ import annotations

import io
import re

import pandas as pd
from helpers_browser import check_report
from PIL import Image

from infra.storage.fsio import Location
from tasks.reporting.grid_image import PAD, Grid, GridCell, grid_png
from tasks.reporting.html import write_report
from tasks.reporting.plots import bar_plot_svg, scatter_plot_svg


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


def test_numbers_are_rounded_per_column_never_in_exponent_notation():
    from tasks.reporting.html import number_formatter

    kid = number_formatter([3.085e-05, -2.3e-05, 0.000658])
    assert [kid(v) for v in (3.085e-05, -2.3e-05, float("nan"))] == ["0.000031", "-0.000023", "–"]
    assert number_formatter([1.0, 2.0])(2.0) == "2" and number_formatter([64, 16])(16) == "16"
    assert number_formatter([23.456789, 0.5])(0.5) == "0.50"  # one format for the column


def test_headline_marks_the_best_of_each_ranked_row():
    from tasks.reporting.html import Headline, Metric, headline_html

    table = pd.DataFrame(
        {"method": ["a", "b"], "acc": [0.9, 0.5], "fid": [3.5, 2.25], "n": [4, 4], "s": [-1e-4, 0]}
    )
    page = headline_html(
        Headline(
            table,
            "method",
            [
                Metric("acc", "accuracy", "share right", "higher", lambda v: f"{100 * v:.0f} %"),
                Metric("fid", "fid", "distance", "lower"),
                Metric("n", "edits", "count"),
                Metric("s", "ssim", "rounds to a tie", "higher", lambda v: f"{v:.3f}"),
            ],
            title="Which <one>",
        )
    )
    assert '<td class="best" title="best">90 %</td><td>50 %</td>' in page
    assert '<td>3.50</td><td class="best" title="best">2.25</td>' in page
    assert "best" not in page.split("edits")[1]  # an unranked row, a tie as shown: not marked
    assert "<td>0.000</td><td>0.000</td>" in page
    assert "Which &lt;one&gt;" in page and "share right" in page


def test_a_report_reads_in_a_real_browser(tmp_path):
    """A report with a wide grid, a long table with long prompts and a plot, in headless Chromium at
    a laptop's widths: every image decodes, nothing is wider than the window (screenshots kept)."""
    from tasks.reporting.html import Headline, Metric
    from tasks.reporting.plots import hbar_plot_svg

    prompts = pd.DataFrame(
        {
            "method": ["deltaedit", "styleclip_gd"] * 30,
            "variant": [f"prompt_{i // 2}" for i in range(60)],
            "prompt": [f"a shape → a shape that is {'very ' * (i % 7)}red" for i in range(60)],
            "edit_accuracy": [(i % 10) / 10 for i in range(60)],
            "unedited_accuracy": [0.2] * 60,
            "kid": [3.085e-05 * (i - 30) for i in range(60)],
        }
    )
    grid = Grid(
        ["input", "reconstruction", *(f"prompt_{i}" for i in range(16))],
        [(f"image {r}", [GridCell(png("red", 64))] * 18) for r in range(3)],
    )
    head = Headline(
        prompts.groupby("method", as_index=False)[["edit_accuracy", "kid"]].mean(),
        "method",
        [Metric("edit_accuracy", "edit accuracy", "share of edits that land", "higher")],
    )
    out = Location(str(tmp_path / "report"))
    write_report(
        out,
        title="browser",
        summary={"run": "s3://bucket/" + "long-name-" * 20},
        tables={"by_prompt": prompts},
        grids={"deltaedit": grid},
        plots={
            "per prompt": hbar_plot_svg(
                prompts, "variant", "edit_accuracy", "method", reference="unedited_accuracy"
            )
        },
        notes=["x" * 300],
        lead=[("Did the edits land?", "yes")],
        headline=head,
    )
    seen = check_report(tmp_path / "report" / "index.html", tmp_path)
    assert all(len(page["images"]) == 3 * 18 and page["svgs"] == 1 for page in seen.values())
    assert Image.open(tmp_path / "report_1440.png").size == (1440, 900)
    assert Image.open(tmp_path / "report_1024_full.png").height > 768


def test_the_lead_names_the_best_method_and_no_winner_of_a_tie():
    from tasks.reporting.evaluation import lead

    by_method = pd.DataFrame(
        {
            "method": ["a", "b", "c"],
            "edit_accuracy": [0.6, 0.6, 0.6],
            "unedited_accuracy": [0.2, 0.2, 0.25],
            "preservation": [0.9, 0.95, 0.95],
            "fid": [1.5, 2.5, 3.5],
        }
    )
    lines = dict(lead({"by_method": by_method}, 3))
    assert "60.0 % of the edits" in lines["Did the edits land?"]
    assert "20.0–25.0 % on the unedited images" in lines["Did the edits land?"]
    best = lines["Which method is best?"]
    assert "edit accuracy" not in best and "preservation: b, c (95.0 %)" in best
    assert (
        "lowest fid vs inputs: a (1.50)" in best and "3 images" in lines["What do they look like?"]
    )
