"""Progress reporting: a tqdm bar on a terminal, sparse one-line milestones in a log.

A tqdm bar redrawn into a redirected log leaves one line (or one carriage-return segment)
per update; a 750-iteration training run becomes 750 lines. :func:`progress_bar` is the one
place every stage gets its progress display from: on an interactive stream it is tqdm; on
any other stream it writes a line at most every ``every_fraction`` of the total or every
``every_s`` seconds (whichever comes first), plus one when done. Zero-length work shows
nothing (no empty ``0task`` bars).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

#: Non-interactive streams: a line at least every this fraction of the total...
EVERY_FRACTION = 0.1
#: ...or every this many seconds, whichever comes first.
EVERY_S = 30.0


class Milestones:
    """A tqdm-like counter that prints sparse, complete lines (for logs and pipes).

    Implements the part of tqdm's interface the stages use: ``update``, ``set_postfix``,
    ``close`` and use as a context manager.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0,
                 file: TextIO | None = None, every_fraction: float = EVERY_FRACTION,
                 every_s: float = EVERY_S) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self.file = file
        self.step = max(1, int(total * every_fraction))
        self.every_s = every_s
        self.postfix = ""
        self._t0 = self._last_t = time.monotonic()
        self._last_n = initial
        self._closed = False

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps; print a line if a milestone was passed."""
        self.n += n
        now = time.monotonic()
        if self.n >= self.total or (self.n - self._last_n >= self.step
                                    or now - self._last_t >= self.every_s):
            self._write(now)

    def set_postfix(self, **values: Any) -> None:
        """Remember values appended to the next line (as tqdm's ``set_postfix``)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """Print the final count if the last update did not."""
        if not self._closed and self.n != self._last_n:
            self._write(time.monotonic())
        self._closed = True

    def __enter__(self) -> Milestones:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, now: float) -> None:
        pct = 100 * self.n / self.total if self.total else 100.0
        extra = f" ({self.postfix})" if self.postfix else ""
        line = (f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f} %) "
                f"{now - self._t0:.0f} s{extra}")
        print(line, file=self.file if self.file is not None else sys.stderr, flush=True)
        self._last_n, self._last_t = self.n, now


def _interactive(stream: TextIO) -> bool:
    if type(stream).__module__.startswith("ipykernel"):
        return True  # a Jupyter cell: tqdm.auto draws a widget
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(total: int, desc: str, *, unit: str = "it", initial: int = 0,
                 enabled: bool = True, file: TextIO | None = None) -> Any:
    """Return a progress counter for ``total`` steps (``update``, ``set_postfix``, ``close``).

    Parameters
    ----------
    total : int
        Number of steps; 0 shows nothing.
    desc : str
        Label printed before the count.
    unit : str
        What a step is ("task", "cube", "it").
    initial : int
        Steps already done (a resumed run).
    enabled : bool
        False shows nothing (the stages' ``progress=False``).
    file : text stream, optional
        Where to write (default ``sys.stderr``); a tqdm bar if it is a terminal, otherwise
        :class:`Milestones`.
    """
    stream = file if file is not None else sys.stderr
    if not enabled or total <= 0:
        return tqdm(total=total, disable=True)
    if _interactive(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream)
    return Milestones(total, desc, unit=unit, initial=initial, file=stream)
