"""Run independent tasks serially, on a local process pool, or on a Dask cluster.

One task failing never stops the others: its error is recorded (with the task's label) and
the rest of the batch still lands. Tasks run with one BLAS/torch thread on every path (serial
included), since the parallelism is across tasks and one pPXF fit is fastest on one thread.

Local pool workers die with the process that started them: a ``kill -9`` of ``desomdb label``
must not leave workers of ~0.5 GB each running for hours. On Linux each worker asks the
kernel for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``); checking the parent
pid right after that call catches a parent that died first, and a thread polling it covers
other systems. Dask workers belong to the user's cluster, not to this process, and are left
alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

from desomdb.errors import DesomdbError, JobInterruptedError
from desomdb.runtime.progress import progress_bar

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: ``prctl`` option number from <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1
#: How often a worker's watchdog thread checks that its parent is alive, seconds.
PARENT_POLL_S = 0.5


@dataclass
class TaskFailure:
    """A task that raised: which one and why."""

    label: str
    error: str
    detail: str = ""


@dataclass
class RunReport:
    """Results in task order (``None`` for failed tasks) and the failures."""

    results: list[Any]
    failures: list[TaskFailure] = field(default_factory=list)

    def raise_if_failed(self, what: str) -> None:
        """Raise a :class:`DesomdbError` listing the failed tasks, if any."""
        if self.failures:
            lines = "\n".join(f"  {f.label}: {f.error}" for f in self.failures[:20])
            more = f"\n  ... and {len(self.failures) - 20} more" if len(self.failures) > 20 else ""
            raise DesomdbError(f"{what}: {len(self.failures)} task(s) failed:\n{lines}{more}")


def _single_thread_init() -> None:
    """Limit this process to one BLAS/OpenMP and one torch thread (a pool or Dask worker)."""
    for var in _THREAD_VARS:
        os.environ[var] = "1"
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run with one BLAS/OpenMP and one torch thread in this process; restore them after.

    Serial tasks run under it, and so do computations whose float results must not depend
    on the caller's thread count (a resumed training must equal an uninterrupted one).
    """
    import torch
    from threadpoolctl import threadpool_limits

    n_torch = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(n_torch)


class ThreadTuner:
    """Choose, as a loop runs, the faster of one torch thread and the caller's thread count.

    Small networks (the compact DESOM, batch 64) gain ~1.5x from a second thread on a quiet
    2-core machine but lose ~1.7x when other processes load both cores: the OpenMP threads
    then wait on each other (measured on a training step: 114 ms with 2 threads and 174 ms
    with 1 quiet; 498 ms and 301 ms beside two busy processes). So the loop is timed: each
    cycle runs :attr:`PROBE` steps on each choice, then :attr:`PERIOD` steps on the one with
    the lower median step time; the load is re-read every cycle. With one thread to begin
    with (e.g. under :func:`single_threaded`, where float sums must not depend on the
    thread count) nothing changes.

    Use: ``tuner.before()`` ahead of each step, ``tuner.after(seconds)`` with its time, and
    ``tuner.close()`` at the end (restores the caller's count).
    """

    PROBE = 5
    PERIOD = 120

    def __init__(self) -> None:
        import torch

        self._torch = torch
        self.start = torch.get_num_threads()
        self.options = sorted({1, self.start})
        self.chosen = self.start
        self._step = 0
        self._times: dict[int, list[float]] = {n: [] for n in self.options}
        self._current = self.start

    @property
    def _cycle(self) -> int:
        return self.PROBE * len(self.options) + self.PERIOD

    def _wanted(self) -> int:
        pos = self._step % self._cycle
        if len(self.options) > 1 and pos < self.PROBE * len(self.options):
            return self.options[pos // self.PROBE]
        return self.chosen

    def before(self) -> None:
        """Set the thread count for the next step."""
        n = self._wanted()
        if n != self._current:
            self._torch.set_num_threads(n)
            self._current = n

    def after(self, seconds: float) -> None:
        """Record the step's wall time; at the end of the probes, choose."""
        pos = self._step % self._cycle
        if len(self.options) > 1 and pos < self.PROBE * len(self.options):
            self._times[self._current].append(seconds)
            if pos == self.PROBE * len(self.options) - 1:
                median = {n: statistics.median(t[1:] or t) for n, t in self._times.items()}
                self.chosen = min(median, key=lambda n: (median[n], -n))
                self._times = {n: [] for n in self.options}
        self._step += 1

    def close(self) -> None:
        """Restore the caller's thread count."""
        if self._current != self.start:
            self._torch.set_num_threads(self.start)
            self._current = self.start


def _exit_with_parent(parent_pid: int) -> None:
    """Make this worker die as soon as the process ``parent_pid`` that started it dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if os.getppid() != parent_pid:  # the parent died before the prctl call took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="desomdb-parent-watchdog", daemon=True).start()


def _worker_init(parent_pid: int, setup: Callable[[], None] | None = None) -> None:
    """Set up a local pool worker: die with the parent, run one thread, run ``setup``.

    Ctrl-C reaches every process of the terminal's group; a worker ignores it and leaves the
    decision to the parent (:func:`run_tasks` keeps finished work and stops the rest).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent_pid)
    _single_thread_init()
    if setup is not None:
        setup()


def _call(func: Callable[[Any], Any], task: Any) -> tuple[bool, Any]:
    try:
        return True, func(task)
    except DesomdbError as exc:
        return False, (str(exc), "")
    except Exception as exc:  # record any failure of one task; the batch goes on
        return False, (f"{type(exc).__name__}: {exc}", traceback.format_exc())


def run_tasks(
    func: Callable[[Any], Any],
    tasks: Sequence[Any],
    *,
    workers: int = 1,
    scheduler: str | None = None,
    desc: str = "tasks",
    progress: bool = True,
    labels: Sequence[str] | None = None,
    on_result: Callable[[int, Any], None] | None = None,
    setup: Callable[[], None] | None = None,
    keep_results: bool = True,
) -> RunReport:
    """Apply ``func`` to every task and collect results and failures.

    Parameters
    ----------
    func : callable
        A picklable top-level function of one task.
    tasks : sequence
        Picklable task arguments.
    workers : int
        Number of local processes; 1 runs in this process.
    scheduler : str, optional
        Dask distributed scheduler address ``tcp://HOST:PORT``; overrides ``workers``.
    desc : str
        Progress-bar label.
    progress : bool
        Show progress (:func:`desomdb.runtime.progress.progress_bar`).
    labels : sequence of str, optional
        Human-readable task names used in failure records (default: the task index).
    on_result : callable, optional
        Called in this process as ``on_result(index, result)`` as each task succeeds, so
        a caller can commit results incrementally (resumable jobs).
    setup : callable, optional
        A picklable top-level function run once in every worker before its first task
        (e.g. importing heavy modules), so no task pays for it.
    keep_results : bool
        Keep every result in ``RunReport.results``. With False, results go only to
        ``on_result`` (``results`` holds None), so the parent's memory stays flat over any
        number of tasks (an assign of 1,000 cubes held every cube's partial sums: +1 GB).

    Returns
    -------
    RunReport
    """
    names = list(labels) if labels is not None else [str(i) for i in range(len(tasks))]
    results: list[Any] = [None] * len(tasks)
    failures: list[TaskFailure] = []
    bar = progress_bar(len(tasks), desc, unit="task", enabled=progress)

    finished = [0]
    stop = _Interrupts()

    def record(i: int, ok: bool, value: Any) -> None:
        with stop.deferred():  # a result being committed is never cut in half
            finished[0] += 1
            if ok:
                results[i] = value if keep_results else None
                if on_result is not None:
                    on_result(i, value)
            else:
                failures.append(TaskFailure(names[i], value[0], value[1]))
            bar.update(1)

    try:
        stop.install()
        if scheduler:
            _run_dask(func, tasks, scheduler, record, setup)
        elif workers <= 1 or len(tasks) <= 1:
            with single_threaded():
                if setup is not None and tasks:
                    setup()
                for i, task in enumerate(tasks):
                    ok, value = _call(func, task)
                    record(i, ok, value)
        else:
            ctx = get_context("spawn")
            # PDEATHSIG fires when the *thread* that started a worker exits; the pool starts
            # workers from submit(), i.e. from this thread, which outlives the pool.
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                       initializer=_worker_init, initargs=(os.getpid(), setup))
            futures = {pool.submit(_call, func, t): i for i, t in enumerate(tasks)}
            try:
                while futures:
                    # A timed wait: a signal is handled within POLL_SECONDS, not when the
                    # next task happens to finish.
                    ready, _ = wait(futures, timeout=POLL_SECONDS,
                                    return_when=FIRST_COMPLETED)
                    while ready:  # popped one by one: a finished future holds its result
                        fut = ready.pop()
                        i = futures.pop(fut)
                        record(i, *_outcome(fut))
                        del fut
            except KeyboardInterrupt:
                stop.ignore()  # a second Ctrl-C must not cut the hand-over short
                _stop(pool, futures, record)
                raise
            pool.shutdown(wait=True)
    except KeyboardInterrupt:
        done = finished[0]
        raise JobInterruptedError(f"{desc}: interrupted after {done} of {len(tasks)} task(s)",
                                  n_done=done, n_left=len(tasks) - done) from None
    finally:
        stop.restore()
        bar.close()
    failures.sort(key=lambda f: names.index(f.label))
    return RunReport(results, failures)


#: How often the parent of a local pool looks for Ctrl-C while it waits for results (s).
POLL_SECONDS = 0.25


class _Interrupts:
    """SIGINT and SIGTERM as KeyboardInterrupt, but never in the middle of a hand-over.

    While a result is handed to the job (which commits it), a signal is held and raised
    right after; installed only in the main thread (where Python runs signal handlers).
    """

    def __init__(self) -> None:
        self._held = False
        self._deferring = 0
        self._ignore = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def ignore(self) -> None:
        self._ignore = True

    def _handle(self, signum: int, frame: Any) -> None:
        if self._ignore:
            return
        if self._deferring:
            self._held = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self._held and not self._deferring and not self._ignore:
            self._held = False
            raise KeyboardInterrupt


def _outcome(fut: Any) -> tuple[bool, Any]:
    try:
        ok, value = fut.result()
    except Exception as exc:  # a worker process died (e.g. out of memory)
        ok, value = False, (f"worker died: {type(exc).__name__}: {exc}", "")
    return ok, value


def _stop(pool: ProcessPoolExecutor, futures: dict[Any, int],
          record: Callable[[int, bool, Any], None]) -> None:
    """On Ctrl-C: hand over what already finished, cancel the queue, stop the workers now.

    Without this, leaving the pool's context waited for every queued task (minutes), and a
    second Ctrl-C lost the tasks that had finished but were not yet handed over.
    """
    for fut, i in list(futures.items()):
        if fut.done() and not fut.cancelled():
            futures.pop(fut)
            record(i, *_outcome(fut))
    for proc in list(getattr(pool, "_processes", {}).values()):
        proc.terminate()  # a task half done is dropped; it runs again on the next attempt
    pool.shutdown(wait=False, cancel_futures=True)


def _run_dask(
    func: Callable[[Any], Any],
    tasks: Sequence[Any],
    scheduler: str,
    record: Callable[[int, bool, Any], None],
    setup: Callable[[], None] | None = None,
) -> None:
    from distributed import Client
    from distributed import as_completed as dask_completed

    try:
        if scheduler.endswith(".json"):  # a scheduler file (dask scheduler --scheduler-file)
            client = Client(scheduler_file=scheduler, timeout="4s")
        else:
            client = Client(scheduler, timeout="4s")
    except (OSError, ValueError) as exc:
        raise DesomdbError(
            f"cannot reach the Dask scheduler at {scheduler} ({exc}); start one with "
            "'dask scheduler' and workers with 'dask worker <address> --nthreads 1', or drop "
            "--scheduler to use the local process pool"
        ) from exc
    with client:
        workers = client.scheduler_info().get("workers", {})
        if not any(str(addr).startswith("inproc://") for addr in workers):
            # Worker processes: one BLAS/torch thread each (never this process's settings).
            client.run(_single_thread_init)
        if setup is not None:
            client.run(setup)
        futures: list[Any] = client.map(_call, [func] * len(tasks), tasks, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        for fut in dask_completed(futures):
            ok, value = fut.result()
            i = index[fut.key]
            futures[i] = None  # release the result on the cluster and here
            record(i, ok, value)
