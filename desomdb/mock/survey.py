"""Mock MaNGA survey: DRP LOGCUBEs, a drpall table and per-spaxel truth, from real SSPs.

Layout written (as on the SDSS archive)::

    OUT/<release>/<plate>/stack/manga-<plate>-<ifudsgn>-LOGCUBE.fits.gz
    OUT/<release>/drpall-<drpver>.fits
    OUT/<release>/truth-<release>.parquet

The cube format follows the DRP data model (see :mod:`desomdb.survey.manga`); the physics is in
:mod:`desomdb.mock.galaxy`. Noise: per-pixel variance = source/G + sky(λ)² (G = 20000 in flux
units of 1e-17 erg/s/cm^2/Å), spatially correlated by a Gaussian kernel of 1.18 spaxels so
that the noise of an n-spaxel sum is underestimated by ~4.2 at large n, as Law et al. (2016)
found for MaNGA; IVAR is the per-spaxel variance the DRP would report (no covariance).

Beyond the templates' rest-frame range (3481-9432 Å vacuum) the continuum is a power law
fitted to the last 200 Å; that happens only outside the 3650-8950 Å window the archive uses.
Same seed, same bytes: every cube uses its own ``numpy`` generator seeded by
(seed, galaxy index) and is gzipped with a zero timestamp.

Template library (``library``): ``miuscat`` (default) renders from the library the fits use,
so label accuracy measured on it is an upper limit; ``bc03`` renders the same galaxies from
Bruzual & Charlot (2003) SSPs (Chabrier IMF, STELIB, 3 Å FWHM) and ``mastar`` from the MaStar
SSPs (Maraston et al. 2020, empirical MaNGA-resolution spectra; light-weighted truth only;
see :mod:`desomdb.science.templates_build`), which the fits never see. Stellar spectra are convolved
from the library's own resolution to the MaNGA LSF plus the stellar dispersion; where the library
is coarser than that (BC03's 3 Å against MaNGA's ~2.5 Å rest-frame FWHM in the blue) the
spectrum keeps the library's width, and the cube's DISP/LSFPOST and SPECRES record this
effective LSF, max(MaNGA, library), so the file tells the truth about its resolution; ingest
stores it and the fits use it. ``lsf_scale`` renders a survey at another resolution than the
nominal MaNGA one (a later DRP, another instrument setting).
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from astropy.table import Table

from desomdb.archive import paths
from desomdb.atomic import atomic_write, read_parquet
from desomdb.errors import ConfigError
from desomdb.mock.galaxy import GalaxyParams, draw_galaxy
from desomdb.mock.render import render_cube, write_cube
from desomdb.mock.truth import rules as truth_rules
from desomdb.runtime import runner
from desomdb.science import sidecar, templates
from desomdb.survey import manga


@dataclass(frozen=True)
class SurveyResult:
    """Where :func:`generate_survey` wrote things."""

    release_dir: Path
    drpall_path: Path
    truth_path: Path
    n_cubes: int


def generate_survey(
    out: str | Path,
    n_galaxies: int,
    release: str = "DR15",
    seed: int = 0,
    workers: int = 1,
    ifu_sizes: tuple[int, ...] = (19, 37, 61, 91, 127),
    scheduler: str | None = None,
    progress: bool = True,
    previous: str | None = None,
    reprocess: float = 0.25,
    library: str = "miuscat",
    lsf_scale: float = 1.0,
) -> SurveyResult:
    """Write a mock survey of ``n_galaxies`` cubes with known truth.

    With ``previous`` the survey is the next data release of an earlier one written to the
    same ``out`` with the same ``seed``: its galaxies come first (same plateifu and
    mangaid); a fraction ``reprocess`` of their cubes is re-rendered in this release's format
    with a new noise realisation (a reprocessed cube: new checksum), the rest are copied byte
    for byte (unchanged cubes), and the remaining ``n_galaxies - n_previous`` galaxies are new.

    Parameters
    ----------
    out : str or Path
        Survey root; the release folder is created inside it.
    n_galaxies : int
        Number of galaxies (one cube each).
    release : str
        ``DR15`` (DISP/PREDISP HDUs) or ``DR17`` (LSFPOST/LSFPRE).
    seed : int
        Random seed; the same seed gives byte-identical files.
    workers : int
        Local processes (ignored when ``scheduler`` is given).
    ifu_sizes : tuple of int
        IFU fibre counts to draw from (19, 37, 61, 91, 127).
    scheduler : str, optional
        Dask scheduler address ``tcp://HOST:PORT``.
    progress : bool
        Show a progress bar.
    previous : str, optional
        Name of the earlier release folder under ``out`` (e.g. ``DR15``).
    reprocess : float
        Fraction (0-1) of the previous release's cubes to re-process.
    library : str
        SSP library the spectra are rendered from: ``miuscat`` (the fitting library),
        ``bc03`` (a second library; truth weighted by initial mass) or ``mastar`` (a third;
        light-weighted truth only, see :mod:`desomdb.mock.truth`).
    lsf_scale : float
        The cubes' LSF as a multiple of the nominal MaNGA LSF (``manga.lsf_sigma_aa``); the
        DISP/LSFPOST extension records it. 1 = nominal.

    Returns
    -------
    SurveyResult

    Raises
    ------
    ConfigError
        Bad sizes, or a ``previous`` release that is missing or was drawn with another seed.
    """
    rel = manga.release(release)
    lib = templates.load(templates.library_path(library))
    if n_galaxies < 1:
        raise ConfigError(f"--galaxies must be >= 1, got {n_galaxies}")
    bad = [s for s in ifu_sizes if s not in manga.IFU_GEOMETRY]
    if bad or not ifu_sizes:
        raise ConfigError(
            f"IFU sizes {bad or ifu_sizes} not MaNGA bundles; "
            f"choose from {list(manga.IFU_GEOMETRY)}"
        )
    release_dir = Path(out) / rel.name
    release_dir.mkdir(parents=True, exist_ok=True)
    params = [draw_galaxy(i, seed, tuple(ifu_sizes)) for i in range(n_galaxies)]
    variants = [0] * n_galaxies
    copied: list[pa.Table] = []
    if previous is not None:
        variants, copied = _next_release(Path(out), manga.release(previous), rel, params,
                                         seed, reprocess)
    if not 0.5 <= lsf_scale <= 3.0:
        raise ConfigError(f"--lsf-scale must be within 0.5-3 (a multiple of the MaNGA LSF), "
                          f"got {lsf_scale}")
    tasks = [(p, str(release_dir), rel.name, v, library, lsf_scale)
             for p, v in zip(params, variants, strict=True) if v >= 0]
    report = runner.run_tasks(
        _render_task, tasks, workers=workers, scheduler=scheduler,
        desc=f"mock {rel.name} cubes", progress=progress,
        labels=[t[0].plateifu for t in tasks],
    )
    report.raise_if_failed("mock survey generation")
    truth = pa.concat_tables([*copied, *report.results], promote_options="default")
    truth_path = release_dir / paths.truth_sidecar_name(rel.name)
    mass_weight = ("current" if lib.has_current_mass else "none" if lib.mass_proxy
                   else "initial")
    _atomic_parquet(sidecar.with_rules(truth, truth_rules(mass_weight)), truth_path)
    drpall_path = release_dir / rel.drpall_name
    _write_drpall(params, drpall_path)
    return SurveyResult(release_dir, drpall_path, truth_path, len(params))


def _cube_path(release_dir: Path, p: GalaxyParams) -> Path:
    return release_dir / str(p.plate) / "stack" / manga.cube_filename(p.plate, p.ifudsgn)


def _next_release(out: Path, prev: manga.Release, rel: manga.Release,
                  params: list[GalaxyParams], seed: int, reprocess: float
                  ) -> tuple[list[int], list[pa.Table]]:
    """Copy the unchanged cubes of ``prev``; say which to re-render (variant 1) or render (0).

    Returns the per-galaxy variant (-1: copied) and the copied cubes' truth rows.
    """
    prev_dir = out / prev.name
    drpall_path = prev_dir / prev.drpall_name
    if prev.name == rel.name or not drpall_path.exists():
        raise ConfigError(
            f"{drpall_path}: no earlier mock release {prev.name!r} in {out}; write it first "
            f"with 'desomdb mock {out} --release {prev.name} --seed {seed}'"
        )
    if not 0.0 <= reprocess <= 1.0:
        raise ConfigError(f"--reprocess must be a fraction in 0-1, got {reprocess}")
    old = [str(v) for v in Table.read(drpall_path)["plateifu"]]
    if len(old) > len(params) or old != [p.plateifu for p in params[: len(old)]]:
        raise ConfigError(
            f"{drpall_path}: its {len(old)} galaxies are not the first galaxies of seed {seed}; "
            f"use the previous release's --seed and --galaxies >= {len(old)}"
        )
    rng = np.random.default_rng([seed, 99])
    n_re = round(reprocess * len(old))
    redo = set(rng.choice(len(old), size=n_re, replace=False).tolist()) if n_re else set()
    variants = [1 if i in redo else -1 for i in range(len(old))] + [0] * (len(params) - len(old))
    prev_truth = read_parquet(prev_dir / paths.truth_sidecar_name(prev.name))
    copied = []
    for i in range(len(old)):
        if variants[i] != -1:
            continue
        src, dst = _cube_path(prev_dir, params[i]), _cube_path(out / rel.name, params[i])
        atomic_write(dst, functools.partial(_copy_to, src))
        rows = prev_truth.filter(pc.equal(prev_truth.column("plateifu"), params[i].plateifu))
        copied.append(rows.set_column(rows.schema.get_field_index("release"), "release",
                                      pa.array([rel.name] * rows.num_rows)))
    return variants, copied


def _render_task(task: tuple[GalaxyParams, str, str, int, str, float]) -> pa.Table:
    p, release_dir, release_name, variant, library, lsf_scale = task
    hdul, truth = render_cube(p, manga.release(release_name), variant, library, lsf_scale)
    write_cube(hdul, _cube_path(Path(release_dir), p))
    return truth


def _copy_to(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)


def _atomic_parquet(table: pa.Table, path: Path) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _write_drpall(params: list[GalaxyParams], path: Path) -> None:
    t = Table(
        {
            "plateifu": [p.plateifu for p in params],
            "mangaid": [p.mangaid for p in params],
            "plate": np.array([p.plate for p in params], dtype=np.int32),
            "ifudsgn": [str(p.ifudsgn) for p in params],
            "objra": [p.obj_radec[0] for p in params],
            "objdec": [p.obj_radec[1] for p in params],
            "ifura": [p.ra for p in params],
            "ifudec": [p.dec for p in params],
            "z": [p.z for p in params],
            "nsa_z": [p.z for p in params],
            "nsa_elpetro_ba": [p.ba for p in params],
            "nsa_elpetro_phi": [p.pa_deg for p in params],
            "nsa_elpetro_th50_r": [p.th50_arcsec for p in params],
            "nsa_sersic_n": [p.sersic_n for p in params],
            # NSA masses are in M_sun h^-2 with h = 1: multiply the true (h = 0.7) mass by h^2.
            "nsa_elpetro_mass": [10**p.log_mstar * 0.49 for p in params],
            "drp3qual": np.zeros(len(params), dtype=np.int32),
            "mngtarg1": np.full(len(params), 2**10, dtype=np.int64),
            "mngtarg2": np.zeros(len(params), dtype=np.int64),
            "mngtarg3": np.zeros(len(params), dtype=np.int64),
        }
    )
    atomic_write(path, lambda tmp: t.write(tmp, format="fits", overwrite=True))
