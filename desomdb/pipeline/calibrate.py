"""The error model of the label fits, and coverage of truth by calibrated node intervals.

pPXF reports no formal error for mass-weighted age, [M/H] or M*/L (they are sums over the
template weights), so the fits' uncertainty is estimated by re-fitting, per S/N bin
(:data:`SNR_EDGES`, on ``baxels.snr``), a seeded sample of up to ``per_bin`` labelled baxels
(status ok, chi2_ok, newest release of each cube):

- **statistical**: ``refits`` Monte-Carlo re-fits of each spectrum with Gaussian noise drawn
  from its own ``ivar`` added to the observed flux (masked bins untouched). In the linear
  regime the re-fit minus the original fit has the variance of the fit itself, so
  ``sigma_stat² = mean over baxels and re-fits of (refit − fit)²``.
- **systematic (fit set-up)**: the same spectrum fitted with the other continuum set-ups the
  fitter supports (:data:`ALTERNATIVES`: no regularisation, ten times the default
  regularisation). Where the data do not constrain a label, the answer follows the
  regularisation prior, the degenerate direction along which a different template library
  also moves it; ``sigma_sys² = mean of (alternative − fit)²``.
  ``fitting.fit_spectrum`` fits one library (MIUSCAT) only, and the bundled BC03 has no
  living-mass table (no mass-weighted age or [M/H] from it), so the scatter between two
  libraries is not part of this term.
- ``sigma = sqrt(sigma_stat² + sigma_sys²)``, in the label's own unit (Gyr for age, dex for
  [M/H], M*/L_r and sSFR, mag for E(B−V), km/s for σ_*). A bin without a calibration baxel
  borrows the nearest calibrated bin's values (its ``n_baxels`` is 0).

The table ``label_errors`` (one file per release and fitter) holds σ per (fitter, label, S/N
bin); :mod:`desomdb.pipeline.node_labels` convolves each node member with its σ to give
``lo68``/``hi68``. :func:`calibrate` writes the table and then rebuilds ``node_labels`` of every
assigned model. It is one unit of work: a killed run leaves the archive unchanged and is
simply run again (a few hundred fits).

:func:`coverage` is the fraction of truths inside their intervals; :func:`node_coverage` applies
it to held-out baxels of a mock survey (``truth`` table) and their nodes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.archive.writer import Writer
from desomdb.atomic import read_parquet
from desomdb.errors import ArchiveError, ConfigError
from desomdb.pipeline import node_labels
from desomdb.query import views
from desomdb.runtime import runner
from desomdb.science import fitting, label_catalogue, spectra

#: S/N bin edges on ``baxels.snr`` (the paper's training cut at 10, the binning target 20).
SNR_EDGES = (0.0, 10.0, 20.0, 40.0, float("inf"))
#: Continuum set-ups whose spread around the default fit is the systematic term.
ALTERNATIVES = {"noregul": fitting.FitOptions(regul=0.0),
                "regul100": fitting.FitOptions(regul=100.0)}


@dataclass(frozen=True)
class CalibrationReport:
    """Outcome of :func:`calibrate`.

    Attributes
    ----------
    n_baxels : int
        Calibration baxels fitted.
    n_fits : int
        pPXF fits run (1 + ``refits`` + ``len(ALTERNATIVES)`` per baxel).
    errors : polars.DataFrame
        The error model written: release, fitter, label, snr_lo, snr_hi, n_baxels,
        sigma_stat, sigma_sys, sigma.
    models : list of str
        Models whose ``node_labels`` were rebuilt.
    """

    n_baxels: int
    n_fits: int
    errors: pl.DataFrame
    models: list[str]


@dataclass(frozen=True)
class CalibrateTask:
    """One calibration baxel, sent to a worker.

    Attributes
    ----------
    release, plateifu : str
    bin_id : int
    flux : ndarray, shape (4544,), float64
        Rest-frame flux density, 1e-17 erg/s/cm^2/Å (not normalised).
    ivar : ndarray, shape (4544,), float32
        Inverse variance of ``flux``.
    mask : ndarray, shape (4544,), uint8
        1 = masked bin.
    norm_flux : float
        Mean flux in 4050-4150 Å (``baxels.norm_flux``).
    z : float
        drpall redshift.
    refits : int
        Noise re-draws to fit.
    seed : int
        Seed of the re-draws (from the baxel's key, so a rerun draws the same noise).
    fitter : str
        A key of :data:`fitting.FITTERS`.
    """

    release: str
    plateifu: str
    bin_id: int
    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    norm_flux: float
    z: float
    refits: int
    seed: int
    fitter: str


def _calibration_task(task: CalibrateTask) -> dict[str, Any]:
    """Worker: fit one spectrum as is, with ``refits`` noise draws and each alternative.

    Returns
    -------
    dict
        ``base``, ``refits`` (list) and ``alternatives`` (list): label → value.
    """
    flux, ivar, mask = task.flux, task.ivar, task.mask
    rng = np.random.default_rng(task.seed)
    good = (mask == 0) & (ivar > 0) & np.isfinite(flux)
    sd = np.where(good, 1.0 / np.sqrt(np.where(ivar > 0, ivar, 1.0)), 0.0)

    def fit(fluxes: list[np.ndarray], options: fitting.FitOptions | None = None
            ) -> list[dict[str, float]]:
        n = len(fluxes)
        rows = fitting.fit_spectra(np.array(fluxes), np.repeat(ivar[None], n, axis=0),
                                   np.repeat(mask[None], n, axis=0),
                                   np.full(n, task.norm_flux), task.z, options=options,
                                   fitter=task.fitter)
        return [{k: float(row[k]) if row["status"] == "ok" else float("nan")
                 for k in label_catalogue.NODE_LABELS} for row in rows]

    # The spectrum and its noise draws in one call: one batch for the batched fitter.
    base, *refits = fit([flux] + [flux + rng.normal(size=flux.size) * sd
                                  for _ in range(task.refits)])
    alternatives = [fit([flux], opt)[0] for opt in ALTERNATIVES.values()]
    return {"base": base, "refits": refits, "alternatives": alternatives}


def _mean_square(base: list[dict[str, float]], other: list[list[dict[str, float]]],
                 label: str) -> float:
    """Mean of (other − base)² over baxels and their variants, ignoring missing values."""
    d = np.array([o[label] - b[label] for b, os in zip(base, other, strict=True) for o in os])
    d = d[np.isfinite(d)]
    return float(np.mean(d**2)) if d.size else float("nan")


def error_model(results: list[dict[str, Any]], snr: np.ndarray) -> pl.DataFrame:
    """Pool re-fit results into σ(label | S/N bin).

    Parameters
    ----------
    results : list of dict
        One :func:`_calibration_task` result per calibration baxel.
    snr : ndarray, shape (n,)
        Their ``baxels.snr``.

    Returns
    -------
    polars.DataFrame
        label, snr_lo, snr_hi, n_baxels, sigma_stat, sigma_sys, sigma (one row per label and
        bin of :data:`SNR_EDGES`; empty bins borrow the nearest calibrated bin).
    """
    edges = np.asarray(SNR_EDGES)
    which = np.clip(np.searchsorted(edges, snr, side="right") - 1, 0, edges.size - 2)
    rows = []
    for label in label_catalogue.NODE_LABELS:
        stat = np.full(edges.size - 1, np.nan)
        sys_ = np.full(edges.size - 1, np.nan)
        count = np.zeros(edges.size - 1, dtype=np.int64)
        for k in range(edges.size - 1):
            sel = [r for r, w in zip(results, which, strict=True) if w == k]
            count[k] = len(sel)
            if sel:
                base = [r["base"] for r in sel]
                stat[k] = _mean_square(base, [r["refits"] for r in sel], label)
                sys_[k] = _mean_square(base, [r["alternatives"] for r in sel], label)
        known = np.flatnonzero(np.isfinite(stat) & np.isfinite(sys_))
        for k in range(edges.size - 1):
            src = k
            if known.size and k not in known:
                src = int(known[np.argmin(np.abs(known - k))])
            s2, y2 = stat[src], sys_[src]
            rows.append({"label": label, "snr_lo": float(edges[k]), "snr_hi": float(edges[k + 1]),
                         "n_baxels": int(count[k]), "sigma_stat": float(np.sqrt(s2)),
                         "sigma_sys": float(np.sqrt(y2)), "sigma": float(np.sqrt(s2 + y2))})
    return pl.DataFrame(rows)


def _sample(con: Any, fitter_id: str, per_bin: int, seed: int) -> pl.DataFrame:
    """Pick up to ``per_bin`` baxels labelled by ``fitter_id`` per S/N bin (seeded)."""
    cand = con.sql(
        "select l.release, l.plateifu, l.bin_id, b.snr, b.norm_flux, g.z from labels l "
        "semi join latest_cubes c on l.release = c.release and l.plateifu = c.plateifu "
        "join baxels b using (release, plateifu, bin_id) "
        "join galaxies g using (release, plateifu) "
        f"where l.status = 'ok' and l.chi2_ok and l.fitter = '{fitter_id}' "
        "order by l.release, l.plateifu, l.bin_id").pl()
    edges = np.asarray(SNR_EDGES)
    which = np.clip(np.searchsorted(edges, cand["snr"].to_numpy(), side="right") - 1, 0,
                    edges.size - 2)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for k in range(edges.size - 1):
        idx = np.flatnonzero(which == k)
        keep += sorted(rng.choice(idx, size=min(per_bin, idx.size), replace=False).tolist())
    return cand[sorted(keep)]


def calibrate(archive: str | Path, per_bin: int = 8, refits: int = 4, seed: int = 0,
              workers: int = 2, scheduler: str | None = None, progress: bool = True
              ) -> CalibrationReport:
    """Estimate σ(label | S/N) of each fitter by re-fitting a sample; rebuild ``node_labels``.

    Every fitter of :data:`desomdb.pipeline.labels.FITTERS` with labels in the archive gets its own
    error model (labels of fitters this version no longer runs get none: their node members
    leave ``lo68``/``hi68`` null).

    Parameters
    ----------
    archive : str or Path
        An archive with ``labels`` (run ``desomdb label`` first).
    per_bin : int
        Calibration baxels per S/N bin (:data:`SNR_EDGES`) and fitter.
    refits : int
        Monte-Carlo noise re-fits per baxel (≥ 1).
    seed : int
        Seeds the sample and the noise draws.
    workers : int
        Local processes for the fits.
    scheduler : str, optional
        Dask scheduler address.
    progress : bool

    Returns
    -------
    CalibrationReport

    Raises
    ------
    ArchiveError
        If the archive has no labels, none passes the cuts, or a calibration fit fails.
    ConfigError
        If ``per_bin`` or ``refits`` is below 1.
    """
    if per_bin < 1 or refits < 1:
        raise ConfigError(f"per_bin ({per_bin}) and refits ({refits}) must be at least 1")
    arch = Archive(archive)
    if not arch.has_table("labels"):
        raise ArchiveError(f"{arch.root}: no labels yet; run 'desomdb label {arch.root}' first")
    names = {fid: name for name, fid in fitting.FITTERS.items()}
    con = views.connect(arch.root, raw=True)
    try:
        present = [r[0] for r in con.sql("select distinct fitter from labels order by 1")
                   .fetchall() if r[0] in names]
        samples = {fid: _sample(con, fid, per_bin, seed) for fid in present}
    finally:
        con.close()
    samples = {fid: smp for fid, smp in samples.items() if smp.height}
    if not samples:
        raise ArchiveError(f"{arch.root}: no baxel of fitter {sorted(names)} passes "
                           "chi2_red < 2 to calibrate on; run 'desomdb label' first")
    staged, frames, n_baxels = [], [], 0
    for fid, sample in samples.items():
        tasks = _tasks(arch, sample, names[fid], refits, seed)
        run = runner.run_tasks(_calibration_task, tasks, workers=workers, scheduler=scheduler,
                               desc=f"calibration fits ({fid})", progress=progress,
                               labels=[f"{t.plateifu}:{t.bin_id}" for t in tasks])
        if run.failures:
            first = run.failures[0]
            raise ArchiveError(f"{arch.root}: calibration fit {first.label} failed "
                               f"({first.error}); fix it and run 'desomdb calibrate' again")
        release = str(sample["release"].max())
        errors = error_model(list(run.results), sample["snr"].to_numpy()).with_columns(
            pl.lit(release).alias("release"), pl.lit(fid).alias("fitter"))
        frames.append(errors)
        staged.append((release, fid, errors.drop("release")))
        n_baxels += len(tasks)
    models = sorted({paths.parse_partition(str(f.relative_to(arch.root)))[2]
                     for f in arch.files("assignments")})
    with arch.writer("desomdb calibrate") as writer:
        for release, fid, table in staged:
            replace_error_model(writer, release, fid, table)
        for model_id in models:
            node_labels.write_node_labels(writer, arch, model_id)
    n_fits = n_baxels * (1 + refits + len(ALTERNATIVES))
    return CalibrationReport(n_baxels, n_fits, pl.concat(frames), models)


def replace_error_model(writer: Writer, release: str, fitter: str, table: pl.DataFrame
                        ) -> None:
    """Commit a fitter's error model of a release, dropping the one it replaces.

    A new file name each time (tagged with the manifest generation): committed files never
    change under their name.

    Parameters
    ----------
    writer : Writer
    release, fitter : str
    table : polars.DataFrame
        The ``label_errors`` rows (without ``release``, the partition column).
    """
    arch = writer.archive
    old = [(paths.LABEL_ERRORS, str(f.relative_to(arch.root)))
           for f in arch.files(paths.LABEL_ERRORS, release=release)
           if paths.parse_label_errors_name(f.name) == fitter]
    name = paths.label_errors_name(fitter, arch.generation() + 1)
    target = paths.release_file(paths.LABEL_ERRORS, release, name)
    writer.commit(add=[writer.stage_table(paths.LABEL_ERRORS, table.to_arrow(), target)],
                  remove=old)


def _tasks(arch: Archive, sample: pl.DataFrame, fitter: str, refits: int,
           seed: int) -> list[CalibrateTask]:
    """One task per calibration baxel, with its spectrum read from the spectra files."""
    files = arch.cube_files("spectra")
    tasks: list[CalibrateTask] = []
    for (release, plateifu), group in sample.group_by("release", "plateifu",
                                                      maintain_order=True):
        table = read_parquet(files[(str(release), str(plateifu))])
        ids = table.column("bin_id").to_numpy()
        pos = {int(b): i for i, b in enumerate(ids)}
        rows = [pos[int(b)] for b in group["bin_id"]]
        sub = table.take(pa.array(rows))
        flux = spectra.from_list_column(sub.column("flux"))
        ivar = spectra.from_list_column(sub.column("ivar"))
        mask = spectra.from_list_column(sub.column("mask"))
        for j, r in enumerate(group.iter_rows(named=True)):
            key = f"{release}/{plateifu}/{r['bin_id']}/{seed}".encode()
            tasks.append(CalibrateTask(
                release=str(release), plateifu=str(plateifu), bin_id=int(r["bin_id"]),
                flux=flux[j].astype(np.float64), ivar=ivar[j], mask=mask[j],
                norm_flux=float(r["norm_flux"]), z=float(r["z"]), refits=refits,
                seed=zlib.crc32(key), fitter=fitter))
    return tasks


def coverage(truth: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """Fraction of truths inside their closed intervals ``[lo, hi]``.

    Parameters
    ----------
    truth, lo, hi : ndarray, shape (n,)
        True values and interval bounds (same unit); rows with any non-finite entry are left
        out.

    Returns
    -------
    float
        In [0, 1]; NaN when no row is usable.
    """
    truth, lo, hi = (np.asarray(a, dtype=float) for a in (truth, lo, hi))
    ok = np.isfinite(truth) & np.isfinite(lo) & np.isfinite(hi)
    if not ok.any():
        return float("nan")
    return float(np.mean((truth[ok] >= lo[ok]) & (truth[ok] <= hi[ok])))


@dataclass(frozen=True)
class Coverage:
    """Coverage of mock truth by node intervals for one label.

    Attributes
    ----------
    label : str
    n : int
        Held-out baxels with a truth and a node interval.
    calibrated : float
        Fraction with truth in the node's [lo68, hi68].
    members : float
        Fraction with truth in the node's [p16, p84] (the members' spread alone).
    fit : float
        Fraction with truth within the baxel's own fit ± σ (error model of its S/N bin).
    median_offset : float
        Median of (node median − truth).
    total : float
        Fraction with truth in the node's total interval [lo68_total, hi68_total] (NaN
        without those columns).
    """

    label: str
    n: int
    calibrated: float
    members: float
    fit: float
    median_offset: float
    total: float = float("nan")


def held_out_intervals(archive: str | Path, model_id: str, held_out: str,
                       label_names: tuple[str, ...] = label_catalogue.NODE_LABELS) -> pl.DataFrame:
    """Truth, fit and node intervals of held-out baxels of a mock survey.

    The node intervals are computed from the other members only (``not held_out``), so a
    held-out baxel's own fit never describes its node.

    Parameters
    ----------
    archive : str or Path
        A mock-survey archive (``truth`` table) with labels, the model's assignments and,
        for ``lo68``/``hi68``, ``label_errors``.
    model_id : str
    held_out : str
        SQL condition on ``a`` (assignments) selecting the held-out baxels, e.g.
        ``a.plateifu in (...)``; they count where they pass the label's cuts.
    label_names : tuple of str

    Returns
    -------
    polars.DataFrame
        label, node, truth, fit, sigma (the error model's σ for the baxel), and its node's
        median, p16, p84, lo68, hi68, lo68_total, hi68_total; one row per held-out baxel and
        label whose node has other members.
    """
    arch = Archive(archive)
    if not arch.has_table("truth"):
        raise ArchiveError(f"{arch.root}: no truth table; coverage needs a mock survey archive")
    nl = pl.from_arrow(node_labels.node_label_table(arch, model_id, where=f"not ({held_out})"))
    assert isinstance(nl, pl.DataFrame)
    nl = nl.select("node", "label", "median", "p16", "p84", "lo68", "hi68", "lo68_total",
                   "hi68_total")
    con = views.connect(arch.root, raw=True)
    quoted = "'" + model_id.replace("'", "''") + "'"
    has_errors = bool(arch.files(paths.LABEL_ERRORS))
    frames = []
    try:
        for label in label_names:
            flag = label_catalogue.CUTS.get(label)
            cut = f" and l.{flag}" if flag else ""
            sigma = ("(select sqrt(avg(e.sigma * e.sigma)) from label_errors e where "
                     "e.fitter = l.fitter and e.label = '" + label + "' and b.snr >= e.snr_lo "
                     "and b.snr < e.snr_hi)") if has_errors else "null::double"
            held = con.sql(
                f"select '{label}' as label, a.node::integer as node, "
                f"t.{label_catalogue.TRUTH_COLUMNS[label]}::double as truth, "
                f"l.{label}::double as fit, "
                f"{sigma}::double as sigma from assignments a "
                "semi join latest_cubes c on a.release = c.release and a.plateifu = c.plateifu "
                "join preferred_labels l using (release, plateifu, bin_id) "
                "join baxels b using (release, plateifu, bin_id) "
                "join truth t using (release, plateifu, bin_id) "
                f"where a.model_id = {quoted} and l.status = 'ok' and l.chi2_ok{cut} "
                f"and isfinite(l.{label}) and ({held_out})").pl()
            frames.append(held.join(nl, on=["node", "label"], how="inner"))
    finally:
        con.close()
    return pl.concat(frames)


def summarise(rows: pl.DataFrame, label_names: tuple[str, ...] = label_catalogue.NODE_LABELS
              ) -> list[Coverage]:
    """Coverage per label of :func:`held_out_intervals` rows (possibly several concatenated)."""
    out = []
    for label in label_names:
        j = rows.filter(pl.col("label") == label)
        t = j["truth"].to_numpy()
        f, s = j["fit"].to_numpy(), j["sigma"].to_numpy().astype(float)
        out.append(Coverage(
            label, j.height,
            coverage(t, j["lo68"].to_numpy().astype(float), j["hi68"].to_numpy().astype(float)),
            coverage(t, j["p16"].to_numpy(), j["p84"].to_numpy()),
            coverage(t, f - s, f + s),
            float(np.nanmedian(j["median"].to_numpy() - t)) if j.height else float("nan"),
            coverage(t, j["lo68_total"].to_numpy().astype(float),
                     j["hi68_total"].to_numpy().astype(float))
            if "lo68_total" in j.columns else float("nan")))
    return out


@dataclass(frozen=True)
class NodeCoverage:
    """How coverage spreads over a label's nodes (held-out baxels per node).

    Attributes
    ----------
    label : str
    nodes : int
        Populated nodes: at least ``min_members`` held-out baxels with a truth and an
        interval.
    at_least_half : float
        Fraction of those nodes whose [lo68, hi68] covers the truth of ≥ 50 % of them.
    total_at_least_half : float
        The same for [lo68_total, hi68_total].
    """

    label: str
    nodes: int
    at_least_half: float
    total_at_least_half: float


def node_level(rows: pl.DataFrame, min_members: int = 5,
               label_names: tuple[str, ...] = label_catalogue.NODE_LABELS
               ) -> list[NodeCoverage]:
    """Per label, the share of populated nodes whose intervals cover ≥ 50 % of their truths.

    Parameters
    ----------
    rows : polars.DataFrame
        :func:`held_out_intervals` rows (possibly several concatenated).
    min_members : int
        Held-out baxels (with a finite interval) a node needs to count.
    """
    out = []
    for label in label_names:
        j = rows.filter((pl.col("label") == label) & pl.col("truth").is_not_null()
                        & pl.col("truth").is_not_nan())
        shares = []
        for lo, hi in (("lo68", "hi68"), ("lo68_total", "hi68_total")):
            k = j.filter(pl.col(lo).is_not_null() & pl.col(hi).is_not_null()).with_columns(
                inside=(pl.col("truth") >= pl.col(lo)) & (pl.col("truth") <= pl.col(hi)))
            per = k.group_by("node").agg(pl.len().alias("n"), pl.col("inside").mean())
            per = per.filter(pl.col("n") >= min_members)
            shares.append((per.height, float(np.mean(per["inside"].to_numpy() >= 0.5))
                           if per.height else float("nan")))
        out.append(NodeCoverage(label, shares[0][0], shares[0][1], shares[1][1]))
    return out


def node_coverage(archive: str | Path, model_id: str, held_out: str,
                  label_names: tuple[str, ...] = label_catalogue.NODE_LABELS) -> list[Coverage]:
    """Coverage of the truth of held-out baxels by the intervals of their nodes.

    :func:`held_out_intervals` summarised by :func:`summarise`; parameters as there.

    Returns
    -------
    list of Coverage
    """
    return summarise(held_out_intervals(archive, model_id, held_out, label_names), label_names)
