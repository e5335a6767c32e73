"""Physical constants and the cosmology, from astropy, in the units the code uses.

One place for them: the pipeline (labels) and the mock (rendering) must agree.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from astropy import constants as const
from astropy import units as u

#: Nominal solar luminosity (IAU 2015), erg/s.
L_SUN_ERG_S = float(const.L_sun.cgs.value)
#: One megaparsec in cm.
MPC_CM = float(u.Mpc.to(u.cm))
#: Speed of light, km/s.
C_KMS = float(const.c.to(u.km / u.s).value)
#: Gaussian FWHM / sigma = 2 sqrt(2 ln 2) ≈ 2.3548.
FWHM_PER_SIGMA = float(2.0 * np.sqrt(2.0 * np.log(2.0)))
#: The cosmology: flat ΛCDM with H0 = 70 km/s/Mpc and Ωm = 0.3, for the luminosity distances
#: of stellar masses and SFRs (the mock renders with the same one).
H0_KMS_MPC = 70.0
OMEGA_M = 0.3


@lru_cache(maxsize=1)
def cosmology() -> Any:
    """Return the astropy cosmology (:data:`H0_KMS_MPC`, :data:`OMEGA_M`).

    Built on first use: importing ``astropy.cosmology`` costs a commands' start-up ~0.3 s.
    """
    from astropy.cosmology import FlatLambdaCDM

    return FlatLambdaCDM(H0=H0_KMS_MPC, Om0=OMEGA_M)


def luminosity_distance_cm(z: float) -> float:
    """Luminosity distance of redshift ``z`` in cm."""
    return float(cosmology().luminosity_distance(z).value) * MPC_CM
