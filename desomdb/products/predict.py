"""Labels for new spectra from their DESOM-1 node, in milliseconds instead of a pPXF fit.

Input: a FITS file in the MaNGA DAP test-spectra layout (HDUs WAVE, FLUX, IVAR, MASK, Z;
observed frame, any log-uniform vacuum grid, resampled here to the archive's rest-frame grid)
or a Parquet file with the archive's ``spectra`` columns (``flux``, ``mask`` and optionally
``ivar``, ``norm_flux`` and a ``wave_rest_aa`` column to check the grid; rest frame, already on
the archive's 4544-bin grid). A file on another grid or of another length is refused.

Output: per spectrum, its node, the latent distance, whether that distance is beyond the
training set's 99th percentile (``out_of_distribution``), and the node's label distribution
(median, p16, p84 of each label in ``node_labels``, and the calibrated interval lo68-hi68,
the one to quote as the label's uncertainty). A spectrum the network cannot judge
gets no node and no labels, and a ``reason``: fewer than ``min_good_bins`` good bins, no good
bin in the 4050-4150 Å normalisation window, or a non-positive mean flux there. Such a
spectrum would otherwise encode as (nearly) all zeros and land on one confident node.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from astropy.io import fits

from desomdb.archive.store import Archive
from desomdb.atomic import read_parquet
from desomdb.errors import ConfigError, InputDataError
from desomdb.science import spectra
from desomdb.som import registry
from desomdb.som.inference import encode_all, nearest_nodes
from desomdb.som.registry import load_model
from desomdb.survey import manga

#: Default fewest good rest-frame bins (of 4544) for a spectrum to get a node. The paper
#: trains on spectra with at least 3900; with fewer than ~1000 the encoder sees mostly the
#: zeros of masked bins, and the node says more about the mask than about the galaxy.
MIN_GOOD_BINS = 1000
#: Node statistics returned per label (``<label>_<stat>``): the members' median and 16th/84th
#: percentiles, and the calibrated 68 % interval (null until 'desomdb calibrate' has run).
NODE_STATS = ("median", "p16", "p84", "lo68", "hi68", "lo68_total", "hi68_total")
#: Wavelength columns a Parquet file may carry to state its grid.
WAVE_COLUMNS = ("wave_rest_aa", "wave")

_WINDOW = f"{spectra.NORM_WINDOW_AA[0]:.0f}-{spectra.NORM_WINDOW_AA[1]:.0f} Å"
REST_GRID = (f"{spectra.N_REST} log-spaced bins {spectra.REST_MIN_AA:.0f}-"
             f"{spectra.REST_MAX_AA:.0f} Å rest frame, vacuum")
OBSERVED_GRID = (f"observed-frame vacuum Å on a log-uniform grid (e.g. the MaNGA LOGCUBE's "
                 f"{manga.N_WAVE} pixels from {manga.WAVE0_AA:.1f} Å, Δlog10 λ = "
                 f"{manga.DLOG10:g}), with one FLUX, IVAR and MASK row and one Z per spectrum")


@dataclass(frozen=True)
class RestSpectra:
    """Spectra on the archive's rest-frame grid, not yet normalised.

    Attributes
    ----------
    flux : ndarray, shape (n, 4544), float64
        Rest-frame flux density, 1e-17 erg/s/cm^2/Å; 0 where masked.
    mask : ndarray, shape (n, 4544), uint8
        1 where masked (including bins whose flux or ivar is unusable).
    norm : ndarray, shape (n,), float64
        Mean flux over good bins in 4050-4150 Å (given or computed); NaN if none is good.
    """

    flux: np.ndarray
    mask: np.ndarray
    norm: np.ndarray


def read_spectra_file(path: str | Path) -> RestSpectra:
    """Read a FITS (observed frame) or Parquet (rest frame) spectra file onto the rest grid.

    Raises
    ------
    InputDataError
        Missing or unreadable file, missing HDUs or columns, or spectra on another
        wavelength grid or of another length (the message states the grid expected).
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: spectra file not found")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    return _read_fits(path)


def _read_parquet(path: Path) -> RestSpectra:
    try:
        t = read_parquet(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputDataError(f"{path}: not a readable Parquet file ({exc})") from exc
    missing = {"flux", "mask"} - set(t.column_names)
    if missing:
        raise InputDataError(f"{path}: needs columns flux and mask (one list of "
                             f"{spectra.N_REST} values per spectrum: {REST_GRID}, as in the "
                             f"archive's spectra table); missing {sorted(missing)}")
    flux = _list_matrix(path, t, "flux").astype(np.float64)
    bad = (_list_matrix(path, t, "mask", fill=1) != 0) | ~np.isfinite(flux)
    if "ivar" in t.column_names:
        ivar = _list_matrix(path, t, "ivar")
        bad |= ~(ivar > 0)
    for name in WAVE_COLUMNS:
        if name in t.column_names:
            wave = _list_matrix(path, t, name)
            if not np.allclose(wave, spectra.rest_wave_aa()[None, :], rtol=1e-6, atol=0):
                raise InputDataError(f"{path}: column {name} is not the archive's wavelength "
                                     f"grid; expected {REST_GRID} (resample first, or give "
                                     "observed-frame spectra as a FITS file with WAVE and Z)")
    flux = np.where(bad, 0.0, flux)
    mask = bad.astype(np.uint8)
    norm = t.column("norm_flux").to_numpy(zero_copy_only=False).astype(np.float64) \
        if "norm_flux" in t.column_names else spectra.norm_flux(flux, mask)
    return RestSpectra(flux, mask, norm)


def _list_matrix(path: Path, t: pa.Table, name: str, fill: float | None = None) -> np.ndarray:
    """Read a list column of ``N_REST`` values per row as (n, N_REST) (nulls -> NaN or fill)."""
    col = t.column(name).combine_chunks()
    typ = col.type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)
            or pa.types.is_fixed_size_list(typ)):
        raise InputDataError(f"{path}: column {name} is {typ}, not one list of values per "
                             f"spectrum; expected {REST_GRID}")
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputDataError(f"{path}: column {name} is null in row {row}; give every spectrum "
                             f"{spectra.N_REST} values ({REST_GRID})")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(lengths != spectra.N_REST)
    if wrong.size:
        raise InputDataError(f"{path}: column {name} has {lengths[wrong[0]]} values in row "
                             f"{int(wrong[0])} ({wrong.size} of {len(col)} rows have another "
                             "length); expected "
                             f"{REST_GRID} (resample first, or give observed-frame spectra as a "
                             "FITS file with WAVE and Z)")
    values = pc.list_flatten(col)
    if fill is not None:
        values = pc.fill_null(values, fill)
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64).reshape(
        len(col), spectra.N_REST)


def _read_fits(path: Path) -> RestSpectra:
    try:
        with fits.open(path) as hdul:
            data = {name: hdul[name].data for name in ("WAVE", "FLUX", "IVAR", "MASK", "Z")}
    except (KeyError, OSError) as exc:
        raise InputDataError(f"{path}: expected HDUs WAVE, FLUX, IVAR, MASK, Z "
                             f"(mangadap test-spectra layout): {exc}") from exc
    empty = [name for name, value in data.items() if value is None]
    if empty:
        raise InputDataError(f"{path}: HDU {empty[0]} holds no data; expected {OBSERVED_GRID}")
    wave = np.asarray(data["WAVE"], dtype=np.float64)
    _check_observed_grid(path, wave)
    flux, ivar, bits = (np.atleast_2d(np.asarray(data[k])) for k in ("FLUX", "IVAR", "MASK"))
    z = np.atleast_1d(np.asarray(data["Z"], dtype=np.float64))
    for name, arr in (("FLUX", flux), ("IVAR", ivar), ("MASK", bits)):
        if arr.ndim != 2 or arr.shape != (z.size, wave.size):
            raise InputDataError(f"{path}: {name} has shape {arr.shape}, not ({z.size}, "
                                 f"{wave.size}) as WAVE ({wave.size} pixels) and Z ({z.size} "
                                 f"redshifts) imply; expected {OBSERVED_GRID}")
    if not np.all(np.isfinite(z) & (z > -1)):
        raise InputDataError(f"{path}: Z must be finite and > -1 for every spectrum")
    _check_rest_coverage(path, wave, z)
    if not np.issubdtype(bits.dtype, np.integer):
        raise InputDataError(f"{path}: MASK is {bits.dtype}, expected integer "
                             "MANGA_DRP3PIXMASK bits")
    flux_r, _, mask, norm = spectra.observed_to_rest(wave, flux.astype(np.float64),
                                                     ivar.astype(np.float64),
                                                     bits.astype(np.int64), z)
    return RestSpectra(flux_r.astype(np.float64), mask, norm)


def _check_rest_coverage(path: Path, wave: np.ndarray, z: np.ndarray) -> None:
    """Refuse a file none of whose spectra reach the normalisation window in the rest frame.

    A log-uniform WAVE in other units (nm, say) passes :func:`_check_observed_grid` but
    lands outside the archive's grid; name both grids rather than report a NaN flux.
    """
    lo, hi = wave[0] / (1 + z), wave[-1] / (1 + z)
    if np.any((lo <= spectra.NORM_WINDOW_AA[0]) & (hi >= spectra.NORM_WINDOW_AA[1])):
        return
    raise InputDataError(
        f"{path}: WAVE spans {wave[0]:.4g}-{wave[-1]:.4g} (rest frame {lo.min():.4g}-"
        f"{hi.max():.4g} at the given Z), so no spectrum reaches the {_WINDOW} normalisation "
        f"window of the archive's {REST_GRID}; expected {OBSERVED_GRID} (is WAVE in Å?)")


def _check_observed_grid(path: Path, wave: np.ndarray) -> None:
    """Refuse a WAVE that the log-grid resampler would misread."""
    if wave.ndim != 1 or wave.size < 2:
        problem = f"shape {wave.shape}"
    elif not np.all(np.isfinite(wave)) or np.any(wave <= 0):
        problem = "non-finite or non-positive values"
    else:
        step = np.diff(np.log10(wave))
        if np.any(step <= 0):
            problem = "not increasing"
        elif not np.allclose(step, np.median(step), rtol=1e-3, atol=0):
            problem = (f"not log-uniform (Δlog10 λ from {step.min():.3g} to "
                       f"{step.max():.3g})")
        else:
            return
    raise InputDataError(f"{path}: WAVE is {problem}; expected {OBSERVED_GRID}, which is "
                         f"resampled to the archive's {REST_GRID}")


def screen(spec: RestSpectra, min_good_bins: int = MIN_GOOD_BINS
           ) -> tuple[np.ndarray, list[str | None]]:
    """Which spectra the network can judge, and why not the others.

    Parameters
    ----------
    spec : RestSpectra
    min_good_bins : int
        Fewest good rest-frame bins (of 4544) a spectrum needs.

    Returns
    -------
    n_good : ndarray, shape (n,), int32
        Good (unmasked) bins per spectrum.
    reasons : list of str or None
        ``None`` for a spectrum to predict, else why it gets no node.
    """
    wave = spectra.rest_wave_aa()
    window = (wave >= spectra.NORM_WINDOW_AA[0]) & (wave <= spectra.NORM_WINDOW_AA[1])
    good = spec.mask == 0
    n_good = good.sum(axis=1).astype(np.int32)
    in_window = good[:, window].any(axis=1)
    reasons: list[str | None] = []
    for n, has_window, norm in zip(n_good, in_window, spec.norm, strict=True):
        if n < min_good_bins:
            reasons.append(f"only {n} good bins < min {min_good_bins}")
        elif not has_window:
            reasons.append(f"no good pixel in the {_WINDOW} normalisation window")
        elif not (np.isfinite(norm) and norm > 0):
            reasons.append(f"mean flux in the {_WINDOW} normalisation window is {norm:.3g}, "
                           "not positive")
        else:
            reasons.append(None)
    return n_good, reasons


def predict(archive: str | Path, spectra_file: str | Path, model_id: str | None = None,
            device: str = "cpu", min_good_bins: int = MIN_GOOD_BINS) -> pl.DataFrame:
    """Node and label distributions for the spectra in ``spectra_file``.

    Parameters
    ----------
    archive : str or Path
    spectra_file : str or Path
        FITS (observed frame) or Parquet (rest frame); see the module docstring.
    model_id : str, optional
        DESOM-1 model (default: the current one).
    device : str
    min_good_bins : int
        Spectra with fewer good rest-frame bins (of 4544) get no node (default
        :data:`MIN_GOOD_BINS`).

    Returns
    -------
    polars.DataFrame
        One row per input spectrum: ``index``, ``node``, ``row``, ``col``, ``distance``,
        ``out_of_distribution``, ``n_good``, ``reason`` and ``<label>_median/_p16/_p84``
        (the node members' distribution), ``<label>_lo68/_hi68`` (the calibrated 68 %
        interval that also carries the fits' own errors, :mod:`desomdb.pipeline.node_labels`)
        and ``<label>_lo68_total/_hi68_total`` (the same with the template-library term: for
        a galaxy whose stars are not the templates').
        Where ``reason`` is set (the spectrum cannot be judged) node, distance and labels
        are null.

    Raises
    ------
    InputDataError
        For an unreadable file or spectra on another grid (see :func:`read_spectra_file`).
    ConfigError
        For ``min_good_bins`` outside 0-4544.
    """
    if not 0 <= min_good_bins <= spectra.N_REST:
        raise ConfigError(f"min_good_bins must be between 0 and {spectra.N_REST}, got "
                          f"{min_good_bins}")
    arch = Archive(archive)
    model_id = registry.resolve_model(arch, model_id)
    model, payload = load_model(arch, model_id, device)
    spec = read_spectra_file(spectra_file)
    n_good, reasons = screen(spec, min_good_bins)
    ok = np.array([r is None for r in reasons], dtype=bool)
    n = len(reasons)
    best = np.zeros(n, np.int64)
    dist = np.full(n, np.nan, np.float32)
    t0 = time.perf_counter()
    if ok.any():
        x, _ = spectra.normalise(spec.flux[ok], spec.mask[ok], spec.norm[ok])
        found = nearest_nodes(model, encode_all(model, x, device), device)
        best[ok] = found.best
        dist[ok] = found.distance
    seconds = time.perf_counter() - t0
    p99 = payload["metrics"].get("distance_p99", np.inf)
    cols = model.cfg.map_cols
    judged = pl.col("reason").is_null()
    out = pl.DataFrame({
        "index": np.arange(n), "node": best.astype(np.int32),
        "row": (best // cols).astype(np.int32), "col": (best % cols).astype(np.int32),
        "distance": dist, "out_of_distribution": dist > p99, "n_good": n_good,
        "reason": pl.Series(reasons, dtype=pl.String),
    }).with_columns(
        pl.when(judged).then(pl.col(c)).alias(c)
        for c in ("node", "row", "col", "distance", "out_of_distribution")
    )
    if arch.files("node_labels", model_id=model_id):
        nl = pl.from_arrow(arch.read("node_labels", model_id=model_id))
        assert isinstance(nl, pl.DataFrame)
        # node_labels written before calibrated (or total) intervals existed
        nl = nl.with_columns(pl.lit(None, pl.Float64).alias(c) for c in NODE_STATS
                             if c not in nl.columns)
        wide = nl.pivot(on="label", index="node", values=list(NODE_STATS))
        wide = wide.rename({c: _wide_name(c) for c in wide.columns if c != "node"})
        out = out.join(wide.with_columns(pl.col("node").cast(pl.Int32)), on="node", how="left")
    per_spectrum = seconds / max(int(ok.sum()), 1)
    return out.with_columns(pl.lit(per_spectrum).alias("seconds_per_spectrum"))


def _wide_name(col: str) -> str:
    """``<stat>_<label>`` (polars' pivot) -> ``<label>_<stat>``."""
    stat = max((s for s in NODE_STATS if col.startswith(s + "_")), key=len)
    return f"{col[len(stat) + 1:]}_{stat}"
