"""Per-spaxel sidecar tables aggregated by the rules they carry."""

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from desomdb.errors import InputDataError
from desomdb.science import emission, sidecar


def test_rules_travel_with_the_file_and_aggregate_per_bin(tmp_path) -> None:
    spaxels = pa.table({
        "x": pa.array([0, 1, 2, 3], pa.int16()), "y": pa.array([0, 0, 0, 0], pa.int16()),
        "kind": ["a", "a", "a", "a"],
        "m": [1.0, 3.0, 2.0, 2.0], "age": [1.0, 5.0, 2.0, 4.0], "lum": [1.0, 1.0, 4.0, 4.0],
        "sfr": [0.0, 0.0, 1e-30, 0.0],
        "nii": [1.0, 1.0, 1.0, 1.0], "ha": [3.0, 3.0, 3.0, 3.0],
        "oiii": [1.0, 1.0, 1.0, 1.0], "hb": [1.0, 1.0, 1.0, 1.0],
    })
    rules: dict[str, list] = {
        "kind": ["first", "kind"], "n": ["count"], "age": ["wmean", "age", "m"],
        "ml": ["log10_ratio", "m", "lum"], "ssfr": ["log10_ratio", "sfr", "m", -14.0],
        "m": ["sum", "m"], "d": ["d_bpt", "nii", "ha", "oiii", "hb"]}
    pq.write_table(sidecar.with_rules(spaxels, rules), tmp_path / "s.parquet")
    frame, read_rules = sidecar.read(tmp_path / "s.parquet")
    assert read_rules == rules
    bin_map = pl.DataFrame({"x": [0, 1, 2, 3], "y": [0, 0, 0, 0], "bin_id": [1, 1, 0, -1]},
                           schema={"x": pl.Int16, "y": pl.Int16, "bin_id": pl.Int32})
    out = sidecar.aggregate(frame, bin_map, read_rules)
    assert out.columns == ["bin_id", *rules]
    assert out["bin_id"].to_list() == [0, 1]
    assert out["n"].to_list() == [1, 2]
    assert out["age"].to_list() == pytest.approx([2.0, (1 * 1 + 3 * 5) / 4])
    assert out["ml"].to_list() == pytest.approx([np.log10(2 / 4), np.log10(4 / 2)])
    assert out["ssfr"].to_list() == pytest.approx([-14.0, -14.0])  # the floor
    expected_d = emission.d_bpt(np.log10([2 / 6]), np.log10([2 / 2]))[0]
    assert out["d"][1] == pytest.approx(float(expected_d))


def test_a_file_without_rules_is_refused(tmp_path) -> None:
    pq.write_table(pa.table({"x": [1]}), tmp_path / "s.parquet")
    with pytest.raises(InputDataError, match=r"no 'desomdb\.aggregate' rules"):
        sidecar.read(tmp_path / "s.parquet")


def test_the_bin_dispersion_adds_the_spread_of_velocities() -> None:
    spaxels = pl.DataFrame({"x": [0, 1, 2], "y": [0, 0, 0], "sigma": [100.0, 100.0, 80.0],
                            "vel": [-50.0, 50.0, 0.0], "w": [1.0, 1.0, 2.0]})
    bins = pl.DataFrame({"x": [0, 1, 2], "y": [0, 0, 0], "bin_id": [0, 0, 1]})
    out = sidecar.aggregate(spaxels, bins, {"s": ["wdispersion", "sigma", "vel", "w"]})
    assert out["s"].to_list() == pytest.approx([np.hypot(100.0, 50.0), 80.0])
