import pytest

from desomdb.errors import DesomdbError, InputDataError
from desomdb.runtime import runner


def _square_or_fail(x: int) -> int:
    if x == 3:
        raise InputDataError("cube 3 is corrupt")
    if x == 4:
        raise ValueError("unexpected")
    return x * x


@pytest.mark.parametrize("workers", [1, 2])
def test_failures_are_recorded_and_the_rest_lands(workers: int) -> None:
    seen = []
    report = runner.run_tasks(_square_or_fail, list(range(6)), workers=workers, progress=False,
                              labels=[f"t{i}" for i in range(6)],
                              on_result=lambda i, r: seen.append(i))
    assert report.results == [0, 1, 4, None, None, 25]
    assert [f.label for f in report.failures] == ["t3", "t4"]
    assert report.failures[0].error == "cube 3 is corrupt"
    assert "ValueError" in report.failures[1].error and "Traceback" in report.failures[1].detail
    assert sorted(seen) == [0, 1, 2, 5]
    with pytest.raises(DesomdbError, match="2 task\\(s\\) failed:\n  t3: cube 3 is corrupt"):
        report.raise_if_failed("demo")


def test_unreachable_scheduler_is_a_clear_error() -> None:
    with pytest.raises(DesomdbError, match="cannot reach the Dask scheduler"):
        runner.run_tasks(_square_or_fail, [1], scheduler="tcp://127.0.0.1:1", progress=False)


def _thread_counts(_: int) -> tuple[int, int]:
    import torch
    from threadpoolctl import threadpool_info

    blas = max((p["num_threads"] for p in threadpool_info()), default=1)
    return torch.get_num_threads(), blas


@pytest.mark.parametrize("workers", [1, 2])
def test_tasks_run_single_threaded_on_every_path(workers: int) -> None:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report = runner.run_tasks(_thread_counts, [0, 1], workers=workers, progress=False)
        assert report.results == [(1, 1), (1, 1)]
        assert torch.get_num_threads() == 2  # the caller's setting is restored
    finally:
        torch.set_num_threads(before)


_ORPHAN_SCRIPT = """
import os, sys, time
from pathlib import Path
from desomdb.runtime import runner

def park(folder):
    (Path(folder) / str(os.getpid())).touch()
    time.sleep(300)

if __name__ == "__main__":
    runner.run_tasks(park, [sys.argv[1]] * 2, workers=2, progress=False)
"""


def _alive(proc) -> bool:
    """Running and not a zombie (a dead orphan may wait a while for its reaper)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_pool_workers_die_with_a_killed_parent(tmp_path) -> None:
    """``kill -9`` of the parent takes its busy pool workers with it (issue #16)."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "orphans.py"
    script.write_text(_ORPHAN_SCRIPT)
    pids = tmp_path / "pids"
    pids.mkdir()
    parent = subprocess.Popen([sys.executable, str(script), str(pids)])
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
            assert parent.poll() is None, "the parent script failed"
            time.sleep(0.1)
        workers = [psutil.Process(int(p.name)) for p in pids.iterdir()]
        assert len(workers) == 2 and all(w.ppid() == parent.pid for w in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        alive = workers
        deadline = time.monotonic() + 5
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [w for w in alive if _alive(w)]
        assert not alive, f"workers {[w.pid for w in alive]} outlived their parent"
    finally:
        parent.kill()
        for w in workers:
            if w.is_running():
                w.kill()


def _block(k: int):
    import numpy as np

    return np.full(100_000, k, dtype=np.float64)


@pytest.mark.parametrize("workers", [1, 2])
def test_results_handed_to_on_result_are_not_kept(workers: int) -> None:
    """With ``keep_results=False`` nothing in the runner holds a result once ``on_result``
    has taken it, so a long job's memory stays flat (an assign of 1,000 cubes kept every
    cube's partial sums: +1 GB)."""
    import gc
    import time
    import weakref

    seen: list[weakref.ref] = []
    alive_after: list[int] = []

    def take(i: int, value) -> None:
        gc.collect()
        alive_after.append(sum(r() is not None for r in seen))
        seen.append(weakref.ref(value))
        # Slow hand-overs: the other tasks finish meanwhile, so one wait returns several
        # results at once (the case that kept the earlier ones of a batch alive).
        time.sleep(0.2)

    report = runner.run_tasks(_block, list(range(6)), workers=workers, progress=False,
                              on_result=take, keep_results=False)
    assert report.results == [None] * 6 and not report.failures
    assert alive_after == [0] * 6  # every earlier result was already released


def test_ctrl_c_keeps_finished_cubes_and_the_rerun_fits_only_the_rest(ingested,
                                                                      tmp_path) -> None:
    """Seen: Ctrl-C during 'desomdb label' took 317 s and discarded every finished cube."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from desomdb.archive.store import Archive
    from desomdb.pipeline import labels

    root = tmp_path / "arch"
    shutil.copytree(ingested[0], root)
    n_cubes = Archive(root).read("cubes").num_rows
    proc = subprocess.Popen([sys.executable, "-m", "desomdb.cli", "label", str(root),
                             "--workers", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if Archive(root).files("labels"):
            break
        time.sleep(0.1)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    stopped_in = time.monotonic() - t0
    assert proc.returncode == 130, err
    assert "interrupted after" in err and "what was committed is kept" in err, err
    assert "Traceback" not in err and stopped_in < 30
    kept = len(Archive(root).files("labels"))
    assert 0 < kept < n_cubes  # the finished cubes are committed, the rest is not
    # status names the interrupted command and how to go on
    said = subprocess.run([sys.executable, "-m", "desomdb.cli", "status", str(root)],
                          capture_output=True, text=True).stdout
    assert f"'desomdb label {root} --workers 2', was interrupted" in said, said
    assert "run the same command again" in said
    again = labels.label(root, workers=1, progress=False)
    assert again.n_skipped_cubes == kept and again.n_cubes == n_cubes - kept
    assert Archive(root).last_job()["state"] == "finished"  # type: ignore[index]


def test_thread_tuner_follows_the_faster_thread_count_and_restores_the_callers() -> None:
    import torch

    from desomdb.runtime.runner import ThreadTuner, single_threaded

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tuner = ThreadTuner()
        assert tuner.options == [1, 2]

        def cycle(step_seconds: dict[int, float]) -> list[int]:
            used = []
            for _ in range(tuner.PROBE * 2 + tuner.PERIOD):
                tuner.before()
                used.append(torch.get_num_threads())
                tuner.after(step_seconds[torch.get_num_threads()])
            return used

        used = cycle({1: 0.3, 2: 0.5})  # loaded: one thread is faster
        assert used[:tuner.PROBE] == [1] * tuner.PROBE
        assert used[tuner.PROBE:2 * tuner.PROBE] == [2] * tuner.PROBE
        assert tuner.chosen == 1
        used = cycle({1: 0.17, 2: 0.11})  # quiet again: two threads, after one more probe
        assert used[2 * tuner.PROBE:] == [2] * tuner.PERIOD and tuner.chosen == 2
        cycle({1: 0.3, 2: 0.5})
        tuner.close()
        assert torch.get_num_threads() == 2  # the caller's count is back
        with single_threaded():  # a bit-reproducible run is never moved off one thread
            one = ThreadTuner()
            for _ in range(3 * (one.PROBE + one.PERIOD)):
                one.before()
                assert torch.get_num_threads() == 1
                one.after(0.1)
    finally:
        torch.set_num_threads(before)
