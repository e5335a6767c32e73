"""On-sky geometry shared by the mock generator and ingest.

Conventions
-----------
- Spaxel indices are 0-based, numpy ``cube[:, y, x]``; x runs along the cube's RA axis
  (FITS axis 1, RA decreasing with x), y along Dec.
- Offsets are arcsec on the sky: ``dra`` = ΔRA·cos(Dec) (east positive), ``ddec`` = ΔDec
  (north positive).
- Position angles are degrees east of north (the NSA ``elpetro_phi`` convention).
"""

from __future__ import annotations

import numpy as np


def elliptical_radius(
    dra: np.ndarray, ddec: np.ndarray, pa_deg: float, ba: float
) -> np.ndarray:
    """Semi-major-axis-equivalent radius of an ellipse through each point.

    Parameters
    ----------
    dra, ddec : ndarray, same shape
        Sky offsets from the galaxy centre, arcsec (east, north positive).
    pa_deg : float
        Major-axis position angle, degrees east of north.
    ba : float
        Axis ratio b/a in (0, 1].

    Returns
    -------
    ndarray
        Elliptical radius, arcsec (divide by R_e for ``radius_re``).
    """
    pa = np.deg2rad(pa_deg)
    major = dra * np.sin(pa) + ddec * np.cos(pa)
    minor = dra * np.cos(pa) - ddec * np.sin(pa)
    return np.asarray(np.hypot(major, minor / max(ba, 1e-3)))


def disc_coordinates(
    dra: np.ndarray, ddec: np.ndarray, pa_deg: float, ba: float
) -> tuple[np.ndarray, np.ndarray]:
    """Deprojected radius (arcsec) and azimuth (rad from the major axis) in a thin disc."""
    pa = np.deg2rad(pa_deg)
    major = dra * np.sin(pa) + ddec * np.cos(pa)
    minor = (dra * np.cos(pa) - ddec * np.sin(pa)) / max(ba, 1e-3)
    return np.asarray(np.hypot(major, minor)), np.asarray(np.arctan2(minor, major))


def hexagon_margin(dx: np.ndarray, dy: np.ndarray, flat_diameter: float) -> np.ndarray:
    """Signed distance inside a regular hexagon with flat top and bottom edges.

    Parameters
    ----------
    dx, dy : ndarray
        Offsets from the hexagon centre (any unit).
    flat_diameter : float
        Flat-to-flat diameter, same unit.

    Returns
    -------
    ndarray
        Distance to the nearest edge: positive inside, negative outside.
    """
    angles = np.deg2rad([30.0, 90.0, 150.0])
    proj = np.stack([np.abs(dx * np.cos(a) + dy * np.sin(a)) for a in angles])
    return np.asarray(flat_diameter / 2.0 - proj.max(axis=0))


def spaxel_offsets(n_x: int, n_y: int, spaxel_arcsec: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Sky offsets of every spaxel from the cube centre (the WCS reference point).

    Returns
    -------
    dra, ddec : ndarray, shape (n_y, n_x)
        Arcsec; the cube centre is at 0-based pixel ((n_x - 1) / 2, (n_y - 1) / 2).
    """
    yy, xx = np.mgrid[0:n_y, 0:n_x].astype(float)
    dra = -(xx - (n_x - 1) / 2.0) * spaxel_arcsec
    ddec = (yy - (n_y - 1) / 2.0) * spaxel_arcsec
    return dra, ddec
