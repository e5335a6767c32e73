import itertools

import numpy as np
import pytest
import torch

from desomdb import model


def test_grid_distance_is_manhattan_on_rows_and_columns() -> None:
    d = model.grid_distance(15, 15).numpy()
    k, l_ = np.meshgrid(np.arange(225), np.arange(225), indexing="ij")
    expected = np.abs(k // 15 - l_ // 15) + np.abs(k % 15 - l_ % 15)
    np.testing.assert_array_equal(d, expected)
    # The reference DESOM code's row gap |k - l| // W differs on 22,050 pairs.
    buggy = np.abs(k - l_) // 15 + np.abs(k % 15 - l_ % 15)
    assert int((buggy != expected).sum()) == 22050


def test_temperature_schedule() -> None:
    cfg = model.compact_config(t_max=15, t_min=0.7, decay_iters=100)
    assert model.temperature(0, cfg) == pytest.approx(15)
    assert model.temperature(99, cfg) == pytest.approx(0.7)
    assert model.temperature(500, cfg) == pytest.approx(0.7)
    ts = [model.temperature(i, cfg) for i in range(100)]
    assert all(a > b for a, b in itertools.pairwise(ts))


def test_qe_and_te_on_a_hand_built_map() -> None:
    cols = 3
    best = np.array([0, 4, 8, 0])
    second = np.array([1, 8, 5, 4])  # 0-1 adjacent; 4-8 diagonal; 8-5 adjacent; 0-4 diagonal
    assert model.topographic_error(best, second, cols, 4) == pytest.approx(0.5)
    assert model.topographic_error(best, second, cols, 8) == pytest.approx(0.0)
    d2 = np.array([[4.0, 9.0], [1.0, 16.0]])
    b, s = model.bmu_and_runner_up(d2)
    assert list(b) == [0, 0] and list(s) == [1, 1]
    assert model.quantization_error(d2[np.arange(2), b]) == pytest.approx(1.5)


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
