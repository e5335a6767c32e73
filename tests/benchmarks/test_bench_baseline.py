"""benchmarks/bench_baseline.py: the PCA (+ SOM) and k-NN baseline runs on a tiny archive."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_baseline


def test_smoothness_and_scatter_on_constructed_maps() -> None:
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(5.0), np.arange(5.0)).ravel()  # smooth: steps of 1
    assert bench_baseline.smoothness(ramp, 5, 5, rng) < 0.5
    noise = rng.permutation(ramp)
    assert 0.7 < bench_baseline.smoothness(noise, 5, 5, rng) < 1.3
    d = np.array([0.0, 1.0, -1.0, np.nan, 100.0])
    assert bench_baseline.robust_scatter(d) == pytest.approx(1.4826)  # MAD 1, outlier ignored
    med = bench_baseline.node_medians(np.array([0, 0, 2, 2, 2]),
                                      np.array([1.0, 3.0, 5.0, np.nan, 9.0]), 4)
    np.testing.assert_array_equal(med, [2.0, np.nan, 7.0, np.nan])


@pytest.mark.slow
def test_baseline_quick_runs_on_a_tiny_archive(trained_archive, capsys) -> None:
    arch, model_id, _ = trained_archive
    bench_baseline.main(["--archive", str(arch), "--quick"])
    out = capsys.readouterr().out
    assert f"model {model_id}" in out
    summary = json.loads(out.split("summary ", 1)[1])
    assert summary["pca_mse"] > 0 and summary["desom_mse"] > 0
    assert set(summary["maps"]) == {"DESOM-1", "PCA + XPySom"} or \
        set(summary["maps"]) == {"DESOM-1", "PCA + desomdb fit_som"}
    rows = summary["rows"]
    for name in bench_baseline.LABELS:
        assert rows["n held-out labelled"][name] > 0
        assert np.isfinite(rows["pPXF - truth"][name])  # the mock's truth table is read
        assert np.isfinite(rows["10-NN in PCA space - pPXF"][name])
        # A 4x4 map on a tiny archive may leave every held-out baxel on an unlabelled node.
        assert name in rows["node median DESOM-1 - truth"]
