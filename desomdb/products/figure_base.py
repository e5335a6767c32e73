"""What every figure shares: the drawing context, display constants and scale helpers.

Used by the report's figures (:mod:`desomdb.products.paper_figures`) and the explorer's
(:mod:`desomdb.web.figures`), so both draw nodes in the same colours and ranges.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from desomdb.archive.store import Archive
from desomdb.science import emission

#: Node PDFs (Fig. 6) built from fewer labelled baxels than this are drawn grey.
PDF_MIN_N = 20


#: Half-width of the emission-line windows masked when Fig. 3 scales to the continuum.
LINE_WINDOW_AA = 20.0


#: Okabe-Ito colours (colour-blind safe) for overlaid nodes.
NODE_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7")


class FigureSkippedError(Exception):
    """A figure whose inputs the archive does not have (the reason is the message)."""


@dataclass
class Context:
    """What the figure functions read: the archive's views and the current model."""

    arch: Archive
    con: Any
    model_id: str
    rows: int
    cols: int
    payload: dict[str, Any]
    nodes: list[int] = field(default_factory=list)
    galaxy: str | None = None
    desom2: tuple[str, Any] | None = None  # (id, model), loaded once for Fig. 9/10/14
    generation: int = 0  # the archive's manifest generation the figures were drawn from
    cfg: Any = None  # the DESOM-1's DesomConfig


def pyplot() -> Any:
    """Return ``matplotlib.pyplot`` on the Agg backend (no display; imported when drawing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def node_grid(df_rows: list[tuple[int, int, Any]], rows: int, cols: int) -> np.ndarray:
    """Return ``(row, col, value)`` rows as a (rows, cols) image, NaN where a node has none."""
    grid = np.full((rows, cols), np.nan)
    for r, c, v in df_rows:
        if v is not None:
            grid[r, c] = v
    return grid


def map_ticks(ax: Any, rows: int, cols: int) -> None:
    """Integer row/column ticks on a map drawn with ``imshow`` (at most ~8 per axis)."""
    ax.set_xticks(range(0, cols, max(1, -(-cols // 8))))
    ax.set_yticks(range(0, rows, max(1, -(-rows // 8))))


def map_colours(rows: int, cols: int) -> np.ndarray:
    """Colour each map position: hue follows the column, lightness the row (a 2-D key).

    Neighbouring nodes get similar colours and nodes of one column share a hue, so a bin
    map coloured by node shows which spaxels sit close together on the map (a colour scale
    over ``row * n_cols + col`` would put nodes of one column far apart).

    Returns
    -------
    ndarray, shape (rows, cols, 3), float
        RGB in 0-1.
    """
    rgb = np.zeros((rows, cols, 3))
    for r in range(rows):
        for c in range(cols):
            hue = 0.8 * c / max(cols - 1, 1)  # 0.8 of the wheel: the last column is not red again
            light = 0.3 + 0.45 * r / max(rows - 1, 1)
            rgb[r, c] = colorsys.hls_to_rgb(hue, light, 0.85)
    return rgb


def continuum_limits(wave_aa: np.ndarray, *fluxes: np.ndarray,
                     window_aa: float = LINE_WINDOW_AA) -> tuple[float, float]:
    """Y-limits that show the continuum: 1-99 % of the flux outside emission-line windows.

    Parameters
    ----------
    wave_aa : ndarray, shape (n_wave,)
        Rest-frame vacuum wavelength, Å.
    *fluxes : ndarray, shape (n_wave,)
        Spectra drawn in the same panel (non-finite pixels ignored).
    window_aa : float
        Half-width of the window masked around each line of :data:`emission.LINES_AA`.

    Returns
    -------
    (lo, hi) : floats, padded by 8 % of the range.
    """
    lines = np.array(list(emission.LINES_AA.values()))
    keep = np.min(np.abs(wave_aa[:, None] - lines[None, :]), axis=1) > window_aa
    values = np.concatenate([np.asarray(f, dtype=float)[keep] for f in fluxes])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
    pad = 0.08 * (hi - lo) if hi > lo else 0.1 * max(abs(hi), 1.0)
    return lo - pad, hi + pad


def default_nodes(con: Any, n_min: int = PDF_MIN_N) -> list[int]:
    """Pick the youngest and oldest well-populated node (median age) and the largest.

    Well-populated: at least ``n_min`` labelled members (fewer where no node has that
    many), so Fig. 6 shows PDFs worth reading even when only some baxels are labelled.
    """
    df = con.sql("select s.node, s.n_members, s.median_age_mw_gyr as age, "
                 "coalesce(l.n, 0) as n_labelled from node_summary s left join "
                 "(select node, n from node_labels where model_id = current_model() and "
                 "label = 'age_mw_gyr') l using (node) where s.n_members > 0 "
                 "order by s.node").pl()
    if df.height == 0:
        return []
    big = df.filter(df["n_labelled"] >= min(n_min, int(df["n_labelled"].max() or 0)))
    aged = big.filter(big["age"].is_not_null())
    picks: list[int] = []
    if aged.height:
        picks += [int(aged.sort("age")["node"][0]), int(aged.sort("age")["node"][-1])]
    by_size = [int(n) for n in df.sort("n_members", descending=True)["node"]]
    picks = list(dict.fromkeys([*picks, by_size[0]]))
    for node in by_size:  # at least two nodes when the map has them (Fig. 6 overlays two)
        if len(picks) >= 2:
            break
        if node not in picks:
            picks.append(node)
    return picks


def accuracy_limits(true: np.ndarray, fit: np.ndarray) -> tuple[float, float]:
    """Return the axis range of a fit-vs-truth panel.

    The truth's range widened by five robust scatters of fit - truth (at least 5 % of the
    range): fits further off (e.g. E(B−V)_gas from a noisy Balmer decrement) go off-scale,
    where the panel counts them instead of stretching the axes for everything else.
    """
    d = fit - true
    scatter = 1.4826 * float(np.median(np.abs(d - np.median(d))))
    lo, hi = float(true.min()), float(true.max())
    margin = max(5 * scatter, 0.05 * (hi - lo), 1e-3)
    return lo - margin, hi + margin
