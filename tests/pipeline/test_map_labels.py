"""Map labels: nearest fitted neighbours in latent space, leave-one-out conformal intervals."""

import numpy as np
import pytest

from desomdb.pipeline import map_labels


def _latents(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3)).astype(np.float32)
    return z, 2.0 * z[:, 0] + 0.1 * rng.normal(size=n)  # a label the latents predict


def test_a_fitted_baxel_is_never_its_own_neighbour() -> None:
    z, y = _latents()
    fitted = np.zeros(len(z), bool)
    fitted[::4] = True
    values = np.where(fitted, y, np.nan)
    pred, half = map_labels.predict(z, values, fitted)
    assert np.isfinite(pred).all() and half > 0
    # With itself among its neighbours a fitted baxel would be predicted near-exactly.
    loo = np.abs(pred[fitted] - y[fitted])
    assert np.median(loo) > 0.05
    # The half-width covers ~68 % of the leave-one-out residuals (by construction) and, on
    # the unfitted baxels, about as many of theirs.
    assert np.mean(loo <= half) == pytest.approx(0.68, abs=0.02)
    assert np.mean(np.abs(pred[~fitted] - y[~fitted]) <= half) == pytest.approx(0.68, abs=0.08)


def test_neighbours_beat_the_mean_and_too_few_fits_give_nothing() -> None:
    z, y = _latents()
    fitted = np.zeros(len(z), bool)
    fitted[::4] = True
    pred, _ = map_labels.predict(z, np.where(fitted, y, np.nan), fitted)
    rms = np.sqrt(np.mean((pred[~fitted] - y[~fitted]) ** 2))
    assert rms < 0.5 * np.std(y)
    few = np.zeros(len(z), bool)
    few[:3] = True
    none, half = map_labels.predict(z, np.where(few, y, np.nan), few)
    assert np.isnan(none).all() and np.isnan(half)


def test_the_hnsw_search_agrees_with_the_exact_one(monkeypatch) -> None:
    z, _ = _latents(600, seed=1)
    exact = map_labels._knn(z[:300], z, 3)
    monkeypatch.setattr(map_labels, "EXACT_MAX", 10)  # force the index
    approx = map_labels._knn(z[:300], z, 3)
    assert approx.shape == exact.shape
    assert np.mean(approx[:, 0] == exact[:, 0]) > 0.97


def test_labels_with_the_same_fitted_baxels_share_one_search(trained_archive,
                                                             monkeypatch) -> None:
    from desomdb.archive.store import Archive

    arch, model_id, _ = trained_archive
    calls: list[int] = []
    search = map_labels._knn

    def counted(base: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
        calls.append(len(base))
        return search(base, query, k)

    monkeypatch.setattr(map_labels, "_knn", counted)
    shared = map_labels.map_label_table(Archive(arch), model_id)
    n_searches = len(calls)
    # Every label searched on its own gives the same table.
    calls.clear()
    keys = iter(range(10**6))
    monkeypatch.setattr(map_labels, "_search_key", lambda fitted: bytes([next(keys) % 256]))
    separate = map_labels.map_label_table(Archive(arch), model_id)
    assert shared.equals(separate)
    assert len(calls) == len(map_labels.label_catalogue.NODE_LABELS) > n_searches >= 1
