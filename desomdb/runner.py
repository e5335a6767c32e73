"""Run independent tasks serially, on a local process pool, or on a Dask cluster.

One task failing never stops the others: its error is recorded (with the task's label) and
the rest of the batch still lands. Workers run single-threaded BLAS, since the parallelism is
across tasks.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

from tqdm.auto import tqdm

from desomdb.errors import DesomdbError

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


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
    for var in _THREAD_VARS:
        os.environ[var] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


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
        Show a tqdm progress bar.
    labels : sequence of str, optional
        Human-readable task names used in failure records (default: the task index).
    on_result : callable, optional
        Called in this process as ``on_result(index, result)`` as each task succeeds, so
        a caller can commit results incrementally (resumable jobs).

    Returns
    -------
    RunReport
    """
    names = list(labels) if labels is not None else [str(i) for i in range(len(tasks))]
    results: list[Any] = [None] * len(tasks)
    failures: list[TaskFailure] = []
    bar = tqdm(total=len(tasks), desc=desc, disable=not progress, unit="task")

    def record(i: int, ok: bool, value: Any) -> None:
        if ok:
            results[i] = value
            if on_result is not None:
                on_result(i, value)
        else:
            failures.append(TaskFailure(names[i], value[0], value[1]))
        bar.update(1)

    try:
        if scheduler:
            _run_dask(func, tasks, scheduler, record)
        elif workers <= 1 or len(tasks) <= 1:
            for i, task in enumerate(tasks):
                ok, value = _call(func, task)
                record(i, ok, value)
        else:
            ctx = get_context("spawn")
            with ProcessPoolExecutor(
                max_workers=workers, mp_context=ctx, initializer=_single_thread_init
            ) as pool:
                futures = {pool.submit(_call, func, t): i for i, t in enumerate(tasks)}
                for fut in as_completed(futures):
                    i = futures[fut]
                    try:
                        ok, value = fut.result()
                    except Exception as exc:  # a worker process died (e.g. out of memory)
                        ok, value = False, (f"worker died: {type(exc).__name__}: {exc}", "")
                    record(i, ok, value)
    finally:
        bar.close()
    failures.sort(key=lambda f: names.index(f.label))
    return RunReport(results, failures)


def _run_dask(
    func: Callable[[Any], Any],
    tasks: Sequence[Any],
    scheduler: str,
    record: Callable[[int, bool, Any], None],
) -> None:
    from distributed import Client
    from distributed import as_completed as dask_completed

    try:
        client = Client(scheduler, timeout="4s")
    except OSError as exc:
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
        futures = client.map(_call, [func] * len(tasks), tasks, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        for fut in dask_completed(futures):
            ok, value = fut.result()
            record(index[fut.key], ok, value)
