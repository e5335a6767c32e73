"""A real Dask cluster on localhost: ``dask scheduler`` and two ``dask worker`` processes.

The same commands an astronomer runs on a cluster (see docs/cluster.md),
pointed at a scheduler file on the shared (here: local) disk. Ingest, label and assign run
through ``--scheduler`` and must give exactly what the local process pool gives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow.parquet as pq
import pytest

from desomdb import mock
from desomdb.archive.store import Archive
from desomdb.som import registry


def _desomdb(*args: str | Path) -> str:
    """Run one ``desomdb`` command in a subprocess; fail the test with its output if it fails."""
    exe = shutil.which("desomdb") or pytest.fail("the desomdb command is not on PATH")
    proc = subprocess.run([exe, *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"desomdb {' '.join(map(str, args))}:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Start ``dask scheduler`` + 2 single-threaded ``dask worker`` processes.

    Yields the scheduler's address and its scheduler file.
    """
    from distributed import Client

    folder = tmp_path_factory.mktemp("dask")
    sched_file = folder / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    common = ["--no-dashboard"]
    logs: list[IO[str]] = []
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, args: list[str]) -> None:
        logs.append((folder / f"{name}.log").open("w"))
        procs.append(subprocess.Popen(["dask", *args, *common], stdout=subprocess.DEVNULL,
                                      stderr=logs[-1], env=env, start_new_session=True))

    start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0",
                        "--scheduler-file", str(sched_file)])
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sched_file.exists(), (folder / "scheduler.log").read_text()
        for i in range(2):
            start(f"worker{i}", ["worker", "--scheduler-file", str(sched_file),
                                 "--nthreads", "1", "--nworkers", "1", "--memory-limit", "3GB",
                                 "--local-directory", str(folder / f"w{i}")])
        address = json.loads(sched_file.read_text())["address"]
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=120)
            assert len(client.scheduler_info()["workers"]) == 2
        yield address, sched_file
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()


def _table(root: Path, table: str, sort: list[str], drop: tuple[str, ...] = ()) -> dict:
    """A table's rows as sorted column arrays (file names and paths aside)."""
    t = Archive(root).read(table)
    t = t.drop_columns([c for c in drop if c in t.column_names]).sort_by(
        [(c, "ascending") for c in sort])
    return {c: t.column(c).to_pylist() for c in t.column_names}


@pytest.mark.slow
def test_ingest_label_assign_on_a_real_cluster(cluster: tuple[str, Path],
                                               mock_survey: mock.SurveyResult,
                                               tmp_path: Path) -> None:
    address, sched_file = cluster
    local, remote = tmp_path / "local", tmp_path / "remote"
    common: list[str | Path] = ["--release", "DR15", "--cubes", mock_survey.release_dir,
              "--drpall", mock_survey.drpall_path]
    _desomdb("ingest", local, *common, "--workers", "1")
    _desomdb("ingest", remote, *common, "--scheduler", address)
    key = ["release", "plateifu", "bin_id"]
    assert _table(local, "baxels", key) == _table(remote, "baxels", key)
    a, b = (pq.read_table(f) for f in (sorted(Archive(r).files("spectra"))[0]
                                      for r in (local, remote)))
    assert a.equals(b)

    _desomdb("label", local, "--workers", "1", "--label-max-per-cube", "2")
    _desomdb("label", remote, "--scheduler", sched_file, "--label-max-per-cube", "2")
    # seconds spent on a fit differ from run to run; everything else is the same computation
    lab_local = _table(local, "labels", key, drop=("fit_seconds",))
    lab_remote = _table(remote, "labels", key, drop=("fit_seconds",))
    assert lab_local.keys() == lab_remote.keys() and len(lab_local["bin_id"]) == 4
    for col, values in lab_local.items():
        if values and isinstance(values[0], float):
            np.testing.assert_allclose(np.array(values, dtype=float),
                                       np.array(lab_remote[col], dtype=float),
                                       rtol=1e-6, atol=1e-9, equal_nan=True, err_msg=col)
        else:
            assert values == lab_remote[col], col

    # train stays single-process: one tiny model, copied, then assigned both ways
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"map_rows": 3, "map_cols": 3, "iterations": 60,
                                  "decay_iters": 40, "pretrain_iters": 20, "eval_every": 20,
                                  "batch_size": 8, "patience": 50}))
    _desomdb("train", local, "--config", config, "--where", "true", "--use")
    shutil.rmtree(remote)
    shutil.copytree(local, remote)
    model_id = registry.current_model(Archive(local))
    assert model_id is not None
    _desomdb("assign", local, "--workers", "1")
    _desomdb("assign", remote, "--scheduler", address)
    a_local = _table(local, "assignments", key)
    a_remote = _table(remote, "assignments", key)
    assert a_local["node"] == a_remote["node"] and len(a_local["node"]) > 0
    n_local = Archive(local).read("nodes", model_id=model_id).sort_by("node")
    n_remote = Archive(remote).read("nodes", model_id=model_id).sort_by("node")
    np.testing.assert_allclose(
        np.array(n_local.column("coadd").to_pylist(), dtype=float),
        np.array(n_remote.column("coadd").to_pylist(), dtype=float), rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("kind, directive", [("slurm", "#SBATCH"), ("pbs", "#PBS")])
def test_cluster_dry_run_writes_a_job_script(kind: str, directive: str) -> None:
    """dask-jobqueue renders the worker job: one thread, the prologue, memory and account."""
    out = _desomdb("cluster", kind, "--dry-run", "--memory", "6GB", "--walltime", "02:00:00",
                   "--account", "manga", "--prologue", "source /opt/env/bin/activate")
    assert directive in out and "manga" in out and "02:00:00" in out
    assert "source /opt/env/bin/activate" in out
    assert "distributed.cli.dask_worker" in out and "--nthreads 1" in out


def test_cluster_bad_kind_is_one_line() -> None:
    exe = shutil.which("desomdb")
    assert exe
    proc = subprocess.run([exe, "cluster", "sge"], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "slurm" in proc.stderr
