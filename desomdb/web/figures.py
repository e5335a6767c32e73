"""Server-side figures of the explorer: matplotlib drawn to SVG text, or SVG written directly.

Plots (spectra, label PDFs, radial profiles) use matplotlib's object API
(:class:`matplotlib.figure.Figure` with the Agg canvas, never ``pyplot``), so requests served
on several threads share no global figure state. Clickable pictures (the map grids, the bin
map) are SVG written here: one ``<a>`` per node or bin with a ``<title>`` tooltip, so they
work without any JavaScript. Colours, units and the continuum scaling come from
:mod:`desomdb.products.report`, so the explorer and the static report read alike.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.colors import Normalize, to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text

from desomdb.products import figure_base
from desomdb.science import emission, label_catalogue, spectra

#: Pixel size of one map cell in the SVG grids.
CELL_PX = 44
#: Colour of a cell or spaxel without a value.
EMPTY = "#e0e0e0"


def svg_text(fig: Figure) -> str:
    """Return ``fig`` as SVG markup (no XML prologue, so it can be inlined in HTML).

    Text stays text (``svg.fonttype = none``): the browser draws it, which keeps the SVG
    small and skips matplotlib's glyph outlines.
    """
    FigureCanvasAgg(fig)
    buf = io.StringIO()
    with rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg"):]


@dataclass(frozen=True)
class Cell:
    """One clickable cell of a map grid.

    Attributes
    ----------
    row, col : int
        Position on the map (0-based; node = row * n_cols + col).
    value : float or None
        What colours the cell (None: grey).
    href : str
        Where a click goes.
    title : str
        The hover text (node summary).
    text : str
        Printed inside the cell (e.g. the member count).
    fill : str, optional
        A CSS colour that overrides the colour map.
    """

    row: int
    col: int
    value: float | None
    href: str
    title: str
    text: str = ""
    fill: str | None = None


def grid_svg(cells: Sequence[Cell], rows: int, cols: int, label: str,
             cmap: str = "cividis", bar: bool = True) -> str:
    """Draw a map as an SVG grid of links, with a colour bar.

    Parameters
    ----------
    cells : sequence of Cell
        One per node (missing nodes are drawn grey, without a link).
    rows, cols : int
        Map shape.
    label : str
        What the colour shows (with its unit), written under the colour bar.
    cmap : str
        A matplotlib colour map (colour-blind safe by default).
    bar : bool
        Draw the colour bar (its ends are the lowest and highest value).

    Returns
    -------
    str
        ``<svg>`` markup, ``cols * CELL_PX`` wide plus the colour bar.
    """
    values = np.array([c.value for c in cells if c.value is not None and np.isfinite(c.value)],
                      dtype=float)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    norm, colours = Normalize(lo, hi), colormaps[cmap]
    width, height = cols * CELL_PX, rows * CELL_PX
    full = width + (90 if bar else 2)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="map" width="{full}" '
           f'height="{height + 2}" viewBox="0 0 {full} {height + 2}" role="img" '
           f'aria-label="{escape(label)}">']
    for c in cells:
        x, y = c.col * CELL_PX + 1, c.row * CELL_PX + 1
        finite = c.value is not None and bool(np.isfinite(c.value))
        level = float(norm(c.value)) if c.value is not None and finite else 0.0
        fill = c.fill or (to_hex(colours(level)) if finite else EMPTY)
        light = finite and level > 0.6
        out.append(f'<a href="{escape(c.href)}" class="cell" data-node="{c.row},{c.col}">'
                   f"<title>{escape(c.title)}</title>"
                   f'<rect x="{x}" y="{y}" width="{CELL_PX - 2}" height="{CELL_PX - 2}" '
                   f'fill="{fill}"/>'
                   f'<text x="{x + CELL_PX / 2 - 1}" y="{y + CELL_PX / 2 + 4}" '
                   f'fill="{"#000" if light or not finite else "#fff"}">{escape(c.text)}</text>'
                   "</a>")
    if not bar:
        return "".join(out) + "</svg>"
    bar_x, steps = width + 12, 32
    for i in range(steps):
        frac = 1 - (i + 0.5) / steps
        out.append(f'<rect x="{bar_x}" y="{1 + i * height / steps:.1f}" width="14" '
                   f'height="{height / steps + 0.5:.1f}" fill="{to_hex(colours(frac))}"/>')
    out.append(f'<text class="tick" x="{bar_x + 18}" y="10">{_fmt(hi)}</text>'
               f'<text class="tick" x="{bar_x + 18}" y="{height}">{_fmt(lo)}</text></svg>')
    return "".join(out)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def binmap_svg(xy_bin: np.ndarray, colour: dict[int, str], titles: dict[int, str],
               hrefs: dict[int, str], px: int = 8, x_right: bool = True) -> str:
    """Draw a galaxy's bin map as SVG: one link per bin, runs of spaxels as rectangles.

    Parameters
    ----------
    xy_bin : ndarray, shape (n_spaxels, 3), int
        ``x, y, bin_id`` of every binned spaxel (``bin_map``; x along the cube's RA axis).
    colour : dict
        bin_id -> CSS colour (bins not listed are grey).
    titles, hrefs : dict
        bin_id -> hover text and link target.
    px : int
        Pixels per spaxel.
    x_right : bool
        Draw x growing to the right: true for a cube whose RA falls with x (the DRP's
        ``CD1_1 < 0``, :func:`~desomdb.web.galaxy_pages.x_grows_west`), so east is on the left.

    Returns
    -------
    str
        ``<svg>`` markup, y growing upwards (north up for the DRP's ``CD2_2 > 0``).
    """
    if len(xy_bin) == 0:
        return "<p>no bin map</p>"
    nx, ny = int(xy_bin[:, 0].max()) + 1, int(xy_bin[:, 1].max()) + 1
    by_bin: dict[int, list[str]] = {}
    order = np.lexsort((xy_bin[:, 0], xy_bin[:, 1]))
    rows = xy_bin[order]
    start = 0
    for i in range(1, len(rows) + 1):  # merge runs of one bin along x within a row
        if (i < len(rows) and rows[i, 1] == rows[start, 1] and rows[i, 2] == rows[start, 2]
                and rows[i, 0] == rows[i - 1, 0] + 1):
            continue
        x0, x1, y, b = rows[start, 0], rows[i - 1, 0], rows[start, 1], int(rows[start, 2])
        left = x0 * px if x_right else (nx - 1 - x1) * px
        by_bin.setdefault(b, []).append(
            f'<rect x="{left}" y="{(ny - 1 - y) * px}" width="{(x1 - x0 + 1) * px}" '
            f'height="{px}"/>')
        start = i
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="binmap" width="{nx * px}" '
           f'height="{ny * px}" viewBox="0 0 {nx * px} {ny * px}">']
    for b, rects in by_bin.items():
        out.append(f'<a href="{escape(hrefs.get(b, "#"))}" class="bin" data-bin="{b}">'
                   f"<title>{escape(titles.get(b, f'bin {b}'))}</title>"
                   f'<g fill="{colour.get(b, EMPTY)}">{"".join(rects)}</g></a>')
    out.append("</svg>")
    return "".join(out)


def composite_rgb(images: dict[str, np.ndarray]) -> np.ndarray | None:
    """Make a g/r/i colour composite (Lupton et al. 2004 asinh stretch, astropy's code).

    Parameters
    ----------
    images : dict of str to ndarray, shape (n_y, n_x)
        Band -> image in nanomaggies per spaxel (the ``images`` table); needs g, r and i.

    Returns
    -------
    ndarray, shape (n_y, n_x, 3), uint8, or None
        i as red, r as green, g as blue; None without all three bands. The stretch is set
        from the image itself (the 99.5th percentile of r), so faint and bright galaxies
        both show structure.
    """
    from astropy.visualization import make_lupton_rgb

    if not all(b in images for b in "gri"):
        return None
    g, r, i = (np.nan_to_num(np.asarray(images[b], np.float64), nan=0.0) for b in "gri")
    top = float(np.percentile(r, 99.5))
    if not top > 0:
        return None
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 where a pixel is empty
        return np.asarray(make_lupton_rgb(i, r, g, minimum=0.0, stretch=top / 4, Q=8))


def image_svg(rgb: np.ndarray, covered: np.ndarray, px: int = 8, x_right: bool = True
              ) -> str:
    """Draw a colour image of a cube's spaxel grid with its IFU footprint outlined.

    Parameters
    ----------
    rgb : ndarray, shape (n_y, n_x, 3), uint8
        The image, indexed ``[y, x]`` as the cube.
    covered : ndarray, shape (n_y, n_x), bool
        Spaxels the fibres cover (``bin_map``): their outer edge is drawn.
    px : int
        Screen pixels per spaxel (as :func:`binmap_svg`, so the two line up).
    x_right : bool
        As :func:`binmap_svg`.

    Returns
    -------
    str
        ``<svg>`` markup: the image as an embedded PNG, the footprint as one path.
    """
    import base64

    from matplotlib.image import imsave

    shown = rgb[::-1] if x_right else rgb[::-1, ::-1]  # y up; x right or left
    buf = io.BytesIO()
    imsave(buf, shown, format="png")
    data = base64.b64encode(buf.getvalue()).decode()
    n_y, n_x = covered.shape
    cov = np.pad(covered[::-1] if x_right else covered[::-1, ::-1], 1)
    edges = []  # the edge of each covered spaxel whose neighbour is not covered
    for r, c in zip(*np.nonzero(cov[1:-1, 1:-1]), strict=True):
        x, y = int(c) * px, int(r) * px
        if not cov[r + 1, c]:
            edges.append(f"M{x} {y}v{px}")
        if not cov[r + 1, c + 2]:
            edges.append(f"M{x + px} {y}v{px}")
        if not cov[r, c + 1]:
            edges.append(f"M{x} {y}h{px}")
        if not cov[r + 2, c + 1]:
            edges.append(f"M{x} {y + px}h{px}")
    w, h = n_x * px, n_y * px
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="cube-image" width="{w}" '
            f'height="{h}" viewBox="0 0 {w} {h}"><image width="{w}" height="{h}" '
            f'preserveAspectRatio="none" style="image-rendering:pixelated" '
            f'href="data:image/png;base64,{data}"/>'
            f'<path class="footprint" d="{"".join(edges)}" fill="none" stroke="#7fdbff" '
            f'stroke-width="1.5"><title>IFU footprint (spaxels the fibres cover)</title>'
            f"</path></svg>")


def node_colours(nodes: dict[int, int], rows: int, cols: int) -> dict[int, str]:
    """Colour each bin by its node's map position.

    See :func:`desomdb.products.figure_base.map_colours`.
    """
    key = figure_base.map_colours(rows, cols)
    return {b: to_hex(key[n // cols, n % cols]) for b, n in nodes.items()}


def value_colours(values: dict[int, float], cmap: str = "cividis"
                  ) -> tuple[dict[int, str], tuple[float, float]]:
    """Colour bins by a value; return the colours and the (lo, hi) range used."""
    finite = np.array([v for v in values.values() if np.isfinite(v)], dtype=float)
    if finite.size == 0:
        return {}, (np.nan, np.nan)
    lo, hi = float(finite.min()), float(finite.max())
    norm = Normalize(lo, hi if hi > lo else lo + 1)
    cm = colormaps[cmap]
    return {b: to_hex(cm(norm(v))) for b, v in values.items() if np.isfinite(v)}, (lo, hi)


def _lines(ax: Axes, wave: np.ndarray) -> None:
    """Mark the fitted emission lines as one collection of grey verticals (axes height)."""
    lams = [lam for lam in emission.LINES_AA.values() if wave[0] <= lam <= wave[-1]]
    ax.vlines(lams, 0, 1, transform=ax.get_xaxis_transform(), colors="0.82", lw=0.6,
              zorder=0)


@dataclass(frozen=True)
class _SpectrumPlot:
    """A drawn spectrum figure kept for reuse: only data, limits and title change."""

    fig: Figure
    ax: Axes
    curves: list[Line2D]
    title: Text
    axr: Axes | None
    residual: Line2D | None


#: Per thread: (curve labels and colours, with residual) -> its figure (matplotlib objects
#: are not thread-safe; each server thread draws on its own).
_PLOTS = threading.local()


def _spectrum_plot(styles: tuple[tuple[str, str], ...], residual: bool) -> _SpectrumPlot:
    """Return this thread's figure for curves of ``styles`` (label, colour); build it once.

    Building the axes, ticks, legend and line markers costs more than drawing the data, so
    a page reuses the figure and only replaces the curves' y values, limits and title.
    """
    plots: dict[tuple[object, ...], _SpectrumPlot] = _PLOTS.__dict__.setdefault("plots", {})
    key = (styles, residual)
    if key in plots:
        return plots[key]
    wave = spectra.rest_wave_aa()
    blank = np.full(wave.size, np.nan)
    fig = Figure(figsize=(9, 3.6 if residual else 2.8))
    FigureCanvasAgg(fig)
    if residual:
        ax, axr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    else:
        ax, axr = fig.subplots(1, 1), None
    curves = [ax.plot(wave, blank, lw=0.6, color=colour, label=name)[0]
              for name, colour in styles]
    _lines(ax, wave)
    ax.set_xlim(wave[0], wave[-1])
    ax.set_ylabel("flux / mean 4050-4150 Å")
    ax.legend(fontsize=7, loc="upper right")
    title = ax.set_title(" ", fontsize=9, y=1.0)  # fixed y: no search for tick labels above
    bottom, res_line = ax, None
    if axr is not None:
        res_line = axr.plot(wave, blank, lw=0.5, color="0.3")[0]
        axr.axhline(0, color="k", lw=0.5)
        _lines(axr, wave)
        axr.set_ylabel("residual")
        bottom = axr
    bottom.set_xlabel("rest wavelength [Å, vacuum]; grey lines: emission lines fitted")
    fig.subplots_adjust(left=0.08, right=0.99, bottom=0.18 if axr is None else 0.14,
                        top=0.9, hspace=0.08)
    plots[key] = _SpectrumPlot(fig, ax, curves, title, axr, res_line)
    return plots[key]


def spectrum_figure(curves: Sequence[tuple[str, np.ndarray, str]], title: str,
                    residual: np.ndarray | None = None) -> str:
    """Plot normalised spectra against rest wavelength, emission lines marked.

    The figure of a given set of curve labels and colours is built once per thread and
    reused (:func:`_spectrum_plot`): a call sets the data, limits and title and draws.

    Parameters
    ----------
    curves : sequence of (label, flux, colour)
        flux : ndarray, shape (4544,), normalised (÷ the 4050-4150 Å mean); NaN = not drawn.
    title : str
    residual : ndarray, shape (4544,), optional
        Drawn in a second panel below (e.g. data − reconstruction).

    Returns
    -------
    str
        SVG markup.
    """
    wave = spectra.rest_wave_aa()
    plot = _spectrum_plot(tuple((name, colour) for name, _, colour in curves),
                          residual is not None)
    drawn = [np.asarray(flux, dtype=float) for _, flux, _ in curves]
    for line, f in zip(plot.curves, drawn, strict=True):
        line.set_ydata(f)
    plot.ax.set_ylim(*figure_base.continuum_limits(wave, *drawn))
    plot.title.set_text(title)
    if plot.axr is not None and plot.residual is not None and residual is not None:
        res = np.asarray(residual, dtype=float)
        plot.residual.set_ydata(res)
        finite = res[np.isfinite(res)]
        lim = float(np.percentile(np.abs(finite), 99)) * 1.2 if finite.size else 0.0
        plot.axr.set_ylim(-lim if lim > 0 else -1.0, lim if lim > 0 else 1.0)
    return svg_text(plot.fig)


@dataclass(frozen=True)
class Pdf:
    """One label distribution (a ``node_labels`` row).

    Attributes
    ----------
    label : str
    n : int
        Labelled baxels behind it.
    median : float or None
    histogram : ndarray, shape (n_bins,)
        Counts in equal bins between ``lo`` and ``hi``.
    lo, hi : float
        The label's fixed histogram range.
    """

    label: str
    n: int
    median: float | None
    histogram: np.ndarray
    lo: float
    hi: float


def pdf_sparkline(pdf: Pdf, mark: float | None = None, width: int = 180,
                  height: int = 44) -> str:
    """Draw one label PDF as a small inline SVG: the step histogram, its median, a mark.

    Parameters
    ----------
    pdf : Pdf
    mark : float, optional
        A value drawn as an orange line (e.g. one baxel's pPXF label); off-range values are
        drawn at the edge.
    width, height : int
        Size in pixels; the label's fixed range spans the width (ends written below).

    Returns
    -------
    str
        ``<svg>`` markup. PDFs from fewer than
        :data:`~desomdb.products.figure_base.PDF_MIN_N` baxels are grey and dotted, as in
        the report.
    """
    h = np.asarray(pdf.histogram, dtype=float)
    plot_h = height - 12
    if h.size == 0 or h.max() <= 0:
        return f'<svg class="pdf" width="{width}" height="{height}"></svg>'

    def x_of(v: float) -> float:
        return float(np.clip((v - pdf.lo) / (pdf.hi - pdf.lo), 0, 1)) * (width - 2) + 1

    step = (width - 2) / h.size
    ys = plot_h - h / h.max() * (plot_h - 2)
    pts = [f"1,{plot_h}"]
    for i, y in enumerate(ys):
        pts += [f"{1 + i * step:.1f},{y:.1f}", f"{1 + (i + 1) * step:.1f},{y:.1f}"]
    pts.append(f"{width - 1},{plot_h}")
    few = pdf.n < figure_base.PDF_MIN_N
    colour = "#8c8c8c" if few else figure_base.NODE_COLOURS[0]
    dashes = ' stroke-dasharray="2,2"' if few else ""
    joined = " ".join(pts)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="pdf" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}">'
           f"<title>{escape(pdf.label)}: n={pdf.n}, median {_fmt_or_dash(pdf.median)}</title>"
           f'<polyline points="{joined}" fill="none" stroke="{colour}" '
           f'stroke-width="1.3"{dashes}/>']
    if pdf.median is not None and np.isfinite(pdf.median):
        x = x_of(pdf.median)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{plot_h}" stroke="{colour}" '
                   'stroke-dasharray="3,2"/>')
    if mark is not None and np.isfinite(mark):
        x = x_of(mark)
        out.append(f'<line class="mark" x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{plot_h}" '
                   f'stroke="{figure_base.NODE_COLOURS[1]}" stroke-width="2"/>')
    out.append(f'<text x="1" y="{height - 1}" font-size="9">{_fmt(pdf.lo)}</text>'
               f'<text x="{width - 1}" y="{height - 1}" font-size="9" text-anchor="end">'
               f"{_fmt(pdf.hi)}</text></svg>")
    return "".join(out)


def _fmt_or_dash(v: float | None) -> str:
    return "–" if v is None or not np.isfinite(v) else _fmt(v)


def radial_figure(radius_re: np.ndarray, values: np.ndarray, label: str, title: str) -> str:
    """Plot one label against radius with its running median.

    Parameters
    ----------
    radius_re : ndarray, shape (n,)
        Baxel radius in units of the effective radius.
    values : ndarray, shape (n,)
        The label; NaN where it fails its cut (not drawn).
    label : str
        A key of :data:`desomdb.products.label_catalogue.ACCURACY_DISPLAY` (gives the axis unit).
    title : str

    Returns
    -------
    str
        SVG markup.
    """
    plot = _radial_plot(label)
    ok = np.isfinite(values) & np.isfinite(radius_re)
    r, v = radius_re[ok], values[ok]
    plot.points.set_offsets(np.column_stack([r, v]))
    mx, my = np.zeros(0), np.zeros(0)
    if r.size:
        edges = np.linspace(0, max(float(r.max()), 0.1), 7)
        idx = np.clip(np.digitize(r, edges) - 1, 0, len(edges) - 2)
        med = [(0.5 * (edges[i] + edges[i + 1]), float(np.median(v[idx == i])))
               for i in range(len(edges) - 1) if np.any(idx == i)]
        mx, my = (np.array(c) for c in zip(*med, strict=True))
    plot.median.set_data(mx, my)
    plot.ax.set_xlim(*_padded(r))
    plot.ax.set_ylim(*_padded(v))
    plot.title.set_text(title)
    return svg_text(plot.fig)


@dataclass(frozen=True)
class _RadialPlot:
    """A radial-profile figure kept for reuse (points, median line, limits, title change)."""

    fig: Figure
    ax: Axes
    points: PathCollection
    median: Line2D
    title: Text


def _radial_plot(label: str) -> _RadialPlot:
    """Return this thread's radial-profile figure of ``label``; build it once."""
    plots: dict[str, _RadialPlot] = _PLOTS.__dict__.setdefault("radial", {})
    if label not in plots:
        fig = Figure(figsize=(5.2, 3.0))
        FigureCanvasAgg(fig)
        ax = fig.subplots(1, 1)
        points = ax.scatter([], [], s=7, color=figure_base.NODE_COLOURS[0], alpha=0.6, lw=0)
        median = ax.plot([], [], color="k", lw=1.2, marker="o", ms=3)[0]
        ax.set_xlabel("R / R_e")
        ax.set_ylabel(label_catalogue.ACCURACY_DISPLAY.get(label, label))
        title = ax.set_title(" ", fontsize=8, y=1.0)
        fig.subplots_adjust(left=0.17, right=0.97, bottom=0.16, top=0.88)
        plots[label] = _RadialPlot(fig, ax, points, median, title)
    return plots[label]


def _padded(values: np.ndarray, pad: float = 0.05) -> tuple[float, float]:
    """Axis limits around ``values`` with matplotlib's default 5 % margins ((0, 1) if none)."""
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo if hi > lo else max(abs(lo), 1.0)
    return lo - pad * span, hi + pad * span
