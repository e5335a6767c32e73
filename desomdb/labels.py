"""pPXF labels for every baxel: stellar populations, dust, gas, sSFR and d_BPT.

The science of one spectrum is :func:`fit_spectrum`; :func:`label` runs it over an archive.

Fit set-up and conventions
--------------------------
- Input: the archive's rest-frame spectrum (4544 log bins, 59.2 km/s each, vacuum),
  divided by ``norm_flux``; masked bins excluded via ``goodpixels``.
- Stellar templates: the bundled MIUSCAT library (every second age up to 14.1 Gyr × 4
  [M/H] = 96 SSPs), convolved to the MaNGA LSF of the cube's redshift moved to the rest
  frame, and normalised by one scalar so pPXF weights are *mass* weights (initial mass).
- Stellar dust: pPXF's ``dust`` with the Calzetti (2000) curve (1 parameter, A_V), no
  additive and no multiplicative polynomial (``degree=-1, mdegree=0``): reddening and a
  multiplicative polynomial are degenerate and are never combined. E(B-V)_* = A_V / 4.05.
- Gas: pPXF ``emission_lines(vacuum=True, tie_balmer=False)`` (Balmer lines free; [OII],
  [OIII], [OI], [NII], [SII]) in one kinematic component, not attenuated in the fit, so
  the measured fluxes are the observed (attenuated) ones.
- ``age_mw_gyr`` and ``mh_mw``: weighted by current stellar mass (living + remnants),
  linear in Gyr and dex — the mock truth's convention.
- ``log_ml_r``: log10 M*/L_r, SDSS r, living + remnant mass, dust-free
  (``sps_lib.mass_to_light``).
- ``ebv_gas``: Balmer decrement, Cardelli (1989), intrinsic Hα/Hβ = 2.86 (NaN unless Hα
  and Hβ are both detected at S/N > 2).
- ``log_ssfr``: SFR from the dust-corrected Hα luminosity, Kennicutt (1998, Salpeter, as
  the templates), divided by the stellar mass of the same fit (pPXF mass weights times the
  flux scale; the distance cancels in the ratio). The Hα correction uses ``ebv_gas`` when
  measured, else E(B-V)_* / 0.44 (Calzetti 2000), never below 0. Valid where ``ssfr_ok``.
- ``d_bpt``: :func:`desomdb.emission.d_bpt` of the four measured fluxes; valid where
  ``bpt_ok``.
- Line fluxes: 1e-17 erg/s/cm^2 (pPXF ``gas_flux`` × pixel width in Å × norm_flux; the
  [OIII] and [NII] doublet templates are split 1 : 0.33). Errors are formal errors scaled by
  sqrt(chi2_red).
- ``vel``: stellar velocity (km/s) relative to the drpall redshift; ``sigma``: stellar
  dispersion (km/s), instrumental broadening removed by the template convolution.
- Selection flags (stored, never deletions): ``chi2_ok`` = chi2_red < 2; ``ssfr_ok`` =
  Hα S/N > 2; ``bpt_ok`` = Hβ, [OIII]5007, Hα, [NII]6583 all at S/N > 2.
"""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from desomdb import dust, emission, manga, paths, runner, spectra, templates
from desomdb.archive import Archive, StagedFile
from desomdb.constants import COSMOLOGY, FWHM_PER_SIGMA, L_SUN_ERG_S, MPC_CM
from desomdb.errors import ArchiveError, ConfigError

FITTER = "ppxf-miuscat-v1"
SN_MIN = 2.0
CHI2_MAX = 2.0
MIN_GOOD_PIXELS = 1000
LINE_KEYS = {"hb": "Hbeta", "oiii5007": "OIII5007", "ha": "Halpha", "nii6583": "NII6583"}
_PPXF_NAMES = {"hb": "Hbeta", "oiii5007": "[OIII]5007_d", "ha": "Halpha",
               "nii6583": "[NII]6583_d"}
_DOUBLET_STRONG = 1 / 1.33  # pPXF's [OIII], [NII] doublet templates: weak line at 0.33


@dataclass
class FitSetup:
    """Templates prepared once per (worker, redshift bucket)."""

    sps: Any
    stars: np.ndarray  # (n_pix_temp, n_stars)
    gas: np.ndarray  # (n_pix_temp, n_gas)
    gas_names: np.ndarray
    reg_dim: tuple[int, int]
    ln_lam_temp: np.ndarray
    lam_temp: np.ndarray
    velscale: float
    mass_scale: float = field(default=1.0)


def _rest_fwhm(z: float) -> Any:
    """MaNGA FWHM (Å) in the rest frame of redshift ``z``, as a function of rest λ."""

    def fwhm(lam_rest: np.ndarray) -> np.ndarray:
        lam_obs = np.asarray(lam_rest) * (1 + z)
        return np.asarray(FWHM_PER_SIGMA * manga.lsf_sigma_aa(lam_obs) / (1 + z))

    return fwhm


@lru_cache(maxsize=8)
def fit_setup(z_bucket: float) -> FitSetup:
    """Prepare stellar and gas templates for redshifts near ``z_bucket`` (cached).

    Parameters
    ----------
    z_bucket : float
        Redshift rounded to 0.005; the LSF changes by < 1 % within a bucket.
    """
    from ppxf import ppxf_util

    full = templates.load()
    wave = spectra.rest_wave_aa()
    velscale = manga.C_KMS * np.log(wave[1] / wave[0])
    # Every second age up to 14.2 Gyr (96 templates): pPXF cost grows with the template count.
    young_enough = np.flatnonzero(full.ages_gyr <= 14.2)
    keep = np.zeros(full.ages_gyr.size, dtype=bool)
    keep[young_enough[::2]] = True
    lib = full.with_ages(keep)
    lam_fwhm = lib.lam_vac_aa
    fwhm_gal = {"lam": lam_fwhm, "fwhm": _rest_fwhm(z_bucket)(lam_fwhm)}
    sps = lib.sps_lib(velscale, fwhm_gal=fwhm_gal,
                      lam_range=[wave[0] / 1.02, wave[-1] * 1.02])
    reg_dim = sps.templates.shape[1:]
    stars = sps.templates.reshape(sps.templates.shape[0], -1)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the line list
        gas, names, _ = ppxf_util.emission_lines(
            sps.ln_lam_temp, [wave[0], wave[-1]], _rest_fwhm(z_bucket), tie_balmer=False,
            vacuum=True,
        )
    return FitSetup(sps, stars, gas, np.asarray(names), reg_dim, sps.ln_lam_temp,
                    sps.lam_temp, velscale, float(np.ravel(sps.flux)[0]))


def empty_row() -> dict[str, Any]:
    """Return a labels row with every quantity missing."""
    row: dict[str, Any] = dict.fromkeys(
        ("age_mw_gyr", "mh_mw", "log_ml_r", "log_mstar", "ebv_star", "ebv_gas", "log_ssfr",
         "d_bpt", "vel", "sigma", "vel_gas", "sigma_gas", "chi2_red"), np.nan)
    for key in LINE_KEYS:
        row[f"flux_{key}"] = np.nan
        row[f"flux_{key}_err"] = np.nan
        row[f"sn_{key}"] = np.nan
    row.update(n_good_pix=0, chi2_ok=False, ssfr_ok=False, bpt_ok=False, status="failed",
               error="", fit_seconds=0.0)
    return row


def fit_spectrum(
    flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray, norm_flux: float, z: float
) -> dict[str, Any]:
    """Fit one rest-frame baxel spectrum with pPXF and derive its labels.

    Parameters
    ----------
    flux, ivar : ndarray, shape (4544,), float32
        Rest-frame flux density (1e-17 erg/s/cm^2/Å, not normalised) and inverse variance.
    mask : ndarray, shape (4544,), uint8
        1 = masked bin.
    norm_flux : float
        Mean flux in 4050-4150 Å (``baxels.norm_flux``).
    z : float
        drpall redshift (sets the LSF and the luminosity distance).

    Returns
    -------
    dict
        One labels row (see module docstring); ``status`` is ``ok``, ``unfittable`` (too few
        good pixels or no positive normalisation) or ``failed`` (with ``error``).
    """
    from ppxf.ppxf import ppxf

    row = empty_row()
    t0 = time.perf_counter()
    good = (mask == 0) & (ivar > 0) & np.isfinite(flux)
    row["n_good_pix"] = int(good.sum())
    if good.sum() < MIN_GOOD_PIXELS or not (np.isfinite(norm_flux) and norm_flux > 0):
        row["status"] = "unfittable"
        row["error"] = (f"{int(good.sum())} good bins (need {MIN_GOOD_PIXELS}) "
                        f"and norm_flux {norm_flux}")
        return row
    setup = fit_setup(round(round(z / 0.005) * 0.005, 4))
    wave = spectra.rest_wave_aa()
    galaxy = np.where(good, flux / norm_flux, 0.0)
    noise = np.where(good, 1.0 / np.sqrt(np.where(ivar > 0, ivar, 1.0)) / norm_flux, 0.0)
    noise[~good] = np.median(noise[good]) * 1e3  # pPXF needs finite noise everywhere
    n_stars = setup.stars.shape[1]
    n_gas = setup.gas.shape[1]
    component = np.array([0] * n_stars + [1] * n_gas)
    gas_component = component > 0
    stellar_dust = {"start": [0.3], "bounds": [[0.0, 4.0]], "component": ~gas_component}
    pp = ppxf(
        np.column_stack([setup.stars, setup.gas]), galaxy, noise, setup.velscale,
        [[0.0, 100.0], [0.0, 60.0]], moments=[2, 2], degree=-1, mdegree=0,
        component=component, gas_component=gas_component, gas_names=setup.gas_names,
        lam=wave, lam_temp=setup.lam_temp, dust=[stellar_dust],
        goodpixels=np.flatnonzero(good), quiet=True, linear_method="lsq_box",
    )
    weights = pp.weights[~gas_component].reshape(setup.reg_dim)
    chi2 = float(pp.chi2)
    row["chi2_red"] = chi2
    row["vel"], row["sigma"] = float(pp.sol[0][0]), float(pp.sol[0][1])
    row["vel_gas"], row["sigma_gas"] = float(pp.sol[1][0]), float(pp.sol[1][1])
    row["ebv_star"] = float(pp.dust[0]["sol"][0]) / dust.CALZETTI_RV

    sps = setup.sps
    current = weights * sps.mass_no_gas_grid
    if current.sum() > 0:
        row["age_mw_gyr"] = float((current * sps.age_grid).sum() / current.sum())
        row["mh_mw"] = float((current * sps.metal_grid).sum() / current.sum())
        row["log_ml_r"] = float(np.log10(sps.mass_to_light(weights, band="SDSS/r", quiet=True)))
    # Initial mass per unit weight: galaxy units × norm_flux × 1e-17 × 4π D_L² / L_sun.
    d_l = COSMOLOGY.luminosity_distance(z).value * MPC_CM
    flux_to_lum = norm_flux * 1e-17 * 4 * np.pi * d_l**2  # erg/s per (galaxy unit × Å)
    mstar = current.sum() / setup.mass_scale * flux_to_lum / L_SUN_ERG_S
    row["log_mstar"] = float(np.log10(mstar)) if mstar > 0 else np.nan

    dlnlam = np.log(wave[1] / wave[0])
    names = list(pp.gas_names)
    err_scale = np.sqrt(max(chi2, 1.0))
    fluxes = {}
    for key, pname in _PPXF_NAMES.items():
        j = names.index(pname)
        lam = emission.LINES_AA[LINE_KEYS[key]]
        share = _DOUBLET_STRONG if pname.endswith("_d") else 1.0
        f = float(pp.gas_flux[j]) * lam * dlnlam * norm_flux * share
        e = float(pp.gas_flux_error[j]) * lam * dlnlam * norm_flux * share * err_scale
        row[f"flux_{key}"], row[f"flux_{key}_err"] = f, e
        row[f"sn_{key}"] = f / e if e > 0 else np.nan
        fluxes[key] = f
    sn = {k: row[f"sn_{k}"] for k in LINE_KEYS}
    balmer_ok = sn["ha"] > SN_MIN and sn["hb"] > SN_MIN
    row["ebv_gas"] = float(dust.ebv_gas_from_balmer(fluxes["ha"], fluxes["hb"])) \
        if balmer_ok else np.nan
    ebv_corr = row["ebv_gas"] if balmer_ok else row["ebv_star"] / 0.44
    ha_corr = fluxes["ha"] / float(dust.nebular_transmission(dust.HALPHA_AA, max(ebv_corr, 0.0))[0])
    sfr = float(emission.sfr_from_halpha(ha_corr * 1e-17 * 4 * np.pi * d_l**2))
    if sfr > 0 and mstar > 0:
        row["log_ssfr"] = float(np.log10(sfr / mstar))
    with np.errstate(divide="ignore", invalid="ignore"):
        row["d_bpt"] = float(emission.d_bpt(np.log10(fluxes["nii6583"] / fluxes["ha"]),
                                            np.log10(fluxes["oiii5007"] / fluxes["hb"]))[0])
    row["chi2_ok"] = bool(chi2 < CHI2_MAX)
    row["ssfr_ok"] = bool(sn["ha"] > SN_MIN)
    row["bpt_ok"] = bool(all(v > SN_MIN for v in sn.values()))
    row["status"] = "ok"
    row["fit_seconds"] = time.perf_counter() - t0
    return row


def _label_task(task: dict[str, Any]) -> str:
    """Worker: fit every baxel of one cube; write the rows to a staged Parquet file."""
    table = pq.read_table(task["spectra_file"])
    bax = {r["bin_id"]: r for r in task["baxels"]}
    ids = table.column("bin_id").to_numpy()
    flux = spectra.from_list_column(table.column("flux"))
    ivar = spectra.from_list_column(table.column("ivar"))
    mask = spectra.from_list_column(table.column("mask"))
    rows = []
    for i, bin_id in enumerate(ids):
        if int(bin_id) not in bax:
            continue
        try:
            row = fit_spectrum(flux[i], ivar[i], mask[i], bax[int(bin_id)]["norm_flux"],
                               task["z"])
        except Exception as exc:  # one bad fit is recorded, the cube goes on
            row = empty_row()
            row["error"] = f"{type(exc).__name__}: {exc}"
        row.update(plateifu=task["plateifu"], bin_id=int(bin_id), fitter=FITTER)
        rows.append(row)
    out = Path(task["staged"])
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out, compression="zstd")
    return str(out)


@dataclass
class LabelReport:
    """Outcome of a labelling job."""

    n_cubes: int = 0
    n_skipped_cubes: int = 0
    n_fits: int = 0
    n_failed_fits: int = 0
    failed_cubes: list[tuple[str, str]] = field(default_factory=list)
    fit_seconds: float = 0.0


def label(
    archive: str | Path,
    release: str | None = None,
    workers: int = 2,
    scheduler: str | None = None,
    progress: bool = True,
    plateifus: list[str] | None = None,
    max_per_cube: int | None = None,
) -> LabelReport:
    """Fit every not-yet-labelled baxel of the archive (one task per cube).

    Parameters
    ----------
    archive : str or Path
    release : str, optional
        Only this release (default: all).
    workers : int
        Local processes (single-threaded BLAS each).
    scheduler : str, optional
        Dask scheduler address.
    progress : bool
    plateifus : list of str, optional
        Only these cubes.
    max_per_cube : int, optional
        Fit at most this many baxels per cube (evenly spaced in bin_id) — for quick looks
        such as the demo; the default fits every baxel.

    Returns
    -------
    LabelReport
    """
    arch = Archive(archive)
    manifest_tables = arch.manifest()["tables"]
    releases = sorted({paths.parse_partition(f)[2] for f in manifest_tables.get("baxels", [])})
    if release is not None:
        release = manga.release(release).name
        if release not in releases:
            raise ConfigError(f"{arch.root}: no release {release!r}; it has {releases}")
        releases = [release]
    if not releases:
        raise ArchiveError(f"{arch.root}: no baxels yet; run 'desomdb ingest' first")
    report = LabelReport()
    with arch.writer("desomdb label") as writer:
        staging = writer.staging_dir("labels")
        tasks: list[dict[str, Any]] = []
        targets: list[str] = []
        names: list[str] = []
        for rel in releases:
            done = set()
            if arch.files("labels", release=rel):
                lab = pl.from_arrow(arch.read("labels", columns=["plateifu"], release=rel))
                done = set(lab["plateifu"].unique())  # type: ignore[index]
            bax = pl.from_arrow(arch.read("baxels", columns=["plateifu", "bin_id", "norm_flux"],
                                          release=rel))
            gal = pl.from_arrow(arch.read("galaxies", columns=["plateifu", "z"], release=rel))
            z_of = dict(zip(gal["plateifu"], gal["z"], strict=True))  # type: ignore[index]
            spec_files = {f.name.split("-", 1)[1].rsplit("-", 1)[0]: f
                          for f in arch.files("spectra", release=rel)}
            for plateifu, group in bax.group_by("plateifu", maintain_order=True):  # type: ignore[union-attr]
                pifu = str(plateifu[0])
                if plateifus is not None and pifu not in plateifus:
                    continue
                if pifu in done:
                    report.n_skipped_cubes += 1
                    continue
                if max_per_cube is not None and group.height > max_per_cube:
                    keep = np.linspace(0, group.height - 1, max_per_cube).round().astype(int)
                    group = group[np.unique(keep)]
                name = paths.label_part_name(pifu, FITTER)
                tasks.append({
                    "plateifu": pifu, "z": float(z_of[pifu]),
                    "spectra_file": str(spec_files[pifu]),
                    "baxels": group.select("bin_id", "norm_flux").to_dicts(),
                    "staged": str(staging / rel / name),
                })
                targets.append(f"{paths.release_dir('labels', rel)}/{name}")
                names.append(pifu)

        def on_result(i: int, staged: str) -> None:
            writer.commit(add=[StagedFile("labels", targets[i], Path(staged))])

        run = runner.run_tasks(_label_task, tasks, workers=workers, scheduler=scheduler,
                               desc="pPXF labels (cubes)", progress=progress,
                               labels=names, on_result=on_result)
        report.n_cubes = len(tasks) - len(run.failures)
        report.failed_cubes = [(f.label, f.error) for f in run.failures]
    for rel in releases:
        if not arch.files("labels", release=rel):
            continue
        lab = pl.from_arrow(arch.read("labels", columns=["status", "fit_seconds"], release=rel))
        report.n_fits += lab.height  # type: ignore[union-attr]
        report.n_failed_fits += int((lab["status"] == "failed").sum())  # type: ignore[index]
        report.fit_seconds += float(lab["fit_seconds"].sum())  # type: ignore[index]
    return report
