"""Callbacks that run when a writer session of an archive ends.

The archive knows nothing of the views; the views' ``setup.sql`` (for the plain DuckDB CLI)
must still follow every commit. The package registers that callback here (see
``desomdb/__init__.py``), so :mod:`desomdb.archive.store` calls it without importing the views.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: Called with the :class:`desomdb.archive.store.Archive` after every writer session.
POST_COMMIT: list[Callable[[Any], None]] = []


def on_commit(hook: Callable[[Any], None]) -> None:
    """Register ``hook(archive)`` to run when a writer session ends (once per function)."""
    if hook not in POST_COMMIT:
        POST_COMMIT.append(hook)


def run_post_commit(archive: Any) -> None:
    """Run every registered hook with ``archive`` (called when a writer session ends)."""
    for hook in POST_COMMIT:
        hook(archive)
