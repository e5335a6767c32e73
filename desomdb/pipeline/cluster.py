"""``desomdb cluster``: a Dask cluster on a SLURM or PBS batch system, through dask-jobqueue.

Ingest, label and assign parallelise over cubes: each takes ``--scheduler ADDRESS`` and sends
one task per cube (or per few cubes) to the cluster's workers. ``train`` stays one process
(a GPU when there is one) and streams from the archive.

How it runs (``docs/cluster.md`` has the whole recipe):

1. ``desomdb cluster slurm --jobs 32 --memory 4GB --walltime 08:00:00 --account ACC
   --prologue 'source ~/venvs/desomdb/bin/activate'`` on a login node (or in a small batch
   job of its own) starts the Dask scheduler there, submits ``--jobs`` batch jobs, each one
   single-threaded Dask worker, writes the scheduler's address to ``--scheduler-file`` and
   waits until interrupted (the workers' jobs are cancelled on exit).
2. ``desomdb ingest ARCHIVE JOB.toml --scheduler tcp://HOST:PORT`` (and ``label``,
   ``assign``) from any node that reaches the scheduler.

Requirements: the archive, the cubes and the scheduler file on a filesystem every node
mounts at the same path (workers read cubes and write staged Parquet files into the
archive; only the client process commits); the same Python environment on the workers
(``--prologue`` activates it in each job script); one thread per worker (BLAS and torch
threads are pinned to one by desomdb on every worker anyway).

Why dask-jobqueue: it is the Dask project's own, maintained adapter for batch systems (SLURM,
PBS, SGE, LSF, HTCondor) and writes the job scripts; desomdb only chooses their settings.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from desomdb.atomic import write_text_atomic
from desomdb.errors import ConfigError

KINDS = ("slurm", "pbs")


@dataclass
class ClusterSpec:
    """Settings of the batch jobs that run the Dask workers.

    Attributes
    ----------
    kind : str
        ``slurm`` or ``pbs``.
    jobs : int
        Batch jobs to submit; each runs one single-threaded Dask worker.
    memory : str
        Memory per job, e.g. ``4GB`` (a 127-fibre cube needs ~2 GB while being binned).
    walltime : str
        ``HH:MM:SS`` per job.
    queue, account : str, optional
        Partition/queue and account (project) to submit to.
    prologue : list of str
        Shell lines run before the worker starts (activate the environment here).
    extra : list of str
        Additional ``#SBATCH``/``#PBS`` directives, e.g. ``--constraint=cpu``.
    local_directory : str
        Node-local scratch for the worker's spill files.
    interface : str, optional
        Network interface the scheduler and workers bind to (e.g. ``ib0``).
    """

    kind: str = "slurm"
    jobs: int = 4
    memory: str = "4GB"
    walltime: str = "04:00:00"
    queue: str | None = None
    account: str | None = None
    prologue: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    local_directory: str = "$TMPDIR"
    interface: str | None = None

    def __post_init__(self) -> None:
        """Refuse settings dask-jobqueue would only reject at submission time."""
        if self.kind not in KINDS:
            raise ConfigError(f"cluster kind {self.kind!r} unknown; choose one of {KINDS}")
        if self.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {self.jobs}")


def make_cluster(spec: ClusterSpec) -> Any:
    """Start the scheduler here and return the (not yet scaled) dask-jobqueue cluster.

    Parameters
    ----------
    spec : ClusterSpec

    Returns
    -------
    dask_jobqueue.JobQueueCluster
        ``SLURMCluster`` or ``PBSCluster``; call ``scale(jobs=...)`` to submit.
    """
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise ConfigError("dask-jobqueue is not installed: python -m pip install "
                          "dask-jobqueue (or pip install -e '.[cluster]')") from exc
    cls = dask_jobqueue.SLURMCluster if spec.kind == "slurm" else dask_jobqueue.PBSCluster
    kwargs: dict[str, Any] = {
        "cores": 1, "processes": 1, "memory": spec.memory, "walltime": spec.walltime,
        "queue": spec.queue, "account": spec.account,
        "job_script_prologue": list(spec.prologue),
        "job_extra_directives": list(spec.extra),
        "local_directory": spec.local_directory,
        "scheduler_options": {"dashboard_address": None},
    }
    if spec.interface:
        kwargs["interface"] = spec.interface
    return cls(**kwargs)


def job_script(spec: ClusterSpec) -> str:
    """Text of the batch script each worker job runs (nothing is submitted).

    Parameters
    ----------
    spec : ClusterSpec

    Returns
    -------
    str
    """
    cluster = make_cluster(spec)
    try:
        return str(cluster.job_script())
    finally:
        cluster.close()


def run(spec: ClusterSpec, scheduler_file: Path, poll_seconds: float = 30.0) -> None:
    """Start the scheduler, submit the worker jobs, write the address file, wait for Ctrl-C.

    Parameters
    ----------
    spec : ClusterSpec
    scheduler_file : Path
        JSON file ``{"address": "tcp://HOST:PORT"}`` written atomically once the scheduler
        listens (on the shared filesystem, so every node can read it).
    poll_seconds : float
        How often the number of connected workers is reported.
    """
    import click

    cluster = make_cluster(spec)
    try:
        cluster.scale(jobs=spec.jobs)
        write_text_atomic(Path(scheduler_file),
                          json.dumps({"address": cluster.scheduler_address}) + "\n")
        click.echo(f"scheduler {cluster.scheduler_address} (written to {scheduler_file}); "
                   f"{spec.jobs} {spec.kind} jobs submitted; Ctrl-C cancels them", err=True)
        while True:
            time.sleep(poll_seconds)
            n = len(cluster.scheduler_info.get("workers", {}))
            click.echo(f"{n}/{spec.jobs} workers connected", err=True)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.close()
