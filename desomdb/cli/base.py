"""The command group, its error handling and the options and helpers commands share."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import click

from desomdb._version import __version__
from desomdb.errors import ConfigError, DesomdbError, JobInterruptedError

F = TypeVar("F", bound=Callable[..., Any])


SCHEDULER_HELP = ("Dask scheduler: address tcp://HOST:PORT or a scheduler file (.json) "
                  "(see 'desomdb cluster')")


def _friendly_errors(func: F) -> F:
    """Print errors as one ``desomdb: error:`` line and exit non-zero (no traceback).

    Errors desomdb raises on purpose carry their own message. Anything else (a file that
    vanished, a damaged Parquet file, a bug) still gets one line naming what failed; set
    ``DESOMDB_DEBUG=1`` to see the traceback.
    """
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except JobInterruptedError as exc:
            click.echo(f"desomdb: {exc}; what was committed is kept: rerun the same command "
                       "to continue", err=True)
            sys.exit(exc.exit_code)
        except DesomdbError as exc:
            click.echo(f"desomdb: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # also a Rust panic in a library (pyo3's PanicException)
            if os.environ.get("DESOMDB_DEBUG"):
                raise
            click.echo(f"desomdb: error: {_unexpected(exc)}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _unexpected(exc: BaseException) -> str:
    """One line for an error desomdb did not raise itself."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename:
        text = f"{exc.filename}: {exc.strerror or text}"
    return (f"{text[:400]} ({type(exc).__name__}); if an archive is involved, run "
            "'desomdb check ARCHIVE'; rerun with DESOMDB_DEBUG=1 to see the traceback")


def pl_config() -> Any:
    """Polars display settings for printed tables.

    On a terminal, tables fit its width; in a pipe or a log, cells are never wrapped (a
    model id split over two lines cannot be copied or grepped).
    """
    import shutil

    import polars as pl

    width = shutil.get_terminal_size((160, 24)).columns if sys.stdout.isatty() else 65_535
    return pl.Config(tbl_rows=50, tbl_cols=20, tbl_width_chars=width, fmt_str_lengths=100)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="desomdb")
def main() -> None:
    """desomdb: MaNGA spectra on a Deep Embedded Self-Organizing Map, queried with SQL.

    \b
    Pipeline: mock/ingest -> label -> train -> assign -> fingerprints -> sql/report;
    a new release: refresh.
    Example:
      desomdb demo --out /tmp/desomdb-demo
    """
    # SIGTERM (a batch system's kill, 'kill PID') stops a job as Ctrl-C does: finished work
    # is committed and the command says how to continue.
    if threading.current_thread() is threading.main_thread():  # only it may set handlers
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _ifu_sizes(text: str) -> tuple[int, ...]:
    """Parse --ifu-sizes ("19,37") into fibre counts."""
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        sizes = ()
    if not sizes:
        raise ConfigError(f"--ifu-sizes takes comma-separated fibre counts, e.g. 19,37; "
                          f"got {text!r}")
    return sizes


#: The per-cube pPXF limit, one option for label, refresh and demo.
_label_max_per_cube = click.option(
    "--label-max-per-cube", type=int,
    help="label at most this many baxels per cube, evenly spaced, counting those labelled "
         "before (quick looks; default: all)")


def _node_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--nodes takes comma-separated node numbers, e.g. 3,17; got {text!r}"
                          ) from None


def model_option(what: str = "DESOM-1 model") -> Callable[[F], F]:
    """Return the ``--model`` option, declared once; ``what`` says which model it picks."""
    return click.option("--model", "model_id", help=f"{what} (default: the current model)")


#: ``--overwrite``, declared once: replacing an output needs it (never inside an archive).
overwrite_option = click.option(
    "--overwrite", is_flag=True,
    help="replace the output if it exists (never inside an archive; see 'desomdb sql --help')")
