"""The bundled stellar-population template library (MIUSCAT SSPs, vacuum wavelengths).

Why MIUSCAT: of the real SSP libraries that can be had offline, MIUSCAT (Vazdekis et al.
2012; 3465-9469 Å) is the only one that both covers the paper's rest-frame window
3650-8950 Å and has tabulated living-star + remnant masses (the Vazdekis 2012 mass table),
which mass-weighted ages and M*/L need. The MILES SSPs in the ppxf 8.2.6 sdist stop at
7410 Å (no Hα/[NII]/[SII] continuum) and BC03 in the mangadap wheel has no remnant masses.

Conventions
-----------
- Wavelengths are vacuum Å (converted from MIUSCAT's air wavelengths); the FWHM (Å) is the
  MIUSCAT 2.51 Å scaled by the same air-to-vacuum factor.
- Spectra are L_sun/Å per M_sun of *initial* mass; ``masses`` is the mass in living stars +
  remnants per unit initial mass (Vazdekis 2012, Padova00 isochrones).
- IMF: unimodal slope 1.30 (Salpeter-like). Relative to the Kroupa IMF of the paper's E-MILES
  fits, log M*/L is higher by about 0.2 dex at fixed age and [M/H]; ages and [M/H] are
  barely affected.

Provenance and licence: MIUSCAT spectra as redistributed in the ``sdss-mangadap`` 4.5.0
wheel (BSD-3; the files carry the MILES team's notice: non-commercial use, cite Vazdekis
et al. 2012 and "data from the MILES project"); mass and photometry tables as redistributed
with permission in the ``ppxf`` 8.2.6 source package. Rebuild with
``python -m desomdb.science.templates_build``.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from astropy import units as u

from desomdb.atomic import atomic_write
from desomdb.constants import L_SUN_ERG_S
from desomdb.errors import TemplateLibraryError

LIBRARY_FILE = "miuscat_ssp_vacuum.npz"
#: Bundled libraries by name. Only ``miuscat`` is fitted with; ``bc03`` (Bruzual & Charlot
#: 2003, Chabrier IMF, no living-mass table) and ``mastar`` (Maraston et al. 2020, Salpeter,
#: no masses; see :mod:`desomdb.science.templates_build`) render mock surveys that test the
#: fits against libraries they do not use.
LIBRARY_FILES = {"miuscat": LIBRARY_FILE, "bc03": "bc03_mpajhu_vacuum.npz",
                 "mastar": "mastar_ssp_vacuum.npz"}
#: Rest-frame vacuum window (Å) whose mean flux defines a template's *light* in light-weighted
#: ages and [M/H] (``log_age_lw``, ``mh_lw``): pPXF's default normalisation range of
#: ``sps_lib`` (V band, 5070-5950 Å), the same for the fits and for the mock truth.
LIGHT_WINDOW_AA = (5070.0, 5950.0)
_REQUIRED = ("templates", "lam", "fwhm", "ages", "metals", "masses")


@dataclass(frozen=True)
class TemplateLibrary:
    """A grid of SSP spectra with their ages, metallicities and masses.

    Attributes
    ----------
    path : Path
        The ``.npz`` file (``ppxf.sps_util.sps_lib`` layout) the library was read from.
    lam_vac_aa : ndarray, shape (n_pix,), float64
        Vacuum wavelength of each pixel, Å (0.9 Å spacing in air).
    templates : ndarray, shape (n_pix, n_age, n_metal), float32
        SSP spectra, L_sun/Å per M_sun of initial mass.
    fwhm_aa : ndarray, shape (n_pix,), float32
        Instrumental FWHM of the templates, Å.
    ages_gyr : ndarray, shape (n_age,)
        SSP ages, Gyr.
    metals_mh : ndarray, shape (n_metal,)
        SSP total metallicities [M/H], dex.
    masses : ndarray, shape (n_age, n_metal)
        Living stars + remnants per unit initial mass, in (0, 1]; all NaN for a library
        without such a table (BC03 as bundled, see :attr:`has_current_mass`).
    ml_r_table : ndarray, shape (n_age, n_metal)
        Vazdekis (2012) tabulated M*/L in the SDSS r band, solar units (validation only).
    mass_proxy : bool
        True where the spectra's scale per unit mass is borrowed from another library
        (MaStar, which ships median-normalised): good for mixing a mock's star formation
        history, not for a mass-weighted truth.
    """

    path: Path
    lam_vac_aa: np.ndarray
    templates: np.ndarray
    fwhm_aa: np.ndarray
    ages_gyr: np.ndarray
    metals_mh: np.ndarray
    masses: np.ndarray
    ml_r_table: np.ndarray
    mass_proxy: bool = False

    def with_ages(self, keep: np.ndarray) -> TemplateLibrary:
        """Return the library restricted to the ages where ``keep`` is True.

        pPXF builds its template grid from a file, so the subset is written once (content
        addressed, atomically) to the temporary folder and loaded from there; pPXF's objects
        are never edited after they are built.

        Parameters
        ----------
        keep : ndarray of bool, shape (n_age,)
        """
        keep = np.asarray(keep, dtype=bool)
        if keep.all():
            return self
        with np.load(self.path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        for key in ("templates",):
            arrays[key] = arrays[key][:, keep]
        for key in ("ages", "masses", "ml_r_table"):
            if key in arrays:
                arrays[key] = arrays[key][keep]
        digest = hashlib.sha256(self.path.read_bytes() + keep.tobytes()).hexdigest()[:16]
        out = Path(tempfile.gettempdir()) / f"desomdb-templates-{digest}.npz"
        if not out.is_file():
            atomic_write(out, lambda tmp: _savez(tmp, arrays))
        return load(out)

    @property
    def has_current_mass(self) -> bool:
        """Whether living + remnant masses are tabulated (else only initial mass is known)."""
        return bool(np.all(np.isfinite(self.masses)))

    def light_in_window(self) -> np.ndarray:
        """Mean flux of each template in :data:`LIGHT_WINDOW_AA`, per unit initial mass.

        Returns
        -------
        ndarray, shape (n_age, n_metal)
            L_sun/Å per M_sun formed (per proxy M_sun where :attr:`mass_proxy`).
        """
        return light_in_window(self.lam_vac_aa, self.templates)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_age, n_metal)`` of the grid."""
        return self.ages_gyr.size, self.metals_mh.size

    def r_band_luminosity(self) -> np.ndarray:
        """SDSS r-band luminosity of each template per unit initial mass.

        Uses pPXF's synthetic photometry and its solar spectrum, so values are consistent with
        ``ppxf.sps_util.sps_lib.mass_to_light(band="SDSS/r")``.

        Returns
        -------
        ndarray, shape (n_age, n_metal)
            L_r in solar r-band luminosities per M_sun formed. ``masses / L_r`` is M*/L_r.
        """
        return _r_band_luminosity(self.path)

    def sps_lib(self, velscale: float, **kwargs: Any) -> Any:
        """Return a ``ppxf.sps_util.sps_lib`` over this library.

        Parameters
        ----------
        velscale : float
            Velocity scale of the log-rebinned templates, km/s per pixel.
        **kwargs
            Passed through (``fwhm_gal``, ``age_range``, ``lam_range``, ``norm_range`` ...).
        """
        from ppxf import sps_util

        return sps_util.sps_lib(str(self.path), velscale, **kwargs)


def light_in_window(lam_aa: np.ndarray, spectra: np.ndarray) -> np.ndarray:
    """Mean of spectra over :data:`LIGHT_WINDOW_AA` (the light of light-weighted labels).

    Parameters
    ----------
    lam_aa : ndarray, shape (n_pix,)
        Rest-frame vacuum wavelengths, Å.
    spectra : ndarray, shape (n_pix, ...)

    Returns
    -------
    ndarray, shape ``spectra.shape[1:]``, float64
    """
    window = (lam_aa >= LIGHT_WINDOW_AA[0]) & (lam_aa <= LIGHT_WINDOW_AA[1])
    return np.asarray(spectra[window].astype(np.float64).mean(axis=0))


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with path.open("wb") as fh:  # a file object: np.savez would append ".npz" to a name
        np.savez(fh, **arrays)  # type: ignore[arg-type]


def library_path(name: str = "miuscat") -> Path:
    """Path of a bundled library (``miuscat``, ``bc03`` or ``mastar``) in the installed package.

    Raises
    ------
    TemplateLibraryError
        If ``name`` is not a bundled library.
    """
    if name not in LIBRARY_FILES:
        raise TemplateLibraryError(
            f"unknown template library {name!r}; choose one of {sorted(LIBRARY_FILES)}")
    return Path(str(resources.files("desomdb").joinpath("data", LIBRARY_FILES[name])))


@lru_cache(maxsize=4)
def load(path: str | Path | None = None) -> TemplateLibrary:
    """Load the SSP library (the bundled MIUSCAT one by default), offline.

    Parameters
    ----------
    path : str or Path, optional
        An ``.npz`` in ``ppxf.sps_util.sps_lib`` layout; default: the bundled library.

    Returns
    -------
    TemplateLibrary

    Raises
    ------
    TemplateLibraryError
        If the file is missing or lacks one of the arrays pPXF needs.
    """
    file = Path(path) if path is not None else library_path()
    if not file.is_file():
        raise TemplateLibraryError(
            f"{file}: template library not found; rebuild it with "
            "'python -m desomdb.science.templates_build' or reinstall desomdb"
        )
    try:
        with np.load(file) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise TemplateLibraryError(f"{file}: not a readable .npz template library ({exc})") from exc
    missing = [k for k in _REQUIRED if k not in arrays]
    if missing:
        raise TemplateLibraryError(
            f"{file}: missing arrays {missing}; a library needs {list(_REQUIRED)} "
            "(ppxf.sps_util.sps_lib layout)"
        )
    masses = arrays["masses"]
    return TemplateLibrary(
        path=file,
        lam_vac_aa=arrays["lam"],
        templates=arrays["templates"],
        fwhm_aa=np.broadcast_to(arrays["fwhm"], arrays["lam"].shape),
        ages_gyr=arrays["ages"],
        metals_mh=arrays["metals"],
        masses=masses,
        ml_r_table=arrays.get("ml_r_table", np.full(masses.shape, np.nan)),
        mass_proxy=bool(arrays.get("mass_proxy", False)),
    )


@lru_cache(maxsize=4)
def _r_band_luminosity(path: Path) -> np.ndarray:
    from ppxf import ppxf_util

    lib = load(path)
    ppxf_dir = Path(str(resources.files("ppxf")))
    with np.load(ppxf_dir / "sps_models" / "spectra_sun_vega.npz") as sun:
        sun_lam, sun_flux = sun["lam"], sun["flux_sun"]
    n_pix = lib.templates.shape[0]
    spec = ppxf_util.synthetic_photometry(
        lib.lam_vac_aa, lib.templates.reshape(n_pix, -1).astype(np.float64), "SDSS/r", quiet=True
    )
    solar = ppxf_util.synthetic_photometry(sun_lam, sun_flux, "SDSS/r", quiet=True)
    # Templates are L_sun/Å at the source; the solar spectrum is erg/s/cm^2/Å at 10 pc.
    ten_pc_cm = float((10 * u.pc).to(u.cm).value)
    flux_at_10pc = spec.flux * L_SUN_ERG_S / (4 * np.pi * ten_pc_cm**2)
    return np.asarray(flux_at_10pc / solar.flux).reshape(lib.shape)
