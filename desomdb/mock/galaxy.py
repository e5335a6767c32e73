"""Physics of one mock galaxy: star formation histories, dust, gas and kinematics per spaxel.

Each spaxel mixes the SSPs of the template library by the star formation history (SFH) of a
bulge and a disc component; nothing is one template per spaxel. The truth stored for a
spaxel is computed from exactly the weights that made its spectrum.

Units and conventions
---------------------
- Lookback times and ages in Gyr; SFRs in M_sun/yr; masses in M_sun.
- Stellar mass = living stars + remnants (Vazdekis 2012), the quantity pPXF M*/L uses.
- ``age_mw_gyr`` and ``mh_mw``: weighted by current stellar mass, linear in age (Gyr) and in
  [M/H] (dex) over the template grid values actually used.
- ``log_ml_r``: log10(M* / L_r), L_r the dust-free SDSS r-band luminosity (solar units).
- A library without living + remnant masses (BC03 as bundled): the galaxy's mass is taken
  as initial mass formed, age and [M/H] are weighted by initial mass (``mass_weight`` =
  ``initial``), and the current stellar mass, M*/L_r and sSFR are unknown (NaN) rather
  than guessed from another library's mass-loss table (other IMF, other tracks).
- A library whose mass scale is a proxy (MaStar, ``mass_weight`` = ``none``): the star
  formation history mixes its SSPs through the proxy, and only light-weighted truths are
  given; every mass-weighted truth and the initial mass are NaN.
- ``log_age_lw`` (log10 yr) and ``mh_lw`` (dex): weighted by each SSP's dust-free mean flux
  in ``templates.LIGHT_WINDOW_AA`` (5070-5950 Å), as the fits' light weights are.
- ``log_ssfr``: log10(SFR / M*) in yr^-1 from the *instantaneous* SFR of the analytic SFH;
  quenched spaxels (SFR = 0) are stored at the floor -14. Hα from star formation follows
  Kennicutt (1998, Salpeter IMF) for that SFR.
- ``ebv_star``: Calzetti (2000) stellar E(B-V); ``ebv_gas`` = ebv_star / 0.44 with 10 %
  scatter (Calzetti 2000), applied to lines with Cardelli (1989).
- Line fluxes: 1e-17 erg/s/cm^2, attenuated by nebular dust, *not* by the Milky Way
  (ingest removes the foreground), summed over doublet members where named so.
- No PSF blurring is applied, so every spaxel's truth is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from desomdb.science import emission, geometry
from desomdb.science.templates import TemplateLibrary
from desomdb.survey import manga

GALAXY_TYPES = (
    "star_forming",
    "passive",
    "green_valley",
    "post_starburst",
    "dusty_edge_on",
    "agn",
)
TYPE_PROBABILITIES = (0.30, 0.25, 0.12, 0.10, 0.10, 0.13)
LOG_SSFR_FLOOR = -14.0
SIGMA_LEVEL_KMS = 30.0  # stellar dispersion is rendered in steps of this size


@dataclass(frozen=True)
class GalaxyParams:
    """Everything needed to render one mock cube (drawn by :func:`draw_galaxy`)."""

    index: int
    seed: int
    gtype: str
    plate: int
    ifudsgn: int
    mangaid: str
    n_fibres: int
    ra: float
    dec: float
    z: float
    ebv_gal: float
    log_mstar: float
    th50_arcsec: float
    ba: float
    pa_deg: float
    sersic_n: float
    bulge_frac: float
    bulge_re_frac: float
    disc_tau0: float
    disc_mh0: float
    mh_gradient: float
    quench_gyr: float
    quench_factor: float
    burst_frac: float
    burst_age_gyr: float
    ebv0: float
    agn_lum_ha: float
    agn_ratios: tuple[float, float]
    v_max_kms: float
    sigma0_kms: float
    centre_offset_arcsec: tuple[float, float]

    @property
    def plateifu(self) -> str:
        """``<plate>-<ifudsgn>``."""
        return f"{self.plate}-{self.ifudsgn}"

    @property
    def obj_radec(self) -> tuple[float, float]:
        """Galaxy centre (OBJRA, OBJDEC), degrees; the IFU centre is (ra, dec)."""
        dra, ddec = self.centre_offset_arcsec
        return (self.ra + dra / 3600 / np.cos(np.deg2rad(self.dec)), self.dec + ddec / 3600)


def draw_galaxy(index: int, seed: int, n_fibres_choices: tuple[int, ...]) -> GalaxyParams:
    """Draw the parameters of galaxy ``index`` of a survey with ``seed``.

    The first six galaxies of every survey cycle through :data:`GALAXY_TYPES` so even tiny
    surveys span the paper's map; later ones are drawn with :data:`TYPE_PROBABILITIES`.
    """
    rng = np.random.default_rng([seed, index, 1])
    gtype = (
        GALAXY_TYPES[index]
        if index < len(GALAXY_TYPES)
        else str(rng.choice(GALAXY_TYPES, p=TYPE_PROBABILITIES))
    )
    n_fibres = int(rng.choice(n_fibres_choices))
    _, hex_diam = manga.IFU_GEOMETRY[n_fibres]
    # The primary sample covers ~1.5 R_e: th50 ~ IFU radius / 1.5.
    th50 = hex_diam / 2 / 1.5 * rng.uniform(0.8, 1.25)
    plate = 7443 + (seed * 131 + index // 17) % 4000
    ifudsgn = n_fibres * 100 + 1 + index % 17
    ba = {
        "dusty_edge_on": rng.uniform(0.15, 0.3),
        "passive": rng.uniform(0.55, 0.95),
    }.get(gtype, rng.uniform(0.3, 0.95))
    passive_like = gtype in ("passive",)
    bulge_frac = {
        "passive": rng.uniform(0.7, 0.95),
        "green_valley": rng.uniform(0.3, 0.5),
        "post_starburst": rng.uniform(0.2, 0.4),
        "agn": rng.uniform(0.25, 0.45),
    }.get(gtype, rng.uniform(0.0, 0.2))
    log_mstar = rng.uniform(10.6, 11.4) if passive_like else rng.uniform(9.6, 10.9)
    # MaNGA picks the IFU to cover ~1.5 R_e, so the redshift follows from the physical size
    # (R_e-mass relation) and the angular size (small-angle, Hubble-law distance).
    re_kpc = 4.0 * 10 ** (0.25 * (log_mstar - 10.5)) * rng.uniform(0.8, 1.25)
    z = np.clip(re_kpc / 1e3 / np.deg2rad(th50 / 3600) * 70.0 / 299792.458, 0.01, 0.15)
    quench, qfac, burst_frac, burst_age = 0.0, 1.0, 0.0, 0.0
    tau = rng.uniform(5.0, 10.0)
    if gtype == "passive":
        tau, quench, qfac = rng.uniform(1.0, 2.0), rng.uniform(1.0, 3.0), 0.0
    elif gtype == "green_valley":
        tau, quench, qfac = rng.uniform(2.5, 4.0), rng.uniform(0.5, 1.5), rng.uniform(0.05, 0.2)
    elif gtype == "post_starburst":
        tau, burst_frac, burst_age = rng.uniform(2.0, 4.0), rng.uniform(0.1, 0.3), rng.uniform(
            0.3, 1.0
        )
        quench, qfac = burst_age - 0.15, 0.0
    elif gtype == "agn":
        tau = rng.uniform(3.0, 6.0)
    ebv0 = {
        "passive": rng.uniform(0.0, 0.05),
        "post_starburst": rng.uniform(0.03, 0.1),
        "green_valley": rng.uniform(0.05, 0.15),
        "dusty_edge_on": rng.uniform(0.25, 0.45),
    }.get(gtype, rng.uniform(0.08, 0.25))
    agn_ratios = (
        (rng.uniform(0.0, 0.25), rng.uniform(0.5, 1.0))  # Seyfert-like
        if rng.uniform() < 0.5
        else (rng.uniform(0.0, 0.2), rng.uniform(-0.1, 0.3))  # LINER-like
    )
    return GalaxyParams(
        index=index,
        seed=seed,
        gtype=gtype,
        plate=plate,
        ifudsgn=ifudsgn,
        mangaid=f"1-{(seed * 7919 + index * 104729) % 900000 + 100000}",
        n_fibres=n_fibres,
        ra=float(rng.uniform(120.0, 240.0)),
        dec=float(rng.uniform(0.0, 60.0)),
        z=float(z),
        ebv_gal=float(rng.uniform(0.01, 0.08)),
        log_mstar=float(log_mstar),
        th50_arcsec=float(th50),
        ba=float(ba),
        pa_deg=float(rng.uniform(0.0, 180.0)),
        sersic_n=float(np.clip(1.0 + 4.0 * bulge_frac + rng.normal(0, 0.3), 0.5, 6.0)),
        bulge_frac=float(bulge_frac),
        bulge_re_frac=float(1.0 if passive_like else rng.uniform(0.2, 0.35)),
        disc_tau0=float(tau),
        disc_mh0=float(rng.uniform(-0.1, 0.15) if not passive_like else rng.uniform(0.0, 0.2)),
        mh_gradient=float(rng.uniform(-0.25, -0.05)),
        quench_gyr=float(quench),
        quench_factor=float(qfac),
        burst_frac=float(burst_frac),
        burst_age_gyr=float(burst_age),
        ebv0=float(ebv0),
        agn_lum_ha=float(10 ** rng.uniform(39.8, 40.8)) if gtype == "agn" else 0.0,
        agn_ratios=(float(agn_ratios[0]), float(agn_ratios[1])),
        v_max_kms=float(rng.uniform(60, 120) if passive_like else rng.uniform(150, 280)),
        sigma0_kms=float(rng.uniform(160, 260) if passive_like else rng.uniform(60, 140)),
        # The galaxy centre is offset slightly from the IFU centre, as OBJRA vs IFURA.
        centre_offset_arcsec=(float(rng.normal(0, 0.2)), float(rng.normal(0, 0.2))),
    )


# --------------------------------------------------------------------------------------
# Star formation histories
# --------------------------------------------------------------------------------------

def age_bin_edges(ages_gyr: np.ndarray) -> np.ndarray:
    """Edges (Gyr) of the lookback-time bin each SSP age represents; shape (n_age + 1,)."""
    mid = np.sqrt(ages_gyr[1:] * ages_gyr[:-1])
    return np.concatenate([[0.0], mid, [ages_gyr[-1] * np.sqrt(ages_gyr[-1] / ages_gyr[-2])]])


def sfh_mass_fractions(
    ages_gyr: np.ndarray,
    tau_gyr: np.ndarray,
    t_start_gyr: float,
    quench_gyr: np.ndarray | float = 0.0,
    quench_factor: float = 0.0,
    burst_frac: np.ndarray | float = 0.0,
    burst_age_gyr: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Compute the initial mass formed per SSP age bin for a delayed, quenched, bursty SFH.

    SFR(t) ∝ exp(-(t_start - t)/τ) for lookback t ≤ t_start, multiplied by ``quench_factor``
    for t < ``quench_gyr``; a fraction ``burst_frac`` of the mass forms in a burst at
    ``burst_age_gyr`` (Gaussian in log age, 0.05 dex).

    Parameters
    ----------
    ages_gyr : ndarray, shape (n_age,)
    tau_gyr : ndarray, shape (n,)
        e-folding time of each of n spaxels.
    t_start_gyr : float
    quench_gyr, burst_frac : float or ndarray, shape (n,)

    Returns
    -------
    fractions : ndarray, shape (n, n_age)
        Initial mass formed per age bin, rows summing to 1.
    sfr_now : ndarray, shape (n,)
        Instantaneous SFR per unit initial mass formed, yr^-1.
    """
    tau = np.atleast_1d(np.asarray(tau_gyr, dtype=float))[:, None]
    tq = np.broadcast_to(np.asarray(quench_gyr, dtype=float), tau.shape[:1])[:, None]
    edges = age_bin_edges(ages_gyr)
    lo, hi = np.minimum(edges[:-1], t_start_gyr), np.minimum(edges[1:], t_start_gyr)

    def integral(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        late, early = np.exp(-(t_start_gyr - b) / tau), np.exp(-(t_start_gyr - a) / tau)
        return np.asarray(tau * (late - early))

    # Split each bin at the quench time: before it the SFR is scaled by quench_factor.
    cut = np.clip(tq, lo, hi)
    mass = quench_factor * integral(lo, cut) + integral(cut, hi)
    sfr0 = np.where(tq[:, 0] > 0, quench_factor, 1.0) * np.exp(-t_start_gyr / tau[:, 0])
    total = mass.sum(axis=1)
    bf = np.broadcast_to(np.asarray(burst_frac, dtype=float), total.shape)
    mass /= total[:, None]
    sfr0 = sfr0 / total * (1 - bf)
    if np.any(bf > 0):
        dlog = np.log10(ages_gyr) - np.log10(max(burst_age_gyr, 1e-3))
        logw = np.exp(-0.5 * (dlog / 0.05) ** 2)
        burst = logw / logw.sum()
        mass = (1 - bf)[:, None] * mass + bf[:, None] * burst[None, :]
    return mass, sfr0 / 1e9


def metal_weights(metals: np.ndarray, mh: np.ndarray) -> np.ndarray:
    """Split each [M/H] linearly between the two bracketing grid metallicities.

    Returns
    -------
    ndarray, shape (n, n_metal)
        Non-negative weights summing to 1 per row; [M/H] outside the grid is clipped.
    """
    mh = np.clip(np.atleast_1d(mh), metals[0], metals[-1])
    j = np.clip(np.searchsorted(metals, mh) - 1, 0, metals.size - 2)
    frac = (mh - metals[j]) / (metals[j + 1] - metals[j])
    w = np.zeros((mh.size, metals.size))
    rows = np.arange(mh.size)
    w[rows, j] = 1 - frac
    w[rows, j + 1] += frac
    return w


@dataclass
class PopulationTruth:
    """Population truth of n spaxels (see module docstring for units)."""

    mstar: np.ndarray
    l_r: np.ndarray
    age_mw_gyr: np.ndarray
    mh_mw: np.ndarray
    log_ml_r: np.ndarray
    minit: np.ndarray
    #: Light-weighted log10 age (yr) and [M/H] (dex), weighted by each SSP's mean flux in
    #: :data:`desomdb.science.templates.LIGHT_WINDOW_AA` (dust-free), and that light (L_sun/Å).
    log_age_lw: np.ndarray
    mh_lw: np.ndarray
    l_window: np.ndarray
    #: Which mass weights ``age_mw_gyr`` and ``mh_mw``: ``current``, ``initial``, or ``none``
    #: (a library whose mass scale is a proxy: MaStar; mass-weighted truths are NaN).
    mass_weight: str = "current"


def population_truth(weights: np.ndarray, lib: TemplateLibrary) -> PopulationTruth:
    """Mass- and light-weighted age and [M/H], M*, L_r and M*/L_r of SSP mixtures.

    Weighted by current (living + remnant) mass where the library tabulates it, else by
    initial mass, with M* and M*/L_r NaN (see the module docstring); a library whose mass
    scale is a proxy (``lib.mass_proxy``) has light-weighted truths only. Light weights are
    each SSP's mean flux in the light window (``templates.LIGHT_WINDOW_AA``) times its mass.

    Parameters
    ----------
    weights : ndarray, shape (n, n_age, n_metal)
        Initial mass (M_sun) formed in each SSP.
    lib : TemplateLibrary
    """
    minit = weights.sum(axis=(1, 2))
    if lib.has_current_mass:
        weighting, kind = weights * lib.masses[None], "current"
    elif lib.mass_proxy:
        weighting, kind = np.full(weights.shape, np.nan), "none"
    else:
        weighting, kind = weights, "initial"
    mstar = weighting.sum(axis=(1, 2)) if kind == "current" else np.full(minit.shape, np.nan)
    l_r = (weights * lib.r_band_luminosity()[None]).sum(axis=(1, 2))
    ages = lib.ages_gyr[None, :, None]
    mhs = lib.metals_mh[None, None, :]
    light = weights * lib.light_in_window()[None]
    with np.errstate(divide="ignore", invalid="ignore"):
        total = weighting.sum(axis=(1, 2))
        age = (weighting * ages).sum(axis=(1, 2)) / total
        mh = (weighting * mhs).sum(axis=(1, 2)) / total
        log_ml = np.log10(mstar / l_r)
        l_window = light.sum(axis=(1, 2))
        log_age_lw = (light * np.log10(ages * 1e9)).sum(axis=(1, 2)) / l_window
        mh_lw = (light * mhs).sum(axis=(1, 2)) / l_window
    if kind == "none":
        minit = np.full(minit.shape, np.nan)
    return PopulationTruth(mstar, l_r, age, mh, log_ml, minit, log_age_lw, mh_lw, l_window,
                           kind)


# --------------------------------------------------------------------------------------
# Spatial model
# --------------------------------------------------------------------------------------

def sersic_profile(r_over_re: np.ndarray, n: float) -> np.ndarray:
    """Sersic surface density normalised to 1 at R_e (b_n from Ciotti & Bertin 1999)."""
    b_n = 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n**2)
    return np.asarray(np.exp(-b_n * (np.power(r_over_re, 1 / n) - 1)))


@dataclass
class SpaxelModel:
    """Per-spaxel physical state of a galaxy inside its IFU footprint (n spaxels)."""

    x: np.ndarray
    y: np.ndarray
    radius_re: np.ndarray
    weights: np.ndarray  # (n, n_age, n_metal) initial M_sun
    sfr: np.ndarray  # M_sun/yr
    ebv_star: np.ndarray
    ebv_gas: np.ndarray
    velocity_kms: np.ndarray
    sigma_kms: np.ndarray
    sigma_gas_kms: np.ndarray
    lines_lum: dict[str, np.ndarray]  # intrinsic, erg/s
    truth: PopulationTruth


def spaxel_model(
    p: GalaxyParams,
    lib: TemplateLibrary,
    x: np.ndarray,
    y: np.ndarray,
    dra: np.ndarray,
    ddec: np.ndarray,
    rng: np.random.Generator,
) -> SpaxelModel:
    """Compute the physical state of each covered spaxel.

    Parameters
    ----------
    p : GalaxyParams
    lib : TemplateLibrary
    x, y : ndarray, shape (n,)
        Spaxel indices.
    dra, ddec : ndarray, shape (n,)
        Sky offsets from the galaxy centre, arcsec.
    rng : numpy.random.Generator
    """
    r_ell = geometry.elliptical_radius(dra, ddec, p.pa_deg, p.ba)
    r_re = r_ell / p.th50_arcsec
    # Bulge: rounder (b/a >= 0.7) and more compact than the disc.
    ba_bulge = max(p.ba, 0.7)
    r_bulge = geometry.elliptical_radius(dra, ddec, p.pa_deg, ba_bulge) / (
        p.th50_arcsec * p.bulge_re_frac
    )
    n_bulge = 4.0 if p.gtype == "passive" else 2.5
    area = manga.SPAXEL_ARCSEC**2
    sb_bulge = sersic_profile(r_bulge, n_bulge)
    sb_disc = sersic_profile(r_re, 1.0)
    # Normalise the surface densities so each component integrates to its mass.
    norm_b = _sersic_total(n_bulge, p.th50_arcsec * p.bulge_re_frac, ba_bulge)
    norm_d = _sersic_total(1.0, p.th50_arcsec, p.ba)
    m_total = 10**p.log_mstar
    m_bulge = m_total * p.bulge_frac * sb_bulge * area / norm_b
    m_disc = m_total * (1 - p.bulge_frac) * sb_disc * area / norm_d

    ages = lib.ages_gyr
    n = x.size
    bulge_frac_sfh, _ = sfh_mass_fractions(
        ages, np.full(1, 0.8), 12.5, quench_gyr=3.0, quench_factor=0.0
    )
    mh_lo, mh_hi = float(lib.metals_mh[0]), float(lib.metals_mh[-1])
    bulge_mh = np.clip(0.15 + 0.5 * p.mh_gradient * r_bulge, mh_lo, mh_hi)
    tau_d = p.disc_tau0 * (1 + 0.25 * np.minimum(r_re, 3.0))
    quench_d = p.quench_gyr * np.exp(-r_re) if p.gtype == "green_valley" else p.quench_gyr
    burst_d = p.burst_frac * np.exp(-r_re / 1.5)
    disc_frac_sfh, disc_sfr0 = sfh_mass_fractions(
        ages, tau_d, 11.0, quench_d, p.quench_factor, burst_d, p.burst_age_gyr
    )
    disc_mh = np.clip(p.disc_mh0 + p.mh_gradient * np.minimum(r_re, 3.0), mh_lo, mh_hi)

    w_metal_b = metal_weights(lib.metals_mh, bulge_mh)
    w_metal_d = metal_weights(lib.metals_mh, disc_mh)
    # Convert current (living + remnant) mass into initial mass formed; without a mass
    # table the galaxy's mass is the initial mass itself.
    unit_b = bulge_frac_sfh[0][None, :, None] * w_metal_b[:, None, :]
    unit_d = disc_frac_sfh[:, :, None] * w_metal_d[:, None, :]
    kept = lib.masses if lib.has_current_mass else np.ones(lib.shape)
    ret_b = (unit_b * kept[None]).sum(axis=(1, 2))
    ret_d = (unit_d * kept[None]).sum(axis=(1, 2))
    formed_b = m_bulge / ret_b
    formed_d = m_disc / ret_d
    weights = formed_b[:, None, None] * unit_b + formed_d[:, None, None] * unit_d
    truth = population_truth(weights, lib)
    sfr = formed_d * disc_sfr0

    incl_boost = np.clip(1 / np.sqrt(p.ba), 1, 1.6)
    ebv_star = p.ebv0 * incl_boost * (0.6 + 0.6 * np.exp(-r_re)) * rng.uniform(0.9, 1.1, n)
    ebv_gas = ebv_star / 0.44 * rng.uniform(0.9, 1.1, n)

    r_disc, phi = geometry.disc_coordinates(dra, ddec, p.pa_deg, p.ba)
    sin_i = np.sqrt(max(0.0, 1 - p.ba**2))
    r_turn = 0.3 * p.th50_arcsec
    velocity = p.v_max_kms * np.tanh(r_disc / r_turn) * sin_i * np.cos(phi)
    sigma_cont = p.sigma0_kms * (0.55 + 0.45 * np.exp(-r_re / 0.5))
    sigma = np.maximum(np.round(sigma_cont / SIGMA_LEVEL_KMS), 1) * SIGMA_LEVEL_KMS
    sigma_gas = np.full(n, 40.0) + 30.0 * np.exp(-r_re)

    lines = _line_luminosities(p, truth, sfr, disc_mh, r_ell, lib, rng)
    return SpaxelModel(
        x, y, r_re, weights, sfr, ebv_star, ebv_gas, velocity, sigma, sigma_gas, lines, truth
    )


def _sersic_total(n: float, re_arcsec: float, ba: float) -> float:
    """Total of ``sersic_profile`` over the sky (arcsec^2): 2π n q R_e² e^b b^-2n Γ(2n)."""
    from scipy.special import gamma

    b_n = 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n**2)
    return float(2 * np.pi * n * ba * re_arcsec**2 * np.exp(b_n) * b_n ** (-2 * n) * gamma(2 * n))


def _line_luminosities(
    p: GalaxyParams,
    truth: PopulationTruth,
    sfr: np.ndarray,
    gas_mh: np.ndarray,
    r_arcsec: np.ndarray,
    lib: TemplateLibrary,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Intrinsic line luminosities (erg/s) of star formation, old-star (DIG) and AGN gas."""
    n = sfr.size
    ha_sf = emission.halpha_from_sfr(sfr)
    # Diffuse/retired-galaxy emission powered by old stars: EW(Hα) ~ 0.5-1 Å of the r-band
    # continuum (L_r in L_sun over the ~1100 Å-wide r band, expressed in erg/s/Å).
    cont_ha = truth.l_r * 3.828e33 / 1100.0 * 0.5
    ha_dig = cont_ha * rng.uniform(0.5, 1.0)
    ha_agn = p.agn_lum_ha * np.exp(-r_arcsec / 1.0)
    ha_agn /= max(np.exp(-r_arcsec / 1.0).sum(), 1e-30)
    # Star-forming ratios: [NII]/Hα rises with gas metallicity; [OIII]/Hβ sits 0.1-0.25 dex
    # below the Kauffmann et al. (2003) curve.
    x_sf = np.clip(-0.55 + 0.9 * gas_mh, -1.2, -0.3)
    y_sf = emission.kauffmann03(x_sf) - rng.uniform(0.1, 0.25, n)
    x_dig, y_dig = rng.uniform(-0.05, 0.1, n), rng.uniform(-0.1, 0.2, n)
    x_agn, y_agn = p.agn_ratios
    comps = [
        (ha_sf, x_sf, y_sf, -0.5, -1.4, 0.45),
        (ha_dig, x_dig, y_dig, -0.2, -0.7, 0.3),
        (ha_agn, np.full(n, x_agn), np.full(n, y_agn), -0.1, -0.6, 0.4),
    ]
    out = {name: np.zeros(n) for name in emission.LINES_AA}
    for ha, x, y, log_sii, log_oi, log_oii in comps:
        hb = ha / emission.BALMER_TO_HBETA["Halpha"]
        out["Halpha"] += ha
        out["Hbeta"] += hb
        out["Hgamma"] += hb * emission.BALMER_TO_HBETA["Hgamma"]
        out["Hdelta"] += hb * emission.BALMER_TO_HBETA["Hdelta"]
        nii = ha * 10**x
        oiii = hb * 10**y
        out["NII6583"] += nii
        out["NII6548"] += nii * 0.33  # the pPXF doublet ratio
        out["OIII5007"] += oiii
        out["OIII4959"] += oiii * 0.33
        sii = ha * 10**log_sii
        out["SII6716"] += sii * 1.4 / 2.4
        out["SII6731"] += sii / 2.4
        out["OI6300"] += ha * 10**log_oi
        oii = hb * 10**log_oii * 2.0
        out["OII3726"] += oii * 0.8 / 1.8
        out["OII3729"] += oii / 1.8
    return out
