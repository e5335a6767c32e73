"""The template-library term (science.library_term): conformal σ_lib, lookup, storage."""

import math

import numpy as np
import pytest

from desomdb.science import library_term


def _sample(n: int, seed: int) -> tuple[np.ndarray, ...]:
    # Young fits (log age 8.5) share a bias of +0.10 and the old ones (10.0) none; the
    # statistical σ (0.03) explains only the noise.
    rng = np.random.default_rng(seed)
    age = np.where(rng.random(n) < 0.5, 8.5, 10.0)
    truth = rng.normal(0.0, 0.2, n)
    stat = np.full(n, 0.03)
    fit = truth + np.where(age < 9, 0.10, 0.0) + rng.normal(0.0, 0.03, n)
    return fit, truth, stat, age


def test_the_total_sigma_covers_held_out_baxels_where_the_statistical_one_cannot() -> None:
    terms = library_term.fit_terms("mh_lw", *_sample(400, 0))
    young, middle, old = terms
    assert young.dominated and not old.dominated and middle.n == 0 and math.isinf(middle.sigma)
    assert young.sigma == pytest.approx(0.1, abs=0.03) and old.sigma < 0.02
    fit, truth, stat, age = _sample(4000, 1)
    total = library_term.total_sigma(stat, library_term.sigma_library(terms, "mh_lw", age))
    is_young = age < 9
    assert library_term.coverage(fit[is_young], truth[is_young], stat[is_young]) < 0.1
    for sel in (is_young, ~is_young):
        assert library_term.coverage(fit[sel], truth[sel], total[sel]) == pytest.approx(
            0.68, abs=0.05)


def test_sigma_is_the_conformal_quantile_of_the_unexplained_error() -> None:
    # One bin: the (n + 1)-corrected 68 % quantile of sqrt(max(err² − σ_stat², 0)), the
    # ceil(0.68 (n + 1))-th smallest score (crepes rounds 0.32 (n + 1) down in floating point
    # and may take the next one: never less coverage).
    fit, truth, stat, _ = _sample(99, 2)
    age = np.full(fit.size, 10.0)
    score = np.sort(np.sqrt(np.maximum((fit - truth) ** 2 - stat**2, 0)))
    k = math.ceil(0.68 * (score.size + 1)) - 1
    got = library_term.fit_terms("x", fit, truth, stat, age)[2].sigma
    assert got in (score[k], score[k + 1])


def test_lookup_and_storage(tmp_path) -> None:
    terms = library_term.fit_terms("mh_lw", *_sample(300, 3))
    sigma = library_term.sigma_library(terms, "mh_lw", np.array([8.0, 9.3, 11.0, np.nan]))
    assert sigma[0] == terms[0].sigma and sigma[2] == terms[2].sigma
    assert math.isinf(sigma[1])  # an empty bin: no interval can be promised
    assert sigma[3] == max(t.sigma for t in terms if math.isfinite(t.sigma))
    assert np.isnan(library_term.sigma_library(terms, "sigma", np.array([9.0]))).all()
    path = tmp_path / "term.json"
    library_term.save(terms, path, {"command": "test"})
    assert library_term.load(path) == terms
