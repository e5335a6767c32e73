"""Rebuild the bundled SSP libraries from the public packages that redistribute them.

Run ``python -m desomdb.science.templates_build`` for MIUSCAT (the fitting library) and
``python -m desomdb.science.templates_build --library bc03`` (or ``mastar``) for BC03 and
MaStar (the mock survey's second and third libraries, never fitted with); network access
to the package index is needed only to fetch
the source packages; pass ``--sources DIR`` to use already-downloaded files.

Sources
-------
- ``sdss-mangadap==4.5.0`` wheel, ``mangadap/data/spectral_templates/miuscat/``: 200 MIUSCAT
  SSP spectra (Vazdekis et al. 2012, MNRAS 424, 157), unimodal IMF slope 1.30
  (Salpeter-like), 50 ages 0.063-17.8 Gyr x [M/H] = -0.71, -0.40, 0.00, +0.22, air
  wavelengths 3464.9-9468.8 Å at 0.9 Å per pixel, FWHM 2.51 Å, in L_sun/Å per M_sun of
  initial mass.
- ``ppxf==8.2.6`` source distribution, ``ppxf/miles_models/``: the Vazdekis (2012) tables of
  the mass in living stars + remnants per unit initial mass
  (``Vazdekis2012_ssp_mass_Padova00_UN_baseFe_v10.0.txt``) and the SDSS-band photometry of
  the MIUSCAT SEDs (``Vazdekis2012_ssp_sdss_miuscat_UN1.30_v9.txt``), redistributed by ppxf
  with the MILES team's permission.

What the build does
-------------------
1. Trims each spectrum to the DAP's trusted range, 3480-9430 Å (air).
2. Converts wavelengths to vacuum (MaNGA is in vacuum) with pPXF's ``air_to_vac``; the FWHM
   in Å scales by the same factor.
3. Matches each (age, [M/H]) to the Vazdekis mass table (nearest tabulated [M/H]: the
   MIUSCAT nominal -0.71/-0.40/+0.22 are tabulated as -0.7052/-0.3960/+0.2223).
4. Writes a float32 ``.npz`` in the layout of ``ppxf.sps_util.sps_lib`` (``templates``
   [npix, n_age, n_metal], ``lam``, ``fwhm``, ``ages``, ``metals``, ``masses``) plus the
   tabulated r-band M/L (``ml_r_table``) used to validate the library.

BC03 (:func:`build_bc03`)
-------------------------
- Source: the same ``sdss-mangadap==4.5.0`` wheel, ``mangadap/data/spectral_templates/
  bc03_mpajhu/``: 40 Bruzual & Charlot (2003) SSPs as used by the MPA-JHU catalogue
  (Chabrier 2003 IMF, Padova 1994 tracks, STELIB spectra; provided to the DAP by
  C. Tremonti), 10 ages 0.005-10 Gyr x Z = 0.004, 0.008, 0.02, 0.05, air wavelengths
  3326-9294 Å at 1 Å per pixel, L_sun/Å per M_sun of *initial* mass.
- [M/H] = log10(Z / 0.02): -0.70, -0.40, 0.00, +0.40 (MIUSCAT stops at +0.22).
- Resolution: 3.0 Å FWHM, the STELIB resolution BC03 quote (Bruzual & Charlot 2003,
  Sect. 2.2); mangadap's README says "we think 2.3 Å". The larger value is the safer one
  for a mock: the renderer never sharpens a template, so an underestimate would leave
  the mock's lines too broad without saying so.
- Wavelengths converted to vacuum (``air_to_vac``), FWHM scaled by the same factor.
- No living-star + remnant mass table ships with these files, so ``masses`` is stored as
  NaN (:attr:`desomdb.science.templates.TemplateLibrary.has_current_mass` is False): the mock then
  weights its truth by initial mass and leaves M*-dependent truths empty.
- Licence: BC03 models are public (Bruzual & Charlot 2003, MNRAS 344, 1000; cite them);
  mangadap is BSD-3.

MaStar (:func:`build_mastar`)
-----------------------------
- Source: the same wheel, ``mangadap/data/spectral_templates/mastar_ssp_v1.0/``: 54 MaStar
  SSPs (Maraston et al. 2020, MNRAS 496, 2962), Salpeter IMF, 9 ages 0.003-14 Gyr x
  [M/H] = -1.35, -1.00, -0.70, -0.33, 0.00, +0.35, on the MaNGA log grid (3621.6-10351 Å,
  vacuum), each spectrum divided by its median, with its per-pixel resolution (``SRES``,
  R 1410-2100): the stored FWHM is λ / R.
- No masses ship with these files. A mock needs a flux scale per unit of star formation to
  mix SSPs by a star formation history, so each spectrum is scaled to a *proxy* light per
  unit initial mass: the BC03 library's mean flux in :data:`templates.LIGHT_WINDOW_AA` per
  M_sun formed at the same age and [M/H] (bilinear in log age and [M/H]; beyond BC03's
  0.005-10 Gyr extrapolated linearly in log age, beyond its -0.70 to +0.40 clamped in [M/H]).
  ``masses`` is NaN and ``mass_proxy`` True:
  mocks rendered from it carry light-weighted truth only (no mass-weighted age or [M/H],
  no M*/L or sSFR), because the proxy is another library's, not MaStar's.
- Licence: MaStar SSPs are public (Maraston et al. 2020; cite them); mangadap is BSD-3.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from desomdb.atomic import atomic_write
from desomdb.errors import TemplateLibraryError

MANGADAP_PIN = "sdss-mangadap==4.5.0"
PPXF_SDIST_PIN = "ppxf==8.2.6"
MIUSCAT_DIR = "mangadap/data/spectral_templates/miuscat/"
BC03_DIR = "mangadap/data/spectral_templates/bc03_mpajhu/"
BC03_FWHM_AA = 3.0
BC03_Z_SUN = 0.02
MASS_TABLE = "ppxf/miles_models/Vazdekis2012_ssp_mass_Padova00_UN_baseFe_v10.0.txt"
PHOT_TABLE = "ppxf/miles_models/Vazdekis2012_ssp_sdss_miuscat_UN1.30_v9.txt"
AIR_RANGE_AA = (3480.0, 9430.0)  # mangadap's wave_limit for MIUSCAT: the edges are unreliable
IMF_SLOPE = 1.30
_NAME = re.compile(r"Iun1\.30Z([mp])(\d\.\d\d)T(\d+\.\d+)\.fits$")


def _wheel_spectra(
    wheel: Path,
    is_member: Callable[[str], bool],
    key_of: Callable[[str, fits.Header], tuple[float, float] | None],
    expected: int,
    library: str,
    extension: str | None = None,
) -> tuple[dict[tuple[float, float], np.ndarray], np.ndarray, list[np.ndarray]]:
    """Read one library's SSP spectra (one FITS file each, ``.gz`` or not) from the wheel.

    Parameters
    ----------
    wheel : Path
    is_member : callable
        Whether a wheel member (by name) is one of the library's files.
    key_of : callable
        ``key_of(name, primary header)``: the spectrum's (age Gyr, [M/H]).
    expected : int
        How many spectra the library has.
    library : str
        Its name, for error messages.
    extension : str, optional
        An image extension to read from every file as well (MaStar's ``SRES``).

    Returns
    -------
    spectra : dict
        (age, [M/H]) -> flux, float64.
    grid : ndarray
        The common grid CRVAL1 + CDELT1 (i + 1 - CRPIX1): air Å for MIUSCAT and BC03,
        log10 of vacuum Å for MaStar.
    extra : list of ndarray
        ``extension`` of each file, float64, in name order (empty without ``extension``).

    Raises
    ------
    TemplateLibraryError
        If the files disagree on the grid or their number is not ``expected``.
    """
    spectra: dict[tuple[float, float], np.ndarray] = {}
    extra: list[np.ndarray] = []
    grid = None
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            if not is_member(name):
                continue
            with contextlib.ExitStack() as stack:
                fh: Any = stack.enter_context(zf.open(name))
                if name.endswith(".gz"):
                    fh = stack.enter_context(gzip.GzipFile(fileobj=fh))
                hdul = stack.enter_context(fits.open(fh))
                hdr = hdul[0].header
                flux = np.asarray(hdul[0].data, dtype=np.float64)
                lam = hdr["CRVAL1"] + hdr["CDELT1"] * (np.arange(flux.size) + 1 - hdr["CRPIX1"])
                key = key_of(name, hdr)
                if extension is not None:
                    extra.append(np.asarray(hdul[extension].data, dtype=np.float64))
            if grid is None:
                grid = lam
            elif not np.allclose(lam, grid):
                raise TemplateLibraryError(f"{name}: wavelength grid differs from the others")
            assert key is not None
            spectra[key] = flux
    if grid is None or len(spectra) != expected:
        raise TemplateLibraryError(f"{wheel}: expected {expected} {library} spectra, found "
                                   f"{len(spectra)}")
    return spectra, grid, extra


def _save_library(out: Path, **arrays: np.ndarray) -> None:
    """Write a library ``.npz`` (compressed) atomically."""
    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:  # a file object: np.savez would append ".npz" to a name
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]

    atomic_write(out, write)


def _miuscat_key(name: str) -> tuple[float, float] | None:
    """(age Gyr, [M/H]) of a MIUSCAT file, from its name (``Iun1.30Zm0.40T01.0000.fits``)."""
    match = _NAME.search(name) if name.startswith(MIUSCAT_DIR) else None
    if match is None:
        return None
    sign = -1.0 if match.group(1) == "m" else 1.0
    return float(match.group(3)), sign * float(match.group(2))


def build_bc03(wheel: Path, out: Path) -> Path:
    """Build the vacuum-wavelength BC03 (MPA-JHU) library file from the mangadap wheel.

    Parameters
    ----------
    wheel : Path
        The ``sdss-mangadap`` 4.5.0 wheel.
    out : Path
        Output ``.npz`` path (``ppxf.sps_util.sps_lib`` layout; ``masses`` all NaN).

    Returns
    -------
    Path
        ``out``.
    """
    from ppxf.ppxf_util import air_to_vac

    def is_bc03(name: str) -> bool:
        return name.startswith(BC03_DIR) and name.endswith(".fits")

    def bc03_key(name: str, hdr: fits.Header) -> tuple[float, float]:
        return float(hdr["AGE"]), round(float(np.log10(hdr["Z"] / BC03_Z_SUN)), 4)

    spectra, lam_air, _ = _wheel_spectra(wheel, is_bc03, bc03_key, 40, "BC03")
    ages = np.array(sorted({k[0] for k in spectra}))
    metals = np.array(sorted({k[1] for k in spectra}))
    templates = np.empty((lam_air.size, ages.size, metals.size), dtype=np.float32)
    for i, age in enumerate(ages):
        for j, mh in enumerate(metals):
            templates[:, i, j] = spectra[(age, mh)]
    lam_vac = air_to_vac(lam_air)
    _save_library(
        out,
        templates=templates,
        lam=lam_vac,
        fwhm=(BC03_FWHM_AA * lam_vac / lam_air).astype(np.float32),
        ages=ages,
        metals=metals,
        masses=np.full((ages.size, metals.size), np.nan),
        imf=np.array("Chabrier (2003)"),
        source=np.array(f"BC03 (MPA-JHU selection) via {MANGADAP_PIN}; no living-mass table"),
    )
    return out


MASTAR_DIR = "mangadap/data/spectral_templates/mastar_ssp_v1.0/"
_MASTAR_NAME = re.compile(r"MaStar-SSP-A(\d+\.\d+)-Z([+-]\d\.\d\d)\.fits\.gz$")


def build_mastar(wheel: Path, out: Path, proxy: Path) -> Path:
    """Build the MaStar SSP library file from the mangadap wheel (see the module docstring).

    Parameters
    ----------
    wheel : Path
        The ``sdss-mangadap`` 4.5.0 wheel.
    out : Path
        Output ``.npz`` path (``ppxf.sps_util.sps_lib`` layout; ``masses`` all NaN).
    proxy : Path
        The BC03 library ``.npz`` whose light per unit initial mass scales the spectra.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    TemplateLibraryError
        If the wheel does not hold the 54 spectra on one grid.
    """
    from desomdb.science import templates

    def mastar_key(name: str, _hdr: fits.Header) -> tuple[float, float] | None:
        match = _MASTAR_NAME.search(name) if name.startswith(MASTAR_DIR) else None
        return None if match is None else (float(match.group(1)), float(match.group(2)))

    spectra, log_lam, sres = _wheel_spectra(
        wheel, lambda name: mastar_key(name, fits.Header()) is not None, mastar_key, 54,
        "MaStar SSP", extension="SRES")
    lam = 10.0**log_lam
    ages = np.array(sorted({k[0] for k in spectra}))
    metals = np.array(sorted({k[1] for k in spectra}))
    per_mass = _light_per_mass(templates.load(proxy), ages, metals)
    tpl = np.empty((lam.size, ages.size, metals.size), dtype=np.float32)
    for i, age in enumerate(ages):
        for j, mh in enumerate(metals):
            flux = spectra[(age, mh)]
            tpl[:, i, j] = flux * per_mass[i, j] / templates.light_in_window(lam, flux)
    _save_library(
        out,
        templates=tpl,
        lam=lam,
        fwhm=(lam / np.median(np.array(sres), axis=0)).astype(np.float32),
        ages=ages,
        metals=metals,
        masses=np.full((ages.size, metals.size), np.nan),
        mass_proxy=np.array(True),
        imf=np.array("Salpeter (1955)"),
        source=np.array(f"MaStar SSP v1.0 via {MANGADAP_PIN}; median-normalised, scaled to "
                        "BC03's light per unit initial mass (a proxy)"),
    )
    return out


def _light_per_mass(lib: Any, ages: np.ndarray, metals: np.ndarray) -> np.ndarray:
    """Return a library's mean flux in the light window per M_sun formed at other (age, [M/H]).

    Bilinear in (log10 age, [M/H]): extrapolated linearly in log age beyond the library's
    ages, clamped at its [M/H] edges.

    Returns
    -------
    ndarray, shape (ages.size, metals.size)
    """
    from scipy.interpolate import RegularGridInterpolator

    grid = np.log10(lib.light_in_window())
    interp = RegularGridInterpolator((np.log10(lib.ages_gyr), lib.metals_mh), grid,
                                     bounds_error=False, fill_value=None)
    la = np.log10(ages)
    mh = np.clip(metals, lib.metals_mh[0], lib.metals_mh[-1])
    pts = np.stack(np.meshgrid(la, mh, indexing="ij"), axis=-1)
    return np.asarray(10.0 ** interp(pts))


def download_sources(dest: Path) -> tuple[Path, Path]:
    """Fetch the mangadap wheel and the ppxf 8.2.6 sdist with ``pip download --no-deps``.

    Parameters
    ----------
    dest : Path
        Folder to download into.

    Returns
    -------
    wheel, sdist : Path
        Paths of the downloaded ``sdss_mangadap`` wheel and ``ppxf`` source tarball.
    """
    dest.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest)]
    subprocess.run([*base, MANGADAP_PIN], check=True)
    subprocess.run([*base, "--no-binary", ":all:", PPXF_SDIST_PIN], check=True)
    return find_sources(dest)


def find_sources(folder: Path) -> tuple[Path, Path]:
    """Locate the two source archives in ``folder``.

    Raises
    ------
    TemplateLibraryError
        If either archive is missing.
    """
    wheels = sorted(folder.glob("sdss_mangadap-4.5.0-*.whl"))
    sdists = sorted(folder.glob("ppxf-8.2.6.tar.gz"))
    if not wheels or not sdists:
        raise TemplateLibraryError(
            f"{folder}: need sdss_mangadap-4.5.0-*.whl and ppxf-8.2.6.tar.gz; run "
            "'python -m desomdb.science.templates_build' without --sources to download them"
        )
    return wheels[0], sdists[0]


def _read_table(text: str, n_cols: int) -> np.ndarray:
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= n_cols and parts[0] == "UN" and float(parts[1]) == IMF_SLOPE:
            rows.append([float(p) for p in parts[1:n_cols]])
    return np.array(rows)


def build(wheel: Path, sdist: Path, out: Path) -> Path:
    """Build the vacuum-wavelength MIUSCAT library file.

    Parameters
    ----------
    wheel, sdist : Path
        The ``sdss-mangadap`` 4.5.0 wheel and the ``ppxf`` 8.2.6 source tarball.
    out : Path
        Output ``.npz`` path.

    Returns
    -------
    Path
        ``out``.
    """
    from ppxf.ppxf_util import air_to_vac

    spectra, lam_air, _ = _wheel_spectra(wheel, lambda name: _miuscat_key(name) is not None,
                                         lambda name, _hdr: _miuscat_key(name), 200, "MIUSCAT")

    with tarfile.open(sdist) as tf:
        mass_text = _extract(tf, MASS_TABLE)
        phot_text = _extract(tf, PHOT_TABLE)
    mass_tab = _read_table(mass_text, 6)  # columns: slope, [M/H], age, Mtotal, M(*+remn)
    phot_tab = _read_table(phot_text, 15)  # ..., (M/L)u g r i in the last four columns

    ages = np.array(sorted({k[0] for k in spectra}))
    metals = np.array(sorted({k[1] for k in spectra}))
    keep = (lam_air >= AIR_RANGE_AA[0]) & (lam_air <= AIR_RANGE_AA[1])
    templates = np.empty((keep.sum(), ages.size, metals.size), dtype=np.float32)
    masses = np.empty((ages.size, metals.size))
    ml_r = np.empty((ages.size, metals.size))
    for i, age in enumerate(ages):
        for j, mh in enumerate(metals):
            templates[:, i, j] = spectra[(age, mh)][keep]
            masses[i, j] = _lookup(mass_tab, mh, age)[4]
            ml_r[i, j] = _lookup(phot_tab, mh, age)[12]

    lam_vac = air_to_vac(lam_air[keep])
    fwhm = (2.51 * lam_vac / lam_air[keep]).astype(np.float32)
    _save_library(
        out,
        templates=templates,
        lam=lam_vac,
        fwhm=fwhm,
        ages=ages,
        metals=metals,
        masses=masses,
        ml_r_table=ml_r,
        imf=np.array("unimodal slope 1.30 (Salpeter-like)"),
        source=np.array(f"MIUSCAT v9.2 via {MANGADAP_PIN}; masses via {PPXF_SDIST_PIN}"),
    )
    return out


def _extract(tf: tarfile.TarFile, suffix: str) -> str:
    for member in tf.getmembers():
        if member.name.endswith(suffix):
            fh = tf.extractfile(member)
            if fh is not None:
                return fh.read().decode()
    raise TemplateLibraryError(f"{tf.name!r}: {suffix} not found in the ppxf source package")


def _lookup(table: np.ndarray, mh: float, age: float) -> np.ndarray:
    d_mh = np.abs(table[:, 1] - mh)
    rows = table[(d_mh == d_mh.min()) & np.isclose(table[:, 2], age, rtol=1e-3)]
    if len(rows) != 1 or d_mh.min() > 0.02:
        raise TemplateLibraryError(f"no unique Vazdekis table row for [M/H]={mh}, age={age} Gyr")
    return rows[0]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", type=Path, help="folder holding the source archives")
    parser.add_argument("--library", choices=("miuscat", "bc03", "mastar"), default="miuscat")
    parser.add_argument("--out", type=Path, help="output .npz (default: the bundled file)")
    args = parser.parse_args(argv)
    data = Path(__file__).parents[1] / "data"
    if args.library in ("bc03", "mastar"):
        out = args.out or data / ("bc03_mpajhu_vacuum.npz" if args.library == "bc03"
                                  else "mastar_ssp_vacuum.npz")
        with tempfile.TemporaryDirectory() as tmp:
            if args.sources is not None:
                wheels = sorted(Path(args.sources).glob("sdss_mangadap-4.5.0-*.whl"))
                if not wheels:
                    raise TemplateLibraryError(f"{args.sources}: no sdss_mangadap-4.5.0-*.whl")
                wheel = wheels[0]
            else:
                dest = Path(tmp)
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d",
                                str(dest), MANGADAP_PIN], check=True)
                wheel = sorted(dest.glob("sdss_mangadap-4.5.0-*.whl"))[0]
            print(build_bc03(wheel, out) if args.library == "bc03"
                  else build_mastar(wheel, out, data / "bc03_mpajhu_vacuum.npz"))
        return 0
    args.out = args.out or data / "miuscat_ssp_vacuum.npz"
    if args.sources is not None:
        wheel, sdist = find_sources(args.sources)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            wheel, sdist = download_sources(Path(tmp))
            print(build(wheel, sdist, args.out))
            return 0
    print(build(wheel, sdist, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
