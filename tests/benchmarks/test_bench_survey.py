"""benchmarks/bench_survey.py --quick: a 10-cube survey through every stage (CI-sized)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_survey.py"
STAGES = ["ingest", "label", "train", "assign", "fingerprints", "query", "refresh", "check"]


@pytest.mark.slow
def test_quick_survey_runs_every_stage(tmp_path) -> None:
    """Every stage runs in its own process on 10 cubes; the refresh carries exactly the 80 %
    of byte-identical cubes, every baxel is assigned and the archive checks clean."""
    result = tmp_path / "survey.json"
    run = subprocess.run([sys.executable, str(BENCH), "--quick", "--workers", "1",
                          "--out", str(tmp_path / "work"), "--json", str(result)],
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    n10 = json.loads(result.read_text())["10"]
    assert [s for s in n10 if not s.startswith("_")] == STAGES
    for stage in STAGES:
        assert n10[stage]["seconds"] > 0 and n10[stage]["rss_mb"] > 50, stage
    assert n10["ingest"]["n_cubes"] == 10
    assert n10["refresh"]["n_carried"] == 8
    assert n10["assign"]["n_baxels"] == n10["query"]["n_dr15_baxels"] > 10 * 50
    assert n10["check"]["n_problems"] == 0
    assert "| refresh" in run.stdout and "DR17 2 cores" in run.stdout
    assert not (tmp_path / "work" / "n10").exists()  # the survey's files are cleaned up
