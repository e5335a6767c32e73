"""Coverage summaries of held-out node intervals (calibrate.summarise, calibrate.node_level)."""

import numpy as np
import polars as pl
import pytest

from desomdb.pipeline import calibrate


def _rows() -> pl.DataFrame:
    # Node 0: 6 baxels, 4 inside [lo68, hi68]; node 1: 6 baxels, 2 inside; node 2: 2 baxels
    # (too few to count). The total interval covers every truth.
    truth = np.r_[np.arange(6.0), np.arange(6.0), 0.0, 1.0]
    lo = np.r_[np.full(6, 0.0), np.full(6, 4.0), 0.0, 0.0]
    hi = np.r_[np.full(6, 3.0), np.full(6, 5.0), 1.0, 1.0]
    n = truth.size
    return pl.DataFrame({
        "label": ["log_age_lw"] * n, "node": np.r_[[0] * 6, [1] * 6, 2, 2],
        "truth": truth, "fit": truth, "sigma": np.ones(n), "median": truth,
        "p16": lo, "p84": hi, "lo68": lo, "hi68": hi,
        "lo68_total": np.full(n, -10.0), "hi68_total": np.full(n, 10.0)})


def test_node_level_counts_populated_nodes_covering_half_their_truths() -> None:
    (age,) = calibrate.node_level(_rows(), min_members=5, label_names=("log_age_lw",))
    assert age.nodes == 2
    assert age.at_least_half == pytest.approx(0.5)  # node 0 (4/6) yes, node 1 (2/6) no
    assert age.total_at_least_half == 1.0
    # A label without a truth (log M*/L_r on a BC03 mock) has no populated node.
    (none,) = calibrate.node_level(_rows().with_columns(truth=pl.lit(float("nan"))),
                                   label_names=("log_age_lw",))
    assert none.nodes == 0 and np.isnan(none.at_least_half)


def test_summarise_reports_the_total_interval() -> None:
    (age,) = calibrate.summarise(_rows(), label_names=("log_age_lw",))
    assert age.total == 1.0 and age.calibrated == pytest.approx(8 / 14)
