import pytest

from desomdb import demo


@pytest.mark.slow
def test_tiny_demo_runs_end_to_end(tmp_path) -> None:
    result = demo.run_demo(tmp_path / "demo", n_galaxies=3, workers=1, map_size=3,
                           labels_per_cube=3, iterations=60, progress=False)
    assert set(result.seconds) == {"mock", "ingest", "label", "train", "assign", "plan",
                                   "calibrate", "fingerprints", "report"}
    assert result.report is not None and result.report.is_file()
    assert all(df.height > 0 for df in result.queries.values())
    assert (result.archive / "setup.sql").exists()
    intervals = next(df for title, df in result.queries.items() if "lo68" in title)
    assert intervals["lo68"].null_count() == 0  # calibrated: every node has an interval
    assert (intervals["lo68"] <= intervals["hi68"]).all()
