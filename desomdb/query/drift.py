"""The ``drift`` view as typed rows: how many baxels a model represents poorly, per release.

Shared by ``desomdb refresh`` (the new release's row) and ``desomdb status`` (every release
under the current model), without either importing the other's machinery.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from desomdb.archive.store import Archive
from desomdb.query import views


@dataclass(frozen=True)
class DriftSummary:
    """One row of the ``drift`` view: how many baxels of a release a model represents poorly.

    ``frac_*`` near 0.01 for spectra like the training set is expected; well above it says
    the data moved (retrain).
    """

    model_id: str
    release: str
    n_baxels: int
    n_beyond_p99: int
    frac_beyond_p99: float
    n_trainable: int
    n_trainable_beyond_p99: int
    frac_trainable_beyond_p99: float | None
    distance_p99: float


def drift_rows(con: views.ReadOnlyConnection | duckdb.DuckDBPyConnection,
               model_id: str) -> list[DriftSummary]:
    """Return the ``drift`` view's rows of one model on an open connection, by release."""
    return [DriftSummary(**row) for row in con.sql(
        "select * from drift where model_id = ? order by release", params=[model_id]
    ).pl().to_dicts()]


def drift_summary(arch: Archive, model_id: str, release: str) -> DriftSummary | None:
    """Return the ``drift`` view's row for one model and release (None if none)."""
    rows = drift_rows(views.connect(arch.root, model=model_id), model_id)
    return next((r for r in rows if r.release == release), None)
