"""The report's plots as inline SVG text (matplotlib without pyplot: no global state, safe in worker
threads; fixed hash salt, so the same table gives the same SVG)."""

from __future__ import annotations

import io

import pandas as pd


def _svg(fig) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "deltaedit"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", pad_inches=0.15)
    svg = buf.getvalue()
    # drop the XML declaration and DOCTYPE so it can sit inside HTML
    return svg[svg.index("<svg") :]


def _figure(title: str, size: tuple[float, float] = (9.0, 4.0)):
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in worker threads

    fig = Figure(figsize=size)
    ax = fig.add_subplot()
    if title:
        ax.set_title(title, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _legend_outside(ax, title: str | None = None) -> None:
    """The legend to the right of the axes, never over the data."""
    ax.legend(
        title=title,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
        fontsize="small",
        title_fontsize="small",
    )


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, ending in "…" when cut (also inside a long word)."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def bar_plot_svg(
    table: pd.DataFrame, x: str, y: str, hue: str | None = None, title: str = ""
) -> str:
    """Bars of ``y`` per ``x`` value (in order of appearance), grouped side by side by ``hue``; SVG text."""
    fig, ax = _figure(title)
    ax.grid(axis="y", alpha=0.3)
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
        [shorten(v, 28) for v in xs],
        rotation=30 if len(xs) > 4 else 0,
        ha="right" if len(xs) > 4 else "center",
    )
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if hue:
        _legend_outside(ax, hue)
    return _svg(fig)


def hbar_plot_svg(
    table: pd.DataFrame,
    y: str,
    x: str,
    hue: str | None = None,
    *,
    reference: str | None = None,
    reference_label: str = "reference",
    labels: dict[str, str] | None = None,
    title: str = "",
    xlabel: str | None = None,
    percent: bool = False,
) -> str:
    """Horizontal bars of ``x`` per ``y`` value (top to bottom in order of appearance), one bar per
    ``hue`` value side by side; ``reference``: a column drawn as a black tick across each bar (the level
    the bar is read against). ``labels`` name the ``y`` values on the axis (cut to 60 characters).
    The figure grows with the bars, so none is thinner than a few pixels."""
    from matplotlib.ticker import PercentFormatter

    ys = list(dict.fromkeys(table[y].astype(str)))
    hues = list(dict.fromkeys(table[hue].astype(str))) if hue else [None]
    fig, ax = _figure(title, (9.0, 0.9 + len(ys) * (0.1 + 0.12 * len(hues))))
    ax.grid(axis="x", alpha=0.3)
    height = 0.8 / len(hues)
    ref_x, ref_lo, ref_hi = [], [], []
    for k, h in enumerate(hues):
        part = table if h is None else table[table[hue].astype(str) == h]
        part = part.groupby(part[y].astype(str))[[x] + ([reference] if reference else [])].mean()
        centres = [i + (k - (len(hues) - 1) / 2) * height for i in range(len(ys))]
        ax.barh(centres, [float(part[x].get(v, float("nan"))) for v in ys], height, label=h)
        if reference:
            for c, v in zip(centres, ys):
                r = float(part[reference].get(v, float("nan")))
                if r == r:
                    ref_x.append(r)
                    ref_lo.append(c - height / 2)
                    ref_hi.append(c + height / 2)
    if ref_x:
        ax.vlines(ref_x, ref_lo, ref_hi, colors="black", linewidth=1.8, label=reference_label)
    names = labels or {}
    ax.set_yticks(range(len(ys)), [shorten(names.get(v, v), 60) for v in ys])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel or x)
    if percent:
        ax.set_xlim(0, 1.0)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    if hue or ref_x:
        _legend_outside(ax, hue)
    return _svg(fig)


def scatter_plot_svg(
    table: pd.DataFrame,
    x: str,
    y: str,
    hue: str | None = None,
    title: str = "",
    xlabel: str | None = None,
    ylabel: str | None = None,
) -> str:
    """``y`` against ``x``, one colour per ``hue`` value (e.g. identity vs. CLIP direction per method)."""
    fig, ax = _figure(title, (7.5, 4.5))
    ax.grid(alpha=0.3)
    groups = table.groupby(table[hue].astype(str), sort=False) if hue else [(None, table)]
    for name, part in groups:
        ax.scatter(part[x], part[y], s=18, alpha=0.75, label=name)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if hue:
        _legend_outside(ax, hue)
    return _svg(fig)


# --- the page ------------------------------------------------------------------------------------------
