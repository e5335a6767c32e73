"""The one place that owns on-disk names inside an archive directory.

Layout::

    ARCHIVE/
      _manifest.json            generation, one segment per table, superseded files
                                (its atomic replace is the commit)
      _manifest.d/<table>-<generation>.json
                                a table's committed files with size and sha256 (immutable)
      _lock                     held (flock) by the one writer
      _staging/                 files being written; never read by queries
      <table>/release=<R>/...   hive-partitioned Parquet (data tables)
      <table>/model_id=<M>/...  hive-partitioned Parquet (per-model tables)
      artefacts/<model_id>/     model artefacts (checkpoints)
      _current_model.json       the current model of each kind
      setup.sql                 views for the plain DuckDB CLI
      _last_report.json         where the last 'desomdb report' went and what it was drawn from
"""

from __future__ import annotations

from pathlib import Path

MANIFEST = "_manifest.json"
MANIFEST_DIR = "_manifest.d"
LOCK = "_lock"
STAGING = "_staging"
MODELS_DIR = "artefacts"
CURRENT_MODEL = "_current_model.json"
SETUP_SQL = "setup.sql"
LAST_REPORT = "_last_report.json"

#: Tables partitioned by data release.
RELEASE_TABLES = ("cubes", "galaxies", "baxels", "spectra", "bin_map", "truth", "labels")
#: Tables partitioned by model id.
MODEL_TABLES = ("models", "nodes", "assignments", "node_labels", "fingerprints", "splits")
TABLES = RELEASE_TABLES + MODEL_TABLES
#: Columns that identify a row of each table (hive partition columns included).
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "cubes": ("release", "plateifu"),
    "galaxies": ("release", "plateifu"),
    "baxels": ("release", "plateifu", "bin_id"),
    "spectra": ("release", "plateifu", "bin_id"),
    "bin_map": ("release", "plateifu", "x", "y"),
    "truth": ("release", "plateifu", "bin_id"),
    "labels": ("release", "plateifu", "bin_id", "fitter"),
    "models": ("model_id",),
    "nodes": ("model_id", "node"),
    "assignments": ("model_id", "release", "plateifu", "bin_id"),
    "node_labels": ("model_id", "node", "label"),
    "fingerprints": ("model_id", "desom2_model_id", "mangaid"),
    "splits": ("model_id", "mangaid"),
}


def manifest_segment(table: str, generation: int) -> str:
    """Relative path of the manifest segment listing ``table``'s files at ``generation``."""
    return f"{MANIFEST_DIR}/{table}-{generation}.json"


def partition_dir(table: str, key: str, value: str) -> str:
    """Relative folder of one hive partition, e.g. ``baxels/release=DR15``."""
    return f"{table}/{key}={value}"


def release_dir(table: str, release: str) -> str:
    """Relative folder of a release partition of ``table``."""
    return partition_dir(table, "release", release)


def model_dir(table: str, model_id: str) -> str:
    """Relative folder of a model partition of ``table``."""
    return partition_dir(table, "model_id", model_id)


def cube_part_name(plateifu: str, checksum: str) -> str:
    """File name of one cube's rows in a per-cube part file."""
    return f"part-{plateifu}-{checksum[:12]}.parquet"


def artefact_dir(root: Path, model_id: str) -> Path:
    """Folder holding a model's checkpoint files."""
    return root / MODELS_DIR / model_id
