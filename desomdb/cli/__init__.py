"""The ``desomdb`` command line: thin wrappers over the Python API.

Each command parses its options, calls one API function, and prints the result. Errors
derived from :class:`desomdb.errors.DesomdbError` are printed without a traceback and end
the process with a non-zero exit code.

The group and its shared options are :mod:`desomdb.cli.base`; the commands that build an
archive are in :mod:`desomdb.cli.build`, those that read one in :mod:`desomdb.cli.read`,
those that look after one (check, status, model) in :mod:`desomdb.cli.manage`.
"""

from desomdb.cli import build, manage, read  # registers the commands on the group
from desomdb.cli.base import main

__all__ = ["build", "main", "manage", "read"]
