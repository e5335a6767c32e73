"""The record of an archive's last report, and whether it still shows the archive.

``desomdb report`` writes the record (:func:`record_report`); ``desomdb status`` and the
explorer read it (:func:`report_state`) without importing the plotting code.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from desomdb.archive import paths
from desomdb.archive.store import Archive
from desomdb.atomic import write_json_atomic
from desomdb.som import registry


def record_report(arch: Archive, index: Path, model_id: str, generation: int) -> None:
    """Note in the archive where its last report went and what it was drawn from.

    ``desomdb status`` compares this with the archive (:func:`report_state`). A reader may
    not be allowed to write into a shared archive: then the report still stands, and a
    note says status cannot follow it.
    """
    record = {"index": str(index.resolve()), "model_id": model_id, "generation": generation,
              "drawn_at": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        write_json_atomic(arch.root / paths.LAST_REPORT, record)
    except OSError as exc:
        print(f"desomdb: note: could not record the report in {arch.root} ({exc}); "
              "'desomdb status' will not know whether it is current", file=sys.stderr)


@dataclass(frozen=True)
class ReportState:
    """The last ``desomdb report`` of an archive and whether it still shows the archive.

    Attributes
    ----------
    index : str
        Its index.html.
    model_id : str or None
        The DESOM-1 model it shows.
    generation : int
        The manifest generation it was drawn from.
    drawn_at : str
    stale : str or None
        Why it no longer shows the archive; None when it does.
    """

    index: str
    model_id: str | None
    generation: int
    drawn_at: str
    stale: str | None


def report_state(arch: Archive) -> ReportState | None:
    """Read the last report's record and say whether the archive has moved on since.

    Returns
    -------
    ReportState or None
        None if no report was recorded (or its record is unreadable).
    """
    path = arch.root / paths.LAST_REPORT
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        index, model_id = str(state["index"]), state.get("model_id")
        generation, drawn_at = int(state["generation"]), str(state.get("drawn_at", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged record only means nobody knows where the report is
    now = arch.generation()
    current = registry.current_model(arch)
    reasons = []
    if now != generation:
        reasons.append(f"the archive has changed since (generation {generation} -> {now})")
    if current != model_id:
        reasons.append(f"it shows model {model_id}, the current model is {current}")
    return ReportState(index, model_id, generation, drawn_at, "; ".join(reasons) or None)
