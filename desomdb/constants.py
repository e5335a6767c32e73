"""Physical constants and the cosmology, from astropy, in the units the code uses.

One place for them: the pipeline (labels) and the mock (rendering) must agree.
"""

from __future__ import annotations

import numpy as np
from astropy import constants as const
from astropy import units as u
from astropy.cosmology import FlatLambdaCDM

#: Nominal solar luminosity (IAU 2015), erg/s.
L_SUN_ERG_S = float(const.L_sun.cgs.value)
#: One megaparsec in cm.
MPC_CM = float(u.Mpc.to(u.cm))
#: Speed of light, km/s.
C_KMS = float(const.c.to(u.km / u.s).value)
#: Gaussian FWHM / sigma = 2 sqrt(2 ln 2) ≈ 2.3548.
FWHM_PER_SIGMA = float(2.0 * np.sqrt(2.0 * np.log(2.0)))
#: Flat ΛCDM with H0 = 70 km/s/Mpc and Ωm = 0.3: luminosity distances for stellar masses
#: and SFRs (the mock renders with the same one).
COSMOLOGY = FlatLambdaCDM(H0=70.0, Om0=0.3)
