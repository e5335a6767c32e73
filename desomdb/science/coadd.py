"""The node co-add, defined once: inverse-variance-weighted per-cube partial sums.

For a baxel with rest-frame ``flux``, ``ivar`` and ``mask`` (``spectra``) and
``norm_flux`` (``baxels``), per wavelength bin k::

    x_k = flux_k / norm_flux                 (normalised flux, what the network sees)
    w_k = ivar_k * norm_flux**2              (the inverse variance of x_k)

with ``w_k = 0`` on masked bins (``mask != 0``), where ``ivar_k <= 0`` and wherever
``x_k`` or ``w_k`` is not finite — a masked bin never contributes. The co-add of a set of
baxels is ``Σ w x / Σ w`` per bin (NaN where ``Σ w = 0``): the inverse-variance-weighted mean
of their normalised spectra, i.e. the maximum-likelihood common spectrum if the members share
one shape and their errors are Gaussian.

Per cube and node the archive stores the partial sums (table ``node_partials``, one file per
cube per model, named like the cube's assignments): ``n_members``, ``sum_w`` and ``sum_wx``
(float32[4544], accumulated in float64 and rounded once). ``nodes.coadd`` is
``Σ sum_wx / Σ sum_w`` over the newest version of every cube; a stack of any other set of
whole cubes is the same sum over their partials (:func:`combine`), so a node stack equals the
node co-add. Partials are computed by sorting the rows by node and adding runs with
``np.add.reduceat`` (one pass, ~2x faster end to end than ``np.add.at`` scatter-adds).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from desomdb.constants import C_KMS
from desomdb.science import spectra


@dataclass(frozen=True)
class Partials:
    """Partial sums of one set of spectra (one cube), per node.

    Attributes
    ----------
    node : ndarray of int64, shape (m,)
        Nodes with at least one member, increasing.
    n_members : ndarray of int64, shape (m,)
        Spectra per node.
    sum_w : ndarray of float64, shape (m, 4544)
        Σ w per bin (w: inverse variance of the normalised flux, dimensionless).
    sum_wx : ndarray of float64, shape (m, 4544)
        Σ w·x per bin.
    """

    node: np.ndarray
    n_members: np.ndarray
    sum_w: np.ndarray
    sum_wx: np.ndarray

    @classmethod
    def empty(cls, width: int = spectra.N_REST) -> Partials:
        """Partial sums of no spectra."""
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, width)),
                   np.zeros((0, width)))


@dataclass(frozen=True)
class Coadd:
    """Node co-adds combined from partial sums.

    Attributes
    ----------
    n_members : ndarray of int64, shape (n_nodes,)
    sum_w, sum_wx : ndarray of float64, shape (n_nodes, 4544)
    """

    n_members: np.ndarray
    sum_w: np.ndarray
    sum_wx: np.ndarray

    @property
    def coadd(self) -> np.ndarray:
        """Inverse-variance-weighted mean normalised flux, shape (n_nodes, 4544); NaN if Σw=0."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.sum_w > 0, self.sum_wx / self.sum_w, np.nan)


def weighted(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray, norm: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """Normalised flux (the network input) and its inverse-variance co-add weights.

    Parameters
    ----------
    flux, ivar : ndarray, shape (n, 4544), float32
        Rest-frame flux (1e-17 erg/s/cm²/Å) and its inverse variance.
    mask : ndarray, shape (n, 4544)
        Non-zero = masked.
    norm : ndarray, shape (n,)
        ``baxels.norm_flux`` of each row, flux units.

    Returns
    -------
    x : ndarray, shape (n, 4544), float32
        ``flux / norm`` with masked and non-finite bins 0 (equal to
        :func:`desomdb.science.spectra.normalise`'s).
    w : ndarray, shape (n, 4544), float32
        ``ivar * norm**2``; 0 where masked, ``ivar <= 0`` or not finite.
    """
    n = np.asarray(norm, dtype=np.float32)[:, None]
    good = np.asarray(mask) == 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x = np.asarray(flux, dtype=np.float32) / n
        w = np.asarray(ivar, dtype=np.float32) * (n * n)
    good &= np.isfinite(x)
    x[~good] = 0.0
    good &= np.isfinite(w) & (w > 0)
    w[~good] = 0.0
    return x, w


def shift_to_rest(x: np.ndarray, w: np.ndarray, vel_kms: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Move each spectrum on the rest grid by its own line-of-sight velocity.

    A member whose stars move at ``v`` relative to the drpall redshift shows its features
    ``v / velscale`` bins redward on the archive's grid (pPXF's convention, ``v = c Δln λ``;
    velscale = c Δln λ per bin, 59.2 km/s). Each spectrum is read at ``i + v / velscale``
    by linear interpolation between the two neighbouring bins, weights alike; an output
    bin whose neighbours include a masked (``w = 0``) bin or lies beyond the grid gets
    weight 0, so masks never leak. Interpolated ivar ignores the noise correlation this
    introduces between neighbouring bins (≤ 1 bin shifts: a few per cent in the stack's
    error).

    Parameters
    ----------
    x, w : ndarray, shape (n, 4544)
        Normalised flux and weights (:func:`weighted`).
    vel_kms : ndarray, shape (n,)
        Stellar velocity of each member, km/s (``labels.vel``).

    Returns
    -------
    x, w : ndarray, shape (n, 4544), float32
        On the members' own rest frames.
    """
    width = x.shape[1]
    velscale = C_KMS * np.log(spectra.REST_MAX_AA / spectra.REST_MIN_AA) / (width - 1)
    pos = np.arange(width)[None, :] + (np.asarray(vel_kms, np.float64) / velscale)[:, None]
    lo = np.floor(pos).astype(np.int64)
    frac = (pos - lo).astype(np.float32)
    inside = (lo >= 0) & (lo + 1 < width)
    lo_c, hi_c = np.clip(lo, 0, width - 1), np.clip(lo + 1, 0, width - 1)
    w_lo, w_hi = np.take_along_axis(w, lo_c, 1), np.take_along_axis(w, hi_c, 1)
    good = inside & (w_lo > 0) & (w_hi > 0)
    x_out = (1 - frac) * np.take_along_axis(x, lo_c, 1) + frac * np.take_along_axis(x, hi_c, 1)
    w_out = (1 - frac) * w_lo + frac * w_hi
    return (np.where(good, x_out, 0.0).astype(np.float32),
            np.where(good, w_out, 0.0).astype(np.float32))


def partial_sums(x: np.ndarray, w: np.ndarray, node: np.ndarray) -> Partials:
    """Per-node n, Σw and Σw·x of a set of spectra (sort by node, then ``np.add.reduceat``).

    Parameters
    ----------
    x, w : ndarray, shape (n, width), float32
        Normalised flux and weights (:func:`weighted`).
    node : ndarray of int, shape (n,)
        Each spectrum's node.

    Returns
    -------
    Partials
        Sums accumulated in float64.
    """
    node = np.asarray(node)
    if node.size == 0:
        return Partials.empty(x.shape[1])
    order = np.argsort(node, kind="stable")
    ordered = node[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ws = w[order]
    sum_w = np.add.reduceat(ws, starts, axis=0, dtype=np.float64)
    sum_wx = np.add.reduceat(ws * x[order], starts, axis=0, dtype=np.float64)
    counts = np.diff(np.r_[starts, node.size])
    return Partials(ordered[starts].astype(np.int64), counts.astype(np.int64), sum_w, sum_wx)


def combine(parts: Iterable[Partials], n_nodes: int, width: int = spectra.N_REST) -> Coadd:
    """Add partial sums of several cubes into per-node totals (memory: one (n_nodes, width)).

    Parameters
    ----------
    parts : iterable of Partials
    n_nodes : int
        Map size; every ``Partials.node`` must be below it.
    width : int
        Spectral bins.

    Returns
    -------
    Coadd
    """
    total = Accumulator(n_nodes, width)
    for p in parts:
        total.add(p)
    return total.result()


class Accumulator:
    """Running per-node totals of partial sums (add cubes one at a time)."""

    def __init__(self, n_nodes: int, width: int = spectra.N_REST):
        self.n_members = np.zeros(n_nodes, np.int64)
        self.sum_w = np.zeros((n_nodes, width))
        self.sum_wx = np.zeros((n_nodes, width))

    def add(self, p: Partials) -> None:
        """Add one set of partial sums (its nodes are unique, so fancy indexing adds right)."""
        self.n_members[p.node] += p.n_members
        self.sum_w[p.node] += p.sum_w
        self.sum_wx[p.node] += p.sum_wx

    def result(self) -> Coadd:
        """Return the totals so far."""
        return Coadd(self.n_members, self.sum_w, self.sum_wx)


def to_table(p: Partials, release: str, plateifu: str) -> pa.Table:
    """Store one cube's partial sums as ``node_partials`` rows (sums rounded to float32)."""
    m = len(p.node)
    return pa.table({
        "release": pa.array([release] * m, pa.string()),
        "plateifu": pa.array([plateifu] * m, pa.string()),
        "node": pa.array(p.node.astype(np.int16)),
        "n_members": pa.array(p.n_members.astype(np.int64)),
        "sum_w": spectra.to_list_column(p.sum_w.astype(np.float32)),
        "sum_wx": spectra.to_list_column(p.sum_wx.astype(np.float32)),
    })


def from_table(table: pa.Table) -> Partials:
    """Read ``node_partials`` rows of one cube back (inverse of :func:`to_table`)."""
    if table.num_rows == 0:
        return Partials.empty()
    return Partials(table.column("node").to_numpy().astype(np.int64),
                    table.column("n_members").to_numpy().astype(np.int64),
                    spectra.from_list_column(table.column("sum_w")).astype(np.float64),
                    spectra.from_list_column(table.column("sum_wx")).astype(np.float64))
