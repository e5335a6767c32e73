import itertools

import numpy as np
import pytest
import torch

from desomdb.som import lattice, model


def test_grid_distance_is_manhattan_on_rows_and_columns() -> None:
    d = lattice.grid_distance(15, 15).numpy()
    k, l_ = np.meshgrid(np.arange(225), np.arange(225), indexing="ij")
    expected = np.abs(k // 15 - l_ // 15) + np.abs(k % 15 - l_ % 15)
    np.testing.assert_array_equal(d, expected)
    # The reference DESOM code's row gap |k - l| // W differs on 22,050 pairs.
    buggy = np.abs(k - l_) // 15 + np.abs(k % 15 - l_ % 15)
    assert int((d != buggy).sum()) == 22050


def test_temperature_schedule() -> None:
    cfg = model.compact_config(t_max=15, t_min=0.7, decay_iters=100)
    assert lattice.temperature(0, cfg) == pytest.approx(15)
    assert lattice.temperature(99, cfg) == pytest.approx(0.7)
    assert lattice.temperature(500, cfg) == pytest.approx(0.7)
    ts = [lattice.temperature(i, cfg) for i in range(100)]
    assert all(a > b for a, b in itertools.pairwise(ts))


def test_qe_and_te_on_a_hand_built_map() -> None:
    cols = 3
    best = np.array([0, 4, 8, 0])
    second = np.array([1, 8, 5, 4])  # 0-1 adjacent; 4-8 diagonal; 8-5 adjacent; 0-4 diagonal
    assert lattice.topographic_error(best, second, cols, 4) == pytest.approx(0.5)
    assert lattice.topographic_error(best, second, cols, 8) == pytest.approx(0.0)
    d2 = np.array([[4.0, 9.0], [1.0, 16.0]])
    b, s = lattice.bmu_and_runner_up(d2)
    assert list(b) == [0, 0] and list(s) == [1, 1]
    assert lattice.quantization_error(d2[np.arange(2), b]) == pytest.approx(1.5)


def test_som_loss_weights_the_neighbourhood() -> None:
    cfg = model.compact_config(map_rows=2, map_cols=2, latent=2, input_len=64,
                               channels=(4,), kernels=(4,), strides=(2,))
    m = model.Desom(cfg)
    with torch.no_grad():
        m.prototypes.copy_(torch.tensor([[0.0, 0], [1, 0], [0, 1], [1, 1]]))
    z = torch.tensor([[0.0, 0.0]])
    # bmu = node 0; d2 = [0, 1, 1, 2]; grid distances [0, 1, 1, 2]
    t = 1.0
    expected = 0 + np.exp(-1) * 1 + np.exp(-1) * 1 + np.exp(-4) * 2
    assert m.som_loss(z, t).item() == pytest.approx(expected, rel=1e-6)


def test_masked_mse_ignores_masked_bins() -> None:
    x = torch.zeros(2, 4)
    x_hat = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 100]])
    w = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]])
    assert model.masked_mse(x, x_hat, w).item() == pytest.approx(1 / 7)


@pytest.mark.parametrize("preset", ["compact", "paper"])
def test_architectures_round_trip_shapes(preset: str) -> None:
    cfg = model.CONFIGS[preset]()
    m = model.Desom(cfg)
    x = torch.randn(2, 4544)
    z = m.encode(x)
    assert z.shape == (2, 256)
    assert m.decode(z).shape == (2, 4544)
    if preset == "paper":
        assert 9.0e6 < model.n_parameters(m) < 10.0e6  # the authors' ~9.5M parameters


def test_desom2_shapes() -> None:
    cfg = model.desom2_config()
    m = model.Desom(cfg)
    x = torch.rand(3, 225)
    assert m.decode(m.encode(x)).shape == (3, 225)
    assert m.prototypes.shape == (100, cfg.latent)


def test_seeded_initialisation_is_deterministic() -> None:
    cfg = model.compact_config()
    torch.manual_seed(3)
    a = model.Desom(cfg).state_dict()
    torch.manual_seed(3)
    b = model.Desom(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_config_key_is_refused() -> None:
    from desomdb.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown DESOM configuration keys"):
        model.compact_config(latnet=12)


def _small_cfg(**kw):
    return model.compact_config(map_rows=3, map_cols=3, latent=4, input_len=64,
                                channels=(4,), kernels=(4,), strides=(2,), **kw)


def _spectra(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 1.0 + 0.3 * torch.rand(n, 64, generator=g)
    w = (torch.rand(n, 64, generator=g) > 0.1).float()
    return x * w, w  # masked bins are 0 in the input, as spectra.normalise writes them


def test_standardisation_is_stored_and_applied_in_encode_and_decode() -> None:
    m = model.Desom(_small_cfg())
    x, w = _spectra()
    m.set_standardisation(x, w)
    mean = (x * w).sum(0) / w.sum(0)  # masked bins do not count
    np.testing.assert_allclose(m.mean.numpy(), mean.numpy(), rtol=1e-6)
    rms = torch.sqrt(((x - mean) ** 2 * w).sum() / w.sum())
    assert float(m.scale) == pytest.approx(float(rms), rel=1e-6)
    with torch.no_grad():
        z = m.encode(x)
        expected_in = torch.where(w > 0, (x - mean) / rms, torch.zeros(()))
        torch.testing.assert_close(z, m.encoder(expected_in))
        x_hat = m.decode(z)
        torch.testing.assert_close(x_hat, m.decoder(z) * rms + mean)
        # The loss is the same masked MSE of the spectra themselves.
        direct = (((x - x_hat) ** 2) * w).sum() / w.sum()
        assert model.masked_mse(x, x_hat, w).item() == pytest.approx(direct.item(), rel=1e-6)
    state = m.state_dict()
    assert {"mean", "scale", "latent_var"} <= set(state)  # saved with the model


def test_relative_som_term_is_scale_free() -> None:
    """Scaling the inputs by c scales both loss terms by c²; their balance is unchanged."""
    c = 7.0
    torch.manual_seed(0)
    a = model.Desom(_small_cfg())
    x, w = _spectra()
    a.set_standardisation(x, w)
    b = model.Desom(_small_cfg())
    b.load_state_dict(a.state_dict())
    b.set_standardisation(c * x, w)
    with torch.no_grad():
        za, zb = a.encode(x), b.encode(c * x)
        torch.testing.assert_close(za, zb)
        for m_ in (a, b):
            m_.prototypes.copy_(za[:9])
            m_.latent_var.copy_((za - za.mean(0)).pow(2).sum(1).mean())
        rec_a = model.masked_mse(x, a.decode(za), w)
        rec_b = model.masked_mse(c * x, b.decode(zb), w)
        som_a, som_b = a.som_term(za, 1.0), b.som_term(zb, 1.0)
    assert rec_b.item() == pytest.approx(c**2 * rec_a.item(), rel=1e-4)
    assert som_b.item() == pytest.approx(c**2 * som_a.item(), rel=1e-4)
    # Rescaled latents (and prototypes, and their running variance) leave it unchanged,
    # while the paper's raw L_SOM grows as the latent scale squared.
    with torch.no_grad():
        a.prototypes.mul_(c)
        a.latent_var.mul_(c**2)
        assert a.som_term(c * za, 1.0).item() == pytest.approx(som_a.item(), rel=1e-4)
        raw = model.Desom(_small_cfg(gamma_mode="raw"))
        raw.prototypes.copy_(za[:9])
        small = raw.som_term(za, 1.0).item()
        raw.prototypes.mul_(c)
        assert raw.som_term(c * za, 1.0).item() == pytest.approx(c**2 * small, rel=1e-4)


def _numpy_batch_som_epoch(protos: np.ndarray, z: np.ndarray, rows: int, cols: int,
                           temp: float) -> np.ndarray:
    """Textbook batch SOM, one loop per node: m_k = Σ_i h(bmu_i, k) z_i / Σ_i h(bmu_i, k)."""
    d2 = ((z[:, None, :] - protos[None]) ** 2).sum(-1)
    bmu = d2.argmin(1)
    r, c = np.divmod(np.arange(rows * cols), cols)
    out = protos.copy()
    for k in range(rows * cols):
        dist = np.abs(r[bmu] - r[k]) + np.abs(c[bmu] - c[k])
        h = np.exp(-(dist**2) / temp**2)
        out[k] = (h[:, None] * z).sum(0) / h.sum()
    return out


def test_batch_som_epoch_matches_a_numpy_reference() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=(200, 3)).astype(np.float32)
    protos = rng.normal(size=(12, 3)).astype(np.float32)
    expected = _numpy_batch_som_epoch(protos.astype(np.float64), z.astype(np.float64), 3, 4, 1.3)
    got = torch.from_numpy(protos.copy())
    lattice.batch_som_epoch(got, torch.from_numpy(z), lattice.grid_distance(3, 4), 1.3, chunk=64)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_fit_som_orders_a_curve_and_reduces_qe() -> None:
    """Points along an arc: the fitted 1×8 map is ordered along it and quantises it better."""
    t = np.linspace(0, 1, 400)
    z = torch.from_numpy(np.column_stack([t, 0.6 * t**2, 0.01 * np.cos(40 * t)])
                         .astype(np.float32))

    def qe(p: torch.Tensor) -> float:
        return lattice.quantization_error(torch.cdist(z, p).pow(2).min(1).values.numpy())

    start = lattice.pca_prototypes(z, 1, 8)
    for init in ("pca", "random"):
        fitted = lattice.fit_som(z, 1, 8, epochs=15, t_max=3.0, t_min=0.5, init=init, seed=3)
        assert qe(fitted) < 0.7 * qe(start), init
        steps = np.diff(t[torch.cdist(fitted, z).argmin(1).numpy()])
        assert np.all(steps > 0) or np.all(steps < 0), init  # monotonic along the arc


def test_fit_som_fine_tunes_at_the_final_radius() -> None:
    """``fine_tune`` = 0.3 of 10 epochs: 7 ordering epochs from t_max down to t_min, then 3
    at t_min; the fine-tuned map quantises better than 10 ordering epochs."""
    rng = np.random.default_rng(0)
    z = torch.from_numpy(rng.normal(size=(600, 5)).astype(np.float32))
    tuned = lattice.fit_som(z, 4, 5, epochs=10, t_max=2.5, t_min=0.6, fine_tune=0.3)
    by_hand = lattice.fit_som(z, 4, 5, epochs=7, t_max=2.5, t_min=0.6, fine_tune=0.0)
    grid = lattice.grid_distance(4, 5, "euclidean")  # fit_som's metric
    for _ in range(3):
        lattice.batch_som_epoch(by_hand, z, grid, 0.6)
    torch.testing.assert_close(tuned, by_hand)
    plain = lattice.fit_som(z, 4, 5, epochs=10, t_max=2.5, t_min=0.6, fine_tune=0.0)

    def qe(p: torch.Tensor) -> float:
        return lattice.quantization_error(torch.cdist(z, p).pow(2).min(1).values.numpy())

    assert qe(tuned) < qe(plain)
