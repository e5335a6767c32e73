"""One exception hierarchy for desomdb.

Every error a user can trigger derives from :class:`DesomdbError`. Messages name the file,
row or parameter at fault and say what to do about it, so the CLI can print them as they are
(without a traceback) and exit non-zero.
"""

from __future__ import annotations


class DesomdbError(Exception):
    """Base class of every error desomdb raises on purpose."""

    exit_code = 1


class ConfigError(DesomdbError):
    """A job file, option or model configuration is invalid."""

    exit_code = 2


class InputDataError(DesomdbError):
    """An input file (cube, drpall table, spectra file) is missing, corrupt or malformed."""


class CubeFormatError(InputDataError):
    """A MaNGA LOGCUBE is truncated, lacks an HDU, or has the wrong shape or header."""


class ArchiveError(DesomdbError):
    """The archive directory is missing, inconsistent, or lacks a required table."""


class LockError(ArchiveError):
    """Another writer holds the archive lock."""


class TemplateLibraryError(DesomdbError):
    """The stellar-population template library cannot be built or loaded."""


class JobInterruptedError(DesomdbError):
    """A job stopped by Ctrl-C or SIGTERM; the work it had finished is kept.

    Attributes
    ----------
    n_done, n_left : int
        Tasks finished (and handed to the job, which commits them) and tasks not run.
    """

    exit_code = 130  # as a shell reports a process stopped by SIGINT

    def __init__(self, message: str, n_done: int = 0, n_left: int = 0):
        super().__init__(message)
        self.n_done, self.n_left = n_done, n_left


class ModelError(DesomdbError):
    """A DESOM model checkpoint is missing, corrupt, or does not match the archive."""


class QueryError(DesomdbError):
    """A SQL query is refused (not read-only) or names unknown tables or columns."""


def first_line(exc: BaseException) -> str:
    """Return an exception's first message line for one-line errors (its type if empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
