"""The one place that owns on-disk names inside an archive directory.

Layout::

    ARCHIVE/
      _manifest.json            committed files of every table (atomic replace = commit)
      _lock                     held (flock) by the one writer
      _staging/                 files being written; never read by queries
      <table>/release=<R>/...   hive-partitioned Parquet (data tables)
      <table>/model_id=<M>/...  hive-partitioned Parquet (per-model tables)
      models/<model_id>/        model artefacts (checkpoints)
"""

from __future__ import annotations

from pathlib import Path

MANIFEST = "_manifest.json"
LOCK = "_lock"
STAGING = "_staging"
MODELS_DIR = "artefacts"
CURRENT_MODEL = "_current_model.json"
SETUP_SQL = "setup.sql"

#: Tables partitioned by data release.
RELEASE_TABLES = ("cubes", "galaxies", "baxels", "spectra", "bin_map", "truth", "labels")
#: Tables partitioned by model id.
MODEL_TABLES = ("models", "nodes", "assignments", "node_labels", "fingerprints", "splits")
TABLES = RELEASE_TABLES + MODEL_TABLES


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
