"""Render one mock galaxy as a MaNGA DRP LOGCUBE: stars, gas, dust, sky, noise, headers.

Also the galaxy's per-spaxel truth. The survey around it (which galaxies, releases, drpall)
is :mod:`desomdb.mock.survey`; the galaxy model is :mod:`desomdb.mock.galaxy`.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
from astropy.io import fits
from astropy.table import Table

from desomdb.atomic import atomic_write
from desomdb.constants import FWHM_PER_SIGMA, L_SUN_ERG_S, luminosity_distance_cm
from desomdb.mock.galaxy import GalaxyParams, SpaxelModel, spaxel_model
from desomdb.science import dust, emission, geometry, templates
from desomdb.survey import manga

NOISE_GAIN = 20000.0


SKY_SIGMA = 0.005


COVARIANCE_SIGMA_SPAXELS = 1.18


#: Bright night-sky lines (vacuum Å) that raise the noise.
SKY_LINES_AA = (5578.9, 5891.6, 5897.6, 6302.0, 6365.5, 7343.0, 7716.5, 7796.0, 7823.6,
                7916.0, 8346.8, 8401.9, 8432.5, 8467.7, 8829.6, 8888.6, 8945.5, 9378.0,
                9442.4, 9794.7, 9952.0)


TRUTH_LINES = ("Hbeta", "OIII5007", "Halpha", "NII6583", "OII3726", "OII3729", "OI6300",
               "SII6716", "SII6731")


def render_cube(p: GalaxyParams, rel: manga.Release, variant: int = 0,
                library: str = "miuscat", lsf_scale: float = 1.0,
                ) -> tuple[fits.HDUList, pa.Table]:
    """Render one galaxy into a LOGCUBE HDU list and its per-spaxel truth table.

    ``variant`` > 0 draws another noise realisation of the same galaxy (a re-processed cube);
    ``library`` names the SSP library (``miuscat``, ``bc03`` or ``mastar``) the spectra come
    from; ``lsf_scale`` multiplies the nominal MaNGA LSF the cube is rendered at and records.

    Returns
    -------
    hdul : astropy.io.fits.HDUList
        PRIMARY, FLUX, IVAR, MASK, LSF post/pre, WAVE, SPECRES, SPECRESD, PRESPECRES,
        PRESPECRESD, OBSINFO, GIMG, RIMG, IIMG, ZIMG.
    truth : pyarrow.Table
        One row per covered spaxel (see :mod:`desomdb.mock.galaxy` for units).
    """
    lib = templates.load(templates.library_path(library))
    rng = np.random.default_rng([p.seed, p.index, 2] + ([variant] if variant else []))
    n_grid, hex_diam = manga.IFU_GEOMETRY[p.n_fibres]
    wave = manga.wave_obs_aa()
    dra_c, ddec_c = geometry.spaxel_offsets(n_grid, n_grid)
    margin = geometry.hexagon_margin(dra_c, ddec_c, hex_diam)
    covered = margin >= 0
    lowcov = covered & (margin < 0.75)
    off_ra, off_dec = p.centre_offset_arcsec
    yy, xx = np.nonzero(covered)
    model = spaxel_model(
        p, lib, xx, yy, dra_c[yy, xx] - off_ra, ddec_c[yy, xx] - off_dec, rng
    )

    flux_scale = _flux_scale(p.z)
    spectra = _stellar_spectra(p, lib, model, wave, lsf_scale) * flux_scale
    line_flux = {k: v * _line_flux_scale(p.z) for k, v in model.lines_lum.items()}
    spectra += _line_spectra(p, model, line_flux, wave, lsf_scale)

    mask = np.zeros((manga.N_WAVE, n_grid, n_grid), dtype=np.int32)
    mask[:, ~covered] = manga.NOCOV | manga.DONOTUSE
    mask[:, lowcov] |= manga.LOWCOV | manga.DONOTUSE
    noise_boost = np.ones((n_grid, n_grid))
    noise_boost[lowcov] = 2.0
    forestar = np.zeros((n_grid, n_grid), dtype=bool)
    dead = np.zeros((n_grid, n_grid), dtype=bool)
    grid_y, grid_x = np.mgrid[0:n_grid, 0:n_grid]
    for _ in range(rng.integers(0, 3)):
        pick = rng.integers(xx.size)
        dead |= np.hypot(grid_x - xx[pick], grid_y - yy[pick]) < 2.5  # one fibre footprint
    dead &= covered
    mask[:, dead] |= manga.DEADFIBER
    noise_boost[dead] *= 1.6

    cube = np.zeros((manga.N_WAVE, n_grid, n_grid), dtype=np.float64)
    cube[:, yy, xx] = spectra.T
    if rng.uniform() < 0.15:
        forestar = _add_foreground_star(cube, covered, lib, wave, rng, spectra)
        mask[:, forestar] |= manga.FORESTAR
    cube *= dust.milky_way_transmission(wave, p.ebv_gal)[:, None, None]

    sky = SKY_SIGMA * _sky_shape(wave)
    variance = np.clip(cube, 0, None) / NOISE_GAIN + sky[:, None, None] ** 2
    variance *= noise_boost[None] ** 2
    noise = _correlated_noise(rng, cube.shape) * np.sqrt(variance)
    flux = (cube + noise).astype(np.float32)
    ivar = (1.0 / variance).astype(np.float32)
    flux[:, ~covered] = 0.0
    ivar[:, ~covered] = 0.0

    lsf = np.maximum(lsf_scale * manga.lsf_sigma_aa(wave), _library_lsf_obs(lib, wave, p.z))
    hdul = _build_hdus(p, rel, flux, ivar, mask, wave, rng, off_ra, off_dec, lsf, library)
    truth = _truth_table(p, rel, model, line_flux, forestar, library)
    return hdul, truth


def _library_lsf_obs(lib: templates.TemplateLibrary, wave: np.ndarray, z: float) -> np.ndarray:
    """Return the library's instrumental sigma in the observed frame, Å; shaped like ``wave``."""
    lam_rest = wave / (1 + z)
    fwhm = np.interp(lam_rest, lib.lam_vac_aa, lib.fwhm_aa)
    return np.asarray(fwhm / FWHM_PER_SIGMA * (1 + z))


def _flux_scale(z: float) -> float:
    """L_sun/Å (rest) -> 1e-17 erg/s/cm^2/Å (observed) at redshift z."""
    d_l = luminosity_distance_cm(z)
    return float(L_SUN_ERG_S / (4 * np.pi * d_l**2) / (1 + z) / 1e-17)


def _line_flux_scale(z: float) -> float:
    """erg/s -> 1e-17 erg/s/cm^2 at redshift z."""
    d_l = luminosity_distance_cm(z)
    return float(1.0 / (4 * np.pi * d_l**2) / 1e-17)


def _stellar_spectra(
    p: GalaxyParams, lib: templates.TemplateLibrary, model: SpaxelModel, wave: np.ndarray,
    lsf_scale: float = 1.0,
) -> np.ndarray:
    """Dust-attenuated, velocity-shifted stellar spectra on the observed grid, L_sun/Å.

    Convolved to ``lsf_scale`` times the nominal MaNGA LSF plus the stellar dispersion (or
    left at the library's resolution where that is coarser).

    Returns
    -------
    ndarray, shape (n_spaxels, 4563)
    """
    from ppxf import ppxf_util

    pad = 16  # > max |v| / 69 km/s per pixel
    k = np.arange(-pad, manga.N_WAVE + pad)
    lam_rest = manga.WAVE0_AA * 10.0 ** (manga.DLOG10 * k) / (1 + p.z)
    lsf_rest = lsf_scale * manga.lsf_sigma_aa(lam_rest * (1 + p.z)) / (1 + p.z)
    lsf_tpl = np.interp(lam_rest, lib.lam_vac_aa, lib.fwhm_aa) / FWHM_PER_SIGMA
    n_tpl = lib.templates.shape[1] * lib.templates.shape[2]
    flat_w = model.weights.reshape(model.weights.shape[0], n_tpl)
    out = np.empty((flat_w.shape[0], manga.N_WAVE))
    k_calz = -2.5 * np.log10(dust.calzetti_transmission(lam_rest, 1.0))
    for sigma in np.unique(model.sigma_kms):
        sel = model.sigma_kms == sigma
        lsf_on_tpl = np.interp(lib.lam_vac_aa, lam_rest, lsf_rest)
        sig_aa = np.sqrt(
            np.clip(lsf_on_tpl**2 + (sigma / manga.C_KMS * lib.lam_vac_aa) ** 2
                    - np.interp(lib.lam_vac_aa, lam_rest, lsf_tpl) ** 2, 0, None)
        )
        smooth = ppxf_util.varsmooth(
            lib.lam_vac_aa, lib.templates.reshape(-1, n_tpl).astype(np.float64), sig_aa
        )
        tpl = _extend_to(lib.lam_vac_aa, smooth, lam_rest)  # (n_lam_rest, n_tpl)
        spec = flat_w[sel] @ tpl.T  # (n_sel, n_lam_rest)
        spec *= 10.0 ** (-0.4 * np.outer(model.ebv_star[sel], k_calz))
        shift = np.log10(1 + model.velocity_kms[sel] / manga.C_KMS) / manga.DLOG10
        out[np.flatnonzero(sel)] = shift_pixels(spec, shift)[:, pad:pad + manga.N_WAVE]
    return out


def shift_pixels(spec: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Shift each row by a (fractional) number of pixels: ``out[i, j] = spec_i(j - shift_i)``.

    A Fourier phase ramp, exact for a band-limited spectrum. Linear interpolation would
    convolve each row with a two-point kernel of variance f(1 - f) pixels² (f the fraction of
    a pixel), on average 28 km/s added in quadrature to every line width at MaNGA's 69 km/s
    pixels. The straight line through each row's end points is shifted analytically, so the
    transform sees no jump between the ends; only the first and last ``|shift|`` pixels see
    the other end (callers pad by more than the largest shift).

    Parameters
    ----------
    spec : ndarray, shape (n, m)
    shift : ndarray, shape (n,)
        Pixels (positive: towards larger indices).

    Returns
    -------
    ndarray, shape (n, m)
    """
    m = spec.shape[1]
    x = np.arange(m, dtype=np.float64)
    slope = (spec[:, -1] - spec[:, 0]) / (m - 1)
    line = spec[:, :1] + slope[:, None] * x
    phase = np.exp(-2j * np.pi * np.fft.rfftfreq(m)[None, :] * np.asarray(shift)[:, None])
    moved = np.fft.irfft(np.fft.rfft(spec - line, axis=1) * phase, m, axis=1)
    return moved + spec[:, :1] + slope[:, None] * (x[None, :] - np.asarray(shift)[:, None])


def _extend_to(lam: np.ndarray, spec: np.ndarray, lam_new: np.ndarray) -> np.ndarray:
    """Interpolate spectra (n_pix, n) onto ``lam_new``, power-law extrapolated at the ends."""
    out = np.empty((lam_new.size, spec.shape[1]))
    for j in range(spec.shape[1]):
        out[:, j] = np.interp(lam_new, lam, spec[:, j])
    for edge in ("blue", "red"):
        sel = lam < lam[0] + 200 if edge == "blue" else lam > lam[-1] - 200
        beyond = lam_new < lam[0] if edge == "blue" else lam_new > lam[-1]
        if not beyond.any():
            continue
        logl = np.log(lam[sel])
        logf = np.log(np.clip(spec[sel], 1e-30, None))
        slope, icpt = np.polyfit(logl, logf, 1)
        out[beyond] = np.exp(np.outer(np.log(lam_new[beyond]), slope) + icpt)
    return out


def _line_spectra(
    p: GalaxyParams, model: SpaxelModel, line_flux: dict[str, np.ndarray], wave: np.ndarray,
    lsf_scale: float = 1.0,
) -> np.ndarray:
    """Gaussian emission lines (nebular dust applied) on the observed grid; shape (n, 4563)."""
    n = model.x.size
    out = np.zeros((n, manga.N_WAVE))
    names = list(emission.LINES_AA)
    rest_aa = np.array([emission.LINES_AA[k] for k in names])
    trans = dust.nebular_transmission(rest_aa, model.ebv_gas)
    for j, name in enumerate(names):
        lam_obs = emission.LINES_AA[name] * (1 + p.z) * (1 + model.velocity_kms / manga.C_KMS)
        sig_aa = np.sqrt((model.sigma_gas_kms / manga.C_KMS * lam_obs) ** 2
                         + (lsf_scale * manga.lsf_sigma_aa(lam_obs)) ** 2)
        centre = np.searchsorted(wave, lam_obs)
        if np.all(centre <= 0) or np.all(centre >= manga.N_WAVE):
            continue
        idx = np.clip(centre[:, None] + np.arange(-30, 31)[None, :], 0, manga.N_WAVE - 1)
        dlam = manga.pixel_width_aa(wave[idx])
        prof = np.exp(-0.5 * ((wave[idx] - lam_obs[:, None]) / sig_aa[:, None]) ** 2)
        prof /= np.sqrt(2 * np.pi) * sig_aa[:, None]
        amp = (line_flux[name] * trans[:, j])[:, None]
        # Accumulate per-pixel flux density; duplicate clipped indices only at the grid ends.
        np.add.at(out, (np.repeat(np.arange(n), idx.shape[1]), idx.ravel()),
                  (amp * prof * (dlam > 0)).ravel())
    return out


def _add_foreground_star(
    cube: np.ndarray,
    covered: np.ndarray,
    lib: templates.TemplateLibrary,
    wave: np.ndarray,
    rng: np.random.Generator,
    galaxy_spectra: np.ndarray,
) -> np.ndarray:
    """Add a point source (2.5" FWHM) with an SSP-like stellar spectrum; return its footprint."""
    n = cube.shape[1]
    ys, xs = np.nonzero(covered)
    far = np.hypot(xs - (n - 1) / 2, ys - (n - 1) / 2) > 6
    if not far.any():
        return np.zeros(covered.shape, dtype=bool)
    pick = rng.choice(np.flatnonzero(far))
    cx, cy = xs[pick], ys[pick]
    # An intermediate-age to old solar SSP; the index is drawn on MIUSCAT's 50 ages and
    # mapped onto the library's own grid.
    age_index = int(rng.integers(20, 45)) * lib.ages_gyr.size // 50
    solar = int(np.argmin(np.abs(lib.metals_mh)))
    star = lib.templates[:, age_index, solar].astype(float)
    star_obs = _extend_to(lib.lam_vac_aa, star[:, None], wave)[:, 0]
    star_obs *= rng.uniform(0.5, 3.0) * np.median(galaxy_spectra.max(axis=0)) / np.median(star_obs)
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(xx - cx, yy - cy) * manga.SPAXEL_ARCSEC
    psf = np.exp(-0.5 * (r / (2.5 / FWHM_PER_SIGMA)) ** 2)
    cube += star_obs[:, None, None] * (psf * covered)[None]
    return np.asarray((r < 3.0) & covered)


def _sky_shape(wave: np.ndarray) -> np.ndarray:
    """Relative sky noise: flat continuum rising to the red, plus bright sky lines."""
    shape = 1.0 + 0.8 * ((wave - wave[0]) / (wave[-1] - wave[0])) ** 2
    for lam in SKY_LINES_AA:
        shape += 6.0 * np.exp(-0.5 * ((wave - lam) / 1.5) ** 2)
    return np.asarray(shape)


def _correlated_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit-variance Gaussian noise correlated between neighbouring spaxels."""
    from scipy.ndimage import gaussian_filter

    white = rng.standard_normal(shape, dtype=np.float32)
    s = COVARIANCE_SIGMA_SPAXELS
    smooth = gaussian_filter(white, sigma=(0, s, s), mode="reflect", truncate=3.0)
    return np.asarray(smooth * np.float32(np.sqrt(4 * np.pi) * s))


def _build_hdus(
    p: GalaxyParams,
    rel: manga.Release,
    flux: np.ndarray,
    ivar: np.ndarray,
    mask: np.ndarray,
    wave: np.ndarray,
    rng: np.random.Generator,
    off_ra: float,
    off_dec: float,
    lsf: np.ndarray,
    library: str,
) -> fits.HDUList:
    n = flux.shape[1]
    ifura, ifudec = p.ra, p.dec
    objra, objdec = p.obj_radec
    prim = fits.Header()
    for key, val in [
        ("PLATEIFU", p.plateifu), ("MANGAID", p.mangaid), ("PLATEID", p.plate),
        ("IFUDSGN", str(p.ifudsgn)), ("OBJRA", objra), ("OBJDEC", objdec),
        ("IFURA", ifura), ("IFUDEC", ifudec), ("DRP3QUAL", 0), ("EBVGAL", p.ebv_gal),
        ("MNGTARG1", 2**10), ("MNGTARG2", 0), ("MNGTARG3", 0), ("NEXP", 9),
        ("EXPTIME", 8100.0), ("GFWHM", 2.5), ("RFWHM", 2.4), ("IFWHM", 2.35), ("ZFWHM", 2.3),
        ("VERSDRP3", rel.drp_version), ("MOCK", True), ("MOCKLIB", library),
    ]:
        prim[key] = val
    prim["COMMENT"] = f"desomdb mock cube generated from {library.upper()} SSPs; see truth table"

    wcs = fits.Header()
    for key, val in [
        ("CTYPE1", "RA---TAN"), ("CTYPE2", "DEC--TAN"), ("CTYPE3", "WAVE-LOG"),
        ("CRPIX1", (n + 1) / 2), ("CRPIX2", (n + 1) / 2), ("CRPIX3", 1.0),
        ("CRVAL1", ifura), ("CRVAL2", ifudec), ("CRVAL3", manga.WAVE0_AA),
        ("CD1_1", -manga.SPAXEL_ARCSEC / 3600), ("CD2_2", manga.SPAXEL_ARCSEC / 3600),
        ("CD3_3", manga.WAVE0_AA * np.log(10) * manga.DLOG10),
        ("CUNIT1", "deg"), ("CUNIT2", "deg"), ("CUNIT3", "Angstrom"), ("EQUINOX", 2000.0),
    ]:
        wcs[key] = val

    def cube_hdu(data: np.ndarray, name: str, bunit: str, extra: dict[str, str]) -> fits.ImageHDU:
        hdr = wcs.copy()
        hdr["BUNIT"] = bunit
        for k, v in extra.items():
            hdr[k] = v
        return fits.ImageHDU(data, header=hdr, name=name)

    pre = np.sqrt(lsf**2 - manga.pixel_width_aa(wave) ** 2 / 12)
    lsf_cube = np.broadcast_to(lsf[:, None, None], flux.shape).astype(np.float32)
    pre_cube = np.broadcast_to(pre[:, None, None], flux.shape).astype(np.float32)
    sres = wave / (lsf * FWHM_PER_SIGMA)
    images = _broadband_images(flux, wave)

    obs = Table(
        {
            "MANGAID": [p.mangaid] * 9,
            "PLATEID": np.full(9, p.plate, dtype=np.int32),
            "IFUDESIGN": np.full(9, p.ifudsgn, dtype=np.int32),
            "MJD": np.full(9, 57000 + p.index % 700, dtype=np.int32),
            "EXPNUM": np.arange(9, dtype=np.int32) + 100000 + 9 * p.index,
            "EXPTIME": np.full(9, 900.0),
            "SEEING": np.round(rng.uniform(1.2, 1.8, 9), 3),
            "AIRMASS": np.round(rng.uniform(1.0, 1.3, 9), 3),
        }
    )
    hdus = [
        fits.PrimaryHDU(header=prim),
        cube_hdu(flux, "FLUX", manga.FLUX_UNIT, {"ERRDATA": "IVAR", "QUALDATA": "MASK"}),
        cube_hdu(ivar, "IVAR", "(1E-17 erg/s/cm^2/Ang/spaxel)^-2", {}),
        cube_hdu(mask, "MASK", "", {"MASKNAME": "MANGA_DRP3PIXMASK"}),
        cube_hdu(lsf_cube, rel.lsf_post, "Angstrom", {}),
        cube_hdu(pre_cube, rel.lsf_pre, "Angstrom", {}),
        fits.ImageHDU(wave, name="WAVE"),
        fits.ImageHDU(sres, name="SPECRES"),
        fits.ImageHDU(np.full_like(sres, 50.0), name="SPECRESD"),
        fits.ImageHDU(sres * lsf / pre, name="PRESPECRES"),
        fits.ImageHDU(np.full_like(sres, 50.0), name="PRESPECRESD"),
        fits.BinTableHDU(obs, name="OBSINFO"),
    ]
    for band, img in images.items():
        hdr = fits.Header()
        for k in ("CTYPE1", "CTYPE2", "CRPIX1", "CRPIX2", "CRVAL1", "CRVAL2", "CD1_1", "CD2_2"):
            hdr[k] = wcs[k]
        hdr["BUNIT"] = "nanomaggies/pixel"
        hdus.append(fits.ImageHDU(img, header=hdr, name=f"{band.upper()}IMG"))
    return fits.HDUList(hdus)


def _broadband_images(flux: np.ndarray, wave: np.ndarray) -> dict[str, np.ndarray]:
    """Top-hat g, r, i, z images in nanomaggies (approximate SDSS band edges)."""
    bands = {"g": (4050, 5500), "r": (5600, 6900), "i": (6950, 8350), "z": (8450, 10300)}
    out = {}
    for band, (lo, hi) in bands.items():
        sel = (wave >= lo) & (wave <= hi)
        lam = wave[sel][:, None, None]
        f_nu = (flux[sel] * 1e-17 * lam**2 / 2.99792458e18).mean(axis=0)
        out[band] = (f_nu / 3.631e-29).astype(np.float32)
    return out


def write_cube(hdul: fits.HDUList, path: Path) -> None:
    """Write a gzipped FITS deterministically (no timestamp) and atomically."""
    buf = io.BytesIO()
    hdul.writeto(buf)  # no CHECKSUM cards: astropy stamps them with the current time

    def gzipped(tmp: Path) -> None:
        with tmp.open("wb") as raw, gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1
        ) as gz:
            gz.write(buf.getbuffer())

    atomic_write(path, gzipped)


def _truth_table(
    p: GalaxyParams,
    rel: manga.Release,
    model: SpaxelModel,
    line_flux: dict[str, np.ndarray],
    forestar: np.ndarray,
    library: str,
) -> pa.Table:
    n = model.x.size
    trans = {
        k: dust.nebular_transmission(emission.LINES_AA[k], model.ebv_gas)[:, 0]
        for k in TRUTH_LINES
    }
    obs = {k: line_flux[k] * trans[k] for k in TRUTH_LINES}
    with np.errstate(divide="ignore", invalid="ignore"):
        d_bpt = emission.d_bpt(
            np.log10(obs["NII6583"] / obs["Halpha"]), np.log10(obs["OIII5007"] / obs["Hbeta"])
        )
        ssfr = model.sfr / model.truth.mstar
        log_ssfr = np.log10(np.maximum(ssfr, 10**-14.0))
    cols: dict[str, object] = {
        "release": [rel.name] * n,
        "plateifu": [p.plateifu] * n,
        "mangaid": [p.mangaid] * n,
        "galaxy_type": [p.gtype] * n,
        "library": [library] * n,
        "mass_weight": [model.truth.mass_weight] * n,
        "x": model.x.astype(np.int16),
        "y": model.y.astype(np.int16),
        "radius_re": model.radius_re,
        "mstar_msun": model.truth.mstar,
        "minit_msun": model.truth.minit,
        "l_r_lsun": model.truth.l_r,
        "age_mw_gyr": model.truth.age_mw_gyr,
        "mh_mw": model.truth.mh_mw,
        "log_age_lw": model.truth.log_age_lw,
        "mh_lw": model.truth.mh_lw,
        "l_window_lsun_aa": model.truth.l_window,
        "log_ml_r": model.truth.log_ml_r,
        "ebv_star": model.ebv_star,
        "ebv_gas": model.ebv_gas,
        "sfr_msun_yr": model.sfr,
        "log_ssfr": log_ssfr,
        "d_bpt": d_bpt,
        "vel_kms": model.velocity_kms,
        "sigma_kms": model.sigma_kms,
        "sigma_gas_kms": model.sigma_gas_kms,
        "forestar": forestar[model.y, model.x],
    }
    for k in TRUTH_LINES:
        cols[f"flux_{k.lower()}"] = obs[k]
    return pa.table(cols)
