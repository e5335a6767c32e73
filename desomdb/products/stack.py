"""``desomdb stack``: inverse-variance-weighted stacked spectra of any selection, fitted.

A selection is a SQL condition over the ``baxel_labels`` view (a node, a label cut, a list of
galaxies, a radius range ...), restricted to the newest version of every cube
(``latest_cubes``), so each cube is counted once. It is stacked as a whole (``by='none'``)
or per node or per galaxy (``by='node'|'mangaid'``).

Conventions
-----------
- What is stacked: each baxel's normalised rest-frame spectrum ``x = flux / norm_flux`` with
  weights ``w = ivar · norm_flux²`` (the inverse variance of ``x``), 0 on masked bins; the
  stack is ``Σ w x / Σ w`` per bin and its inverse variance ``Σ w``
  (:mod:`desomdb.science.coadd`, the definition the node co-adds use). A bin with ``Σ w = 0`` is
  masked in the stack: masked bins never leak into it. The stack is dimensionless (in units
  of each member's 4050–4150 Å mean flux).
- Node co-adds: where a selection holds *every* member of a node in a cube, the stored
  per-cube partial sums (table ``node_partials``) are used instead of re-reading those
  spectra — the same numbers, so the stack of a whole node equals ``nodes.coadd``.
- ``mean_snr``: the mean of the members' ``baxels.snr`` (g-band S/N per pixel);
  ``snr_stack``: the median over unmasked bins of ``x·sqrt(Σw)`` of the stack.
- ``lsf_fwhm``: the rest-frame MaNGA LSF FWHM (Å) of the stack, per bin the mean of the
  members' rest-frame LSFs (``manga.rest_lsf_fwhm_aa`` at each cube's redshift) weighted like
  the flux (by ``w``). The stack is fitted with the template set of the redshift bucket whose
  rest-frame LSF is closest to it (``z_eff``, median absolute FWHM difference over the
  unmasked bins).
- The fit: :func:`desomdb.pipeline.labels.fit_spectrum` with ``norm_flux = 1``, the same labels and
  emission-line conventions as every baxel. ``log_mstar`` is left NaN (a stack of normalised
  spectra has no absolute flux); line fluxes are in units of the normalised flux × Å;
  ``log_ssfr`` (a ratio, the distance cancels) and everything dimensionless keep their
  meaning.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.atomic import read_parquet
from desomdb.errors import ConfigError, QueryError
from desomdb.query import views
from desomdb.science import coadd, spectra
from desomdb.som import registry
from desomdb.survey import manga

BY = ("none", "node", "mangaid")
#: Redshift buckets the labels use (``fitting.fit_setup`` rounds z to 0.005).
Z_BUCKET = 0.005
_KEY = ["release", "plateifu"]


@dataclass
class Stack:
    """One stacked spectrum and its fit.

    Attributes
    ----------
    group : str or int or None
        The node, the mangaid, or None for ``by='none'``.
    n_members, n_cubes : int
        Baxels and cubes stacked.
    flux : ndarray, shape (4544,), float64
        Σ w x / Σ w, normalised flux (dimensionless); NaN where masked.
    ivar : ndarray, shape (4544,), float64
        Σ w, inverse variance of ``flux``; 0 where masked.
    lsf_fwhm : ndarray, shape (4544,), float64
        Weighted mean rest-frame LSF FWHM, Å; NaN where masked.
    mean_snr : float
        Mean ``baxels.snr`` of the members.
    snr_stack : float
        Median ``flux · sqrt(ivar)`` over unmasked bins.
    z_eff : float
        Redshift bucket whose rest-frame LSF matches ``lsf_fwhm`` best (used for the fit).
    from_partials : int
        Members whose contribution came from stored node partial sums.
    labels : dict
        The labels row of the fit (empty when not fitted).
    """

    group: str | int | None
    n_members: int
    n_cubes: int
    flux: np.ndarray
    ivar: np.ndarray
    lsf_fwhm: np.ndarray
    mean_snr: float
    snr_stack: float
    z_eff: float
    from_partials: int = 0
    labels: dict[str, Any] = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        """Masked bins (no weight), shape (4544,), bool."""
        return np.asarray(~(self.ivar > 0))


@dataclass
class StackResult:
    """Stacks of one selection.

    Attributes
    ----------
    stacks : list of Stack
    where, by : str
        The selection and the grouping.
    model_id : str or None
        The DESOM-1 model whose nodes the selection saw.
    seconds : float
        Wall time of selection + stacking (fits excluded).
    fit_seconds : float
    shifted : bool
        Members were shifted to their own stellar rest frames (``shift_velocity``).
    n_without_velocity : int
        Selected baxels left out of a shifted stack because they have no fitted ``vel``.
    """

    stacks: list[Stack]
    where: str
    by: str
    model_id: str | None
    seconds: float
    fit_seconds: float = 0.0
    shifted: bool = False
    n_without_velocity: int = 0


class _Acc:
    """Running sums of one group."""

    def __init__(self) -> None:
        self.sum_w = np.zeros(spectra.N_REST)
        self.sum_wx = np.zeros(spectra.N_REST)
        self.sum_w_lsf = np.zeros(spectra.N_REST)
        self.n = 0
        self.cubes: set[tuple[str, str]] = set()
        self.snr_sum = 0.0
        self.from_partials = 0

    def add(self, sum_w: np.ndarray, sum_wx: np.ndarray, n: int, lsf: np.ndarray,
            cube: tuple[str, str], snr_sum: float, partial: bool) -> None:
        self.sum_w += sum_w
        self.sum_wx += sum_wx
        self.sum_w_lsf += sum_w * lsf
        self.n += n
        self.cubes.add(cube)
        self.snr_sum += snr_sum
        if partial:
            self.from_partials += n


def selection_sql(where: str, velocity: bool = False) -> str:
    """Compose the one SELECT a stack's selection runs (it passes the ``desomdb sql`` guard).

    Parameters
    ----------
    where : str
        A SQL condition over ``baxel_labels`` columns.
    velocity : bool
        Also select each baxel's fitted stellar velocity ``vel`` (km/s).
    """
    return (
        "with sel as (select release, plateifu, bin_id, node, mangaid, snr, norm_flux"
        f"{', vel' if velocity else ''} from baxel_labels where ({where})) "
        "select sel.*, c.z from sel join cubes as c using (release, plateifu) "
        "where (sel.release, sel.plateifu) in (select release, plateifu from latest_cubes)"
    )


def stack(archive: str | Path, where: str = "true", by: str = "none", model_id: str | None = None,
          fit: bool = True, use_partials: bool = True, shift_velocity: bool = False
          ) -> StackResult:
    """Stack the spectra of a selection (inverse-variance weighted) and fit each stack.

    Parameters
    ----------
    archive : str or Path
    where : str
        SQL condition over ``baxel_labels`` (e.g. ``"node = 3"``, ``"age_mw_gyr > 8 and
        chi2_ok"``, ``"mangaid in ('1-1', '1-2')"``, ``"radius_re between 0.5 and 1"``).
    by : {"none", "node", "mangaid"}
        One stack of everything, one per node, or one per galaxy.
    model_id : str, optional
        DESOM-1 model whose nodes ``node`` refers to (default: current).
    fit : bool
        Fit each stack with pPXF (:func:`desomdb.pipeline.labels.fit_spectrum`).
    use_partials : bool
        Use stored node partial sums for whole (cube, node) groups (same result, faster).
    shift_velocity : bool
        Shift every member to its own stellar rest frame by its fitted ``vel``
        (:func:`desomdb.science.coadd.shift_to_rest`) before stacking, so rotation does not broaden
        the stack. Members without a fit are left out (``StackResult.n_without_velocity``);
        stored partial sums are not used (they hold unshifted spectra).

    Returns
    -------
    StackResult

    Raises
    ------
    QueryError
        If ``where`` is refused by the read-only guard (e.g. a second statement) or names
        unknown columns.
    ConfigError
        Unknown ``by``, or an empty selection (or no member has a fitted velocity).
    """
    if by not in BY:
        raise ConfigError(f"--by {by!r} unknown; one of {', '.join(BY)}")
    t0 = time.perf_counter()
    arch = Archive(archive)
    model = registry.resolve_model(arch, model_id) if model_id else registry.current_model(arch)
    con = views.connect(arch.root, model=model)
    try:
        sel = views.query(con, selection_sql(where, shift_velocity)).pl()
        if by == "node":
            sel = sel.filter(pl.col("node").is_not_null())
        if sel.height == 0:
            raise ConfigError(f"the selection `{where}` holds no baxels of the newest cubes"
                              f"{' with a node' if by == 'node' else ''}; check it with "
                              f"desomdb sql \"select count(*) from baxel_labels where {where}\"")
        n_without = 0
        if shift_velocity:
            fitted = sel.filter(pl.col("vel").is_not_null() & pl.col("vel").is_finite())
            n_without, sel, use_partials = sel.height - fitted.height, fitted, False
            if sel.height == 0:
                raise ConfigError(f"no baxel of the selection `{where}` has a fitted velocity; "
                                  "label them first ('desomdb label ARCHIVE --max-per-cube 0' "
                                  "fits every baxel) or stack without --shift-velocity")
        sel = sel.with_columns(
            pl.lit(None).alias("group") if by == "none" else pl.col(by).alias("group"))
        partials = (_partials(con, arch, model, sel) if (use_partials and model is not None)
                    else None)
    finally:
        con.close()
    accs: dict[Any, _Acc] = defaultdict(_Acc)
    lsfs: dict[float, np.ndarray] = {}
    wave = spectra.rest_wave_aa()

    def lsf_at(z: float) -> np.ndarray:
        if z not in lsfs:
            lsfs[z] = manga.rest_lsf_fwhm_aa(wave, z)
        return lsfs[z]

    read = sel
    if partials:  # whole (cube, node) groups come from the stored sums, in one pass
        groups = (sel.filter(pl.col("node").is_not_null())
                  .group_by([*_KEY, "node"], maintain_order=True)
                  .agg(pl.len().alias("n"),
                       pl.col("snr").fill_null(np.nan).sum().alias("snr_sum"),
                       pl.col("group").first(), pl.col("z").first()))
        whole = []
        for release, plateifu, node, n, snr_sum, group, z in groups.iter_rows():
            part = partials.get((release, plateifu), {}).get(int(node))
            if part is None or part[0] != n:
                continue  # the selection holds only some of the node's members in the cube
            accs[group].add(part[1], part[2], part[0], lsf_at(float(z)),
                            (str(release), str(plateifu)), float(snr_sum), True)
            whole.append((release, plateifu, node))
        if whole:
            done = pl.DataFrame(whole, schema=sel.select([*_KEY, "node"]).schema, orient="row")
            read = sel.join(done, on=[*_KEY, "node"], how="anti", maintain_order="left")
    files = arch.cube_files("spectra")
    for (release, plateifu), rows in read.group_by(_KEY, maintain_order=True):
        cube = (str(release), str(plateifu))
        _add_spectra(accs, files[cube], rows, lsf_at(float(rows["z"][0])), cube)
    stacks = [_finish(group, acc) for group, acc in accs.items()]
    stacks.sort(key=lambda s: (s.group is None, str(s.group) if by == "mangaid"
                               else (s.group if s.group is not None else 0)))
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    if fit:
        for s in stacks:
            s.labels = fit_stack(s)
    return StackResult(stacks, where, by, model, seconds, time.perf_counter() - t1,
                       shift_velocity, n_without)


def _partials(con: views.ReadOnlyConnection, arch: Archive, model: str, sel: pl.DataFrame
              ) -> dict[tuple[str, str], dict[int, tuple[int, np.ndarray, np.ndarray]]] | None:
    """Read the stored node partial sums of the selected cubes and nodes (None if none).

    Only the selected cubes' part files are opened (a compacted file is always read), and
    only rows of the selected nodes are decoded: assign writes a few nodes per row group, so
    the ``node`` filter skips the others by their statistics. DuckDB reads the files on the
    selection's connection (0.25 s for 480 cubes against 0.34-0.40 s with a pyarrow dataset).
    The files are those of the connection's own snapshot of the manifest (``files_node_partials``),
    so partial sums committed after it are not mixed with the selection it gave.
    """
    listed = con.sql("select getvariable('files_node_partials')").fetchall()[0][0]
    files = [Path(f) for f in listed or []]
    files = [f for f in files if paths.parse_partition(str(f.relative_to(arch.root)))[2] == model]
    nodes = sel["node"].drop_nulls().unique().sort().to_list()
    if not files or not nodes:
        return None
    cubes = set(sel.select(_KEY).unique().iter_rows())
    chosen = [str(f) for f in files
              if (cube := paths.model_part_cube(f.name)) is None or cube in cubes]
    if not chosen:
        return None
    table = con.sql(
        "select * exclude (model_id) from read_parquet($files, hive_partitioning = true, "
        "union_by_name = getvariable('union_node_partials')) "
        f"where node in ({', '.join(str(int(n)) for n in nodes)}) "
        "order by release, plateifu, node", params={"files": chosen}).to_arrow_table()
    if table.num_rows == 0:
        return {}
    keys = pc.binary_join_element_wise(table.column("release"), table.column("plateifu"), "/")
    key = keys.to_pylist()
    starts = [i for i in range(len(key)) if i == 0 or key[i] != key[i - 1]]
    out: dict[tuple[str, str], dict[int, tuple[int, np.ndarray, np.ndarray]]] = {}
    for first, stop in zip(starts, [*starts[1:], len(key)], strict=True):
        release, plateifu = key[first].split("/", 1)
        if (release, plateifu) not in cubes:
            continue  # a compacted file's other cubes
        part = coadd.from_table(table.slice(first, stop - first))
        out[(release, plateifu)] = {
            int(node): (int(n), part.sum_w[i], part.sum_wx[i])
            for i, (node, n) in enumerate(zip(part.node, part.n_members, strict=True))}
    return out


def _add_spectra(accs: dict[Any, _Acc], file: Path, rows: pl.DataFrame, lsf: np.ndarray,
                 cube: tuple[str, str]) -> None:
    """Read the selected baxels of one cube and add them to their groups."""
    table = read_parquet(file, columns=["bin_id", "flux", "ivar", "mask"])
    ids = table.column("bin_id").to_numpy()
    want = rows["bin_id"].to_numpy()
    pos = {int(b): i for i, b in enumerate(ids)}
    missing = [int(b) for b in want if int(b) not in pos]
    if missing:
        raise QueryError(f"{file}: bins {missing[:5]} of the selection are not in the spectra "
                         "file; run 'desomdb check' on the archive")
    idx = np.array([pos[int(b)] for b in want])
    take = table.take(pa.array(idx))
    x, w = coadd.weighted(spectra.from_list_column(take.column("flux")),
                          spectra.from_list_column(take.column("ivar")),
                          spectra.from_list_column(take.column("mask")),
                          rows["norm_flux"].to_numpy())
    if "vel" in rows.columns:
        x, w = coadd.shift_to_rest(x, w, rows["vel"].to_numpy())
    groups = rows["group"].to_list()
    snr = rows["snr"].fill_null(np.nan).to_numpy()
    for g in dict.fromkeys(groups):
        sel = np.array([v == g for v in groups])
        ws = w[sel].astype(np.float64)
        accs[g].add(ws.sum(0), (ws * x[sel]).sum(0), int(sel.sum()), lsf, cube,
                    float(np.nansum(snr[sel])), False)


def _finish(group: Any, acc: _Acc) -> Stack:
    good = acc.sum_w > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = np.where(good, acc.sum_wx / acc.sum_w, np.nan)
        lsf = np.where(good, acc.sum_w_lsf / acc.sum_w, np.nan)
    snr = float(np.median(flux[good] * np.sqrt(acc.sum_w[good]))) if good.any() else float("nan")
    if isinstance(group, (np.integer, int)) and not isinstance(group, bool):
        group = int(group)
    return Stack(group, acc.n, len(acc.cubes), flux, np.where(good, acc.sum_w, 0.0), lsf,
                 acc.snr_sum / acc.n if acc.n else float("nan"), snr, effective_z(lsf),
                 acc.from_partials)


def effective_z(lsf_fwhm: np.ndarray, z_max: float = 0.2) -> float:
    """Redshift bucket whose rest-frame MaNGA LSF is closest to ``lsf_fwhm``.

    Parameters
    ----------
    lsf_fwhm : ndarray, shape (4544,)
        Rest-frame FWHM per bin, Å (NaN where masked).
    z_max : float
        Largest bucket tried.

    Returns
    -------
    float
        A multiple of 0.005 (the buckets the fit's template sets are prepared for).
    """
    wave = spectra.rest_wave_aa()
    good = np.isfinite(lsf_fwhm)
    if not good.any():
        return float("nan")
    zs = np.arange(0.0, z_max + Z_BUCKET / 2, Z_BUCKET)
    cost = [np.median(np.abs(manga.rest_lsf_fwhm_aa(wave[good], z) - lsf_fwhm[good]))
            for z in zs]
    return float(round(zs[int(np.argmin(cost))], 4))


def fit_stack(s: Stack) -> dict[str, Any]:
    """Fit a stack like a baxel (:func:`desomdb.pipeline.labels.fit_spectrum`, ``norm_flux = 1``).

    Returns
    -------
    dict
        The labels row; ``log_mstar`` NaN (normalised spectra carry no absolute flux).
    """
    from desomdb.science import fitting

    flux = np.where(s.ivar > 0, s.flux, 0.0).astype(np.float32)
    row = fitting.fit_spectrum(flux, s.ivar.astype(np.float32), s.mask.astype(np.uint8), 1.0,
                              s.z_eff if np.isfinite(s.z_eff) else 0.0)
    row["log_mstar"] = float("nan")
    return row
