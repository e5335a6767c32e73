"""The template-library term of the label errors: what a fit cannot know about its templates.

Every fit uses one template library (MIUSCAT). On a galaxy whose stars are not those
templates every fit shares a bias, and neither a fit's noise (re-fits) nor its set-up
(regularisation) shows it: :mod:`desomdb.pipeline.calibrate` measures only those, the
*statistical* error σ_stat. The library term σ_lib is measured instead on mock surveys the
project renders from other libraries (BC03, MaStar) and fits with MIUSCAT, where the truth is
known, and shipped with the package (``desomdb/data/library_term.json``, written by
``benchmarks/bench_library_term.py``): it is a property of the fitter and the libraries, not
of an archive.

Model, per label and per Mondrian bin of what the fit sees (its own light-weighted age
``log_age_lw``, :data:`AGE_EDGES`: young populations carry most of the mismatch): the score
of a calibration baxel is s = sqrt(max((fit − truth)² − σ_stat², 0)), the part of its error
its statistical σ does not explain, and σ_lib is the split-conformal quantile of s at
:data:`CONFIDENCE` in the bin (``crepes.ConformalRegressor`` with Mondrian bins: the
(n + 1)-corrected empirical quantile, infinite in a bin with too few baxels). Then
|fit − truth| ≤ sqrt(σ_stat² + σ_lib²) — the *total* σ — holds for at least 68 % of baxels
exchangeable with the calibration ones. It is validated leaving one library out: fitted on
BC03 and tested on MaStar, and the reverse (``bench_library_term.py``; docs/measured.md, "Error bars
that survive a change of library"). A bin whose σ_lib exceeds the label's median σ_stat there
is one where the library dominates (``dominated``).

Units: each label's own (:mod:`desomdb.science.label_catalogue`); ages of the bins in
log10 yr.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

#: Bin edges (log10 yr) of the fit's light-weighted age: < 1 Gyr, 1-4 Gyr, older.
AGE_EDGES = (-math.inf, 9.0, 9.6, math.inf)
#: Central probability of the intervals (the node labels' 16th-84th percentiles).
CONFIDENCE = 0.68
DATA_FILE = "library_term.json"


@dataclass(frozen=True)
class Term:
    """σ_lib of one label in one bin of the fit's light-weighted age.

    Attributes
    ----------
    label : str
        Column of ``labels``.
    age_lo, age_hi : float
        Bin of ``log_age_lw`` (log10 yr), ``[age_lo, age_hi)``.
    sigma : float
        σ_lib in the label's unit (inf: too few calibration baxels).
    n : int
        Calibration baxels in the bin.
    dominated : bool
        σ_lib above the calibration baxels' median σ_stat: the library, not the noise,
        limits the label here.
    """

    label: str
    age_lo: float
    age_hi: float
    sigma: float
    n: int
    dominated: bool


def age_bin(log_age_lw: np.ndarray) -> np.ndarray:
    """Index into :data:`AGE_EDGES` of each age (log10 yr); NaN goes to the last bin."""
    edges = np.asarray(AGE_EDGES[1:-1])
    x = np.asarray(log_age_lw, dtype=float)
    return np.where(np.isfinite(x), np.searchsorted(edges, x, side="right"), len(edges))


def fit_terms(label: str, fit: np.ndarray, truth: np.ndarray, sigma_stat: np.ndarray,
              log_age_lw: np.ndarray) -> list[Term]:
    """Fit σ_lib of one label from calibration baxels of other libraries.

    Parameters
    ----------
    label : str
    fit, truth, sigma_stat : ndarray, shape (n,)
        Fitted value, mock truth and the fit's statistical σ (label unit); non-finite rows
        are left out.
    log_age_lw : ndarray, shape (n,)
        The fit's light-weighted age (log10 yr): the Mondrian bin.

    Returns
    -------
    list of Term
        One per bin of :data:`AGE_EDGES`.
    """
    import warnings

    from crepes import ConformalRegressor

    ok = np.isfinite(fit) & np.isfinite(truth) & np.isfinite(sigma_stat)
    score = np.sqrt(np.maximum((fit[ok] - truth[ok]) ** 2 - sigma_stat[ok] ** 2, 0.0))
    bins = age_bin(log_age_lw[ok])
    terms = []
    for b in range(len(AGE_EDGES) - 1):
        sel = bins == b
        if sel.sum():
            with warnings.catch_warnings():  # "too few examples": an infinite interval
                warnings.simplefilter("ignore", UserWarning)
                cr = ConformalRegressor().fit(residuals=score[sel])
                sigma = float(cr.predict_int(y_hat=np.zeros(1), confidence=CONFIDENCE)[0, 1])
            median_stat = float(np.median(sigma_stat[ok][sel]))
        else:
            sigma, median_stat = math.inf, math.nan
        terms.append(Term(label, AGE_EDGES[b], AGE_EDGES[b + 1], sigma, int(sel.sum()),
                          bool(sigma > median_stat)))
    return terms


def sigma_library(terms: list[Term], label: str, log_age_lw: np.ndarray) -> np.ndarray:
    """σ_lib of ``label`` for fits of the given light-weighted ages (log10 yr), shape (n,).

    NaN ages get the label's largest finite σ_lib; a label without terms gets NaN (no
    library term measured: its total interval is not defined).
    """
    mine = sorted((t for t in terms if t.label == label), key=lambda t: t.age_lo)
    x = np.asarray(log_age_lw, dtype=float)
    if not mine:
        return np.full(x.shape, np.nan)
    table = np.array([t.sigma for t in mine])
    finite = table[np.isfinite(table)]
    worst = float(finite.max()) if finite.size else math.inf
    out = table[np.minimum(age_bin(x), len(mine) - 1)]
    return np.where(np.isfinite(x), out, worst)


def total_sigma(sigma_stat: np.ndarray, sigma_lib: np.ndarray) -> np.ndarray:
    """Return sqrt(σ_stat² + σ_lib²) (label unit)."""
    return np.sqrt(np.asarray(sigma_stat, float) ** 2 + np.asarray(sigma_lib, float) ** 2)


def coverage(fit: np.ndarray, truth: np.ndarray, sigma: np.ndarray) -> float:
    """Fraction of finite rows whose truth lies within fit ± σ."""
    ok = np.isfinite(fit) & np.isfinite(truth) & np.isfinite(sigma)
    return float(np.mean(np.abs(fit[ok] - truth[ok]) <= sigma[ok])) if ok.any() else math.nan


def save(terms: list[Term], path: Path, provenance: dict[str, object]) -> None:
    """Write terms and how they were measured as JSON (infinite σ as null)."""
    rows = [{**asdict(t), "sigma": t.sigma if math.isfinite(t.sigma) else None,
             "age_lo": t.age_lo if math.isfinite(t.age_lo) else None,
             "age_hi": t.age_hi if math.isfinite(t.age_hi) else None} for t in terms]
    path.write_text(json.dumps({"provenance": provenance, "terms": rows}, indent=1) + "\n")


def load(path: Path | None = None) -> list[Term]:
    """Read the shipped terms (or those at ``path``); empty when none were measured."""
    if path is None:
        source = resources.files("desomdb.data").joinpath(DATA_FILE)
        if not source.is_file():
            return []
        text = source.read_text()
    else:
        text = path.read_text()
    return [Term(r["label"], -math.inf if r["age_lo"] is None else r["age_lo"],
                 math.inf if r["age_hi"] is None else r["age_hi"],
                 math.inf if r["sigma"] is None else r["sigma"], r["n"], r["dominated"])
            for r in json.loads(text)["terms"]]
