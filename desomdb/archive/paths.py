"""The one place that owns on-disk names inside an archive directory.

Layout::

    ARCHIVE/
      _manifest.json            generation, one segment per table, superseded files
                                (its atomic replace is the commit)
      _manifest.d/<table>-<generation>.json
                                a table's committed files with size and sha256 (immutable)
      _lock                     held (flock) by the one writer
      _staging/                 files being written; never read by queries
      _store/<table>/release=<R>/...
                                hive-partitioned Parquet (data tables): every committed
                                file, and superseded ones kept for older readers
      _store/<table>/model_id=<M>/...
                                hive-partitioned Parquet (per-model tables)
      <table>/...               hard links to exactly the committed files of _store/<table>
                                (what a plain glob of a table folder should see; archives
                                written before _store kept their files here)
      artefacts/<model_id>/     model artefacts (checkpoints)
      artefacts/<model_id>/similar/
                                similarity-search indexes (<kind>.json names the current
                                <kind>-<source>.usearch and its -keys.parquet)
      _current_model.json       the current model of each kind
      setup.sql                 views for the plain DuckDB CLI
      _query_cache.duckdb       baxel_labels of the current model, pre-joined (rebuilt after
                                each writer session; readers use it only while it matches
                                their snapshot of the manifest)
      _last_report.json         where the last 'desomdb report' went and what it was drawn from
"""

from __future__ import annotations

import re
from pathlib import Path

MANIFEST = "_manifest.json"
MANIFEST_DIR = "_manifest.d"
LOCK = "_lock"
STAGING = "_staging"
#: Where ``desomdb check --repair`` moves files no manifest lists (outside every table folder).
QUARANTINE = "_quarantine"
#: Where committed data files live (``_store/<table>/<key>=<value>/<file>``), and where
#: superseded ones stay for older readers. Each table folder ``<table>/`` holds a hard link
#: to every committed file and nothing else, so a plain glob of it (polars, pandas, DuckDB)
#: sees exactly the committed rows; readers of desomdb bind the stored paths.
STORE = "_store"
MODELS_DIR = "artefacts"
CURRENT_MODEL = "_current_model.json"
SETUP_SQL = "setup.sql"
QUERY_CACHE = "_query_cache.duckdb"
LAST_REPORT = "_last_report.json"
#: The last writer session: its command, and whether it finished, failed or was interrupted.
LAST_JOB = "_last_job.json"

#: Tables partitioned by data release.
RELEASE_TABLES = ("cubes", "galaxies", "baxels", "spectra", "bin_map", "truth", "labels",
                  "label_errors", "images")
#: Tables partitioned by model id.
MODEL_TABLES = ("models", "nodes", "assignments", "node_labels", "fingerprints", "splits",
                "node_partials", "label_plan", "map_labels")
TABLES = RELEASE_TABLES + MODEL_TABLES
#: Columns that identify a row of each table (hive partition columns included).
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "cubes": ("release", "plateifu"),
    "galaxies": ("release", "plateifu"),
    "baxels": ("release", "plateifu", "bin_id"),
    "spectra": ("release", "plateifu", "bin_id"),
    "bin_map": ("release", "plateifu", "x", "y"),
    "truth": ("release", "plateifu", "bin_id"),
    "images": ("release", "plateifu", "band"),
    "labels": ("release", "plateifu", "bin_id", "fitter"),
    "label_errors": ("release", "fitter", "label", "snr_lo"),
    "models": ("model_id",),
    "nodes": ("model_id", "node"),
    "assignments": ("model_id", "release", "plateifu", "bin_id"),
    "node_labels": ("model_id", "node", "label"),
    "fingerprints": ("model_id", "desom2_model_id", "mangaid"),
    "splits": ("model_id", "mangaid"),
    "node_partials": ("model_id", "release", "plateifu", "node"),
    "label_plan": ("model_id", "release", "plateifu", "bin_id"),
    "map_labels": ("model_id", "release", "plateifu", "bin_id"),
}


def manifest_segment(table: str, generation: int) -> str:
    """Relative path of the manifest segment listing ``table``'s files at ``generation``."""
    return f"{MANIFEST_DIR}/{table}-{generation}.json"


def parse_manifest_segment(name: str) -> tuple[str, int] | None:
    """Inverse of :func:`manifest_segment` (a path or a bare file name): ``(table, generation)``.

    None for any other file name.
    """
    stem = name.rsplit("/", 1)[-1]
    if not stem.endswith(".json"):
        return None
    table, _, gen = stem[:-len(".json")].rpartition("-")
    return (table, int(gen)) if table and gen.isdigit() else None


def commit_journal(generation: int) -> str:
    """Relative path of the journal a writer keeps while it commits ``generation``.

    It lists the files the commit moves into the tables and the segments it writes, before
    it moves any: if the writer dies mid-commit, the next writer deletes exactly those files
    (and no other) that no manifest lists.
    """
    return f"{STAGING}/commit-{generation}.json"


def stored(rel: str) -> str:
    """Where a committed data file lives: ``baxels/x`` -> ``_store/baxels/x`` (idempotent).

    The manifest lists these paths and every reader binds them. Archives written before
    :data:`STORE` existed list table-folder paths; those are kept as they are.
    """
    return rel if rel.startswith(STORE + "/") else f"{STORE}/{rel}"


def mirror(rel: str) -> str | None:
    """Return a stored file's table-folder name (``_store/baxels/x`` -> ``baxels/x``).

    None for a file of the older layout, which lives in its table folder itself.
    """
    return rel[len(STORE) + 1:] if rel.startswith(STORE + "/") else None


def logical(rel: str) -> str:
    """Return a committed file's path without the :data:`STORE` prefix (``<table>/...``)."""
    return mirror(rel) or rel


def partition_dir(table: str, key: str, value: str) -> str:
    """Relative folder of one hive partition, e.g. ``baxels/release=DR15``."""
    return f"{table}/{key}={value}"


def release_dir(table: str, release: str) -> str:
    """Relative folder of a release partition of ``table``."""
    return partition_dir(table, "release", release)


def model_dir(table: str, model_id: str) -> str:
    """Relative folder of a model partition of ``table``."""
    return partition_dir(table, "model_id", model_id)


def release_file(table: str, release: str, name: str) -> str:
    """Relative path of a file in a release partition of ``table``."""
    return f"{release_dir(table, release)}/{name}"


def model_file(table: str, model_id: str, name: str | None = None) -> str:
    """Relative path of a file in a model partition of ``table``.

    Without ``name``, the table's one file per model (see :data:`MODEL_FILE_NAMES`).
    """
    return f"{model_dir(table, model_id)}/{name or MODEL_FILE_NAMES[table]}"


#: The single file a model writes for these per-model tables.
MODEL_FILE_NAMES = {"models": "model.parquet", "splits": "splits.parquet",
                    "nodes": "nodes.parquet", "node_labels": "node_labels.parquet",
                    "fingerprints": "fingerprints.parquet", "map_labels": "map_labels.parquet"}


def parse_partition(rel: str) -> tuple[str, str, str]:
    """Inverse of :func:`partition_dir` for a committed file.

    ``"baxels/release=DR15/compact-3.parquet"`` -> ``("baxels", "release", "DR15")``.

    Raises
    ------
    ValueError
        If ``rel`` is not ``<table>/<key>=<value>/<name>``.
    """
    parts = logical(rel).split("/")
    if len(parts) < 3 or "=" not in parts[1]:
        raise ValueError(f"{rel!r} is not <table>/<key>=<value>/<file>")
    key, value = parts[1].split("=", 1)
    return parts[0], key, value


def compact_name(generation: int) -> str:
    """File name of a partition's compacted rows, written at manifest ``generation``."""
    return f"compact-{generation}.parquet"


def cube_part_name(plateifu: str, checksum: str) -> str:
    """File name of one cube's rows in a per-cube part file (ingest tables)."""
    return f"part-{plateifu}-{checksum[:12]}.parquet"


#: Separates a file's generation tag from the rest of its name (see :func:`label_part_name`).
GENERATION_TAG = "@"


def _generation_tag(generation: int | None) -> str:
    return f"{GENERATION_TAG}{generation}" if generation is not None else ""


def plan_part_name(generation: int) -> str:
    """File name of one labelling-plan run's rows (``label_plan``), by the generation it adds."""
    return f"plan-{generation}.parquet"


def label_part_name(plateifu: str, fitter: str, generation: int | None = None) -> str:
    """File name of one cube's labels by one fitter.

    A cube's label file rewritten with more rows (a sampled cube extended) is committed under
    a new name tagged with the manifest generation it was planned at: a committed file never
    changes under its name, which readers (DuckDB's Parquet footer cache) rely on.
    """
    return f"part-{plateifu}-{fitter}{_generation_tag(generation)}.parquet"


def parse_label_part_name(name: str) -> tuple[str, str] | None:
    """Inverse of :func:`label_part_name`: ``(plateifu, fitter)``, None for other names."""
    part = parse_part_name(name)
    return (part[0], part[1].split(GENERATION_TAG, 1)[0]) if part else None


_PART = re.compile(r"^part-([^-/]+-[^-/]+)-([^/]+)\.parquet$")


def parse_part_name(name: str) -> tuple[str, str] | None:
    """Inverse of :func:`cube_part_name` / :func:`label_part_name`.

    Returns
    -------
    (plateifu, rest) or None
        ``rest`` is the checksum prefix or fitter id; None for other files (compacted ones).
    """
    m = _PART.match(name)
    return (m.group(1), m.group(2)) if m else None


def assignment_part_name(release: str, spectra_name: str) -> str:
    """File name of the assignments of one spectra part file (one cube of one release)."""
    return f"release={release}-{spectra_name}"


def parse_assignment_part_name(name: str) -> tuple[str, str]:
    """Inverse of :func:`assignment_part_name`: ``(release, spectra part file name)``.

    Raises
    ------
    ValueError
        For a name that :func:`assignment_part_name` did not make.
    """
    head, sep, spectra_name = name.partition("-")
    if not head.startswith("release=") or not sep:
        raise ValueError(f"{name!r} is not an assignment part file name")
    return head.removeprefix("release="), spectra_name


def model_part_cube(name: str) -> tuple[str, str] | None:
    """``(release, plateifu)`` of a per-cube model part file (assignments, node partials).

    None for any other file name (a compacted file, say).
    """
    try:
        release, spectra_name = parse_assignment_part_name(name)
    except ValueError:
        return None
    part = parse_part_name(spectra_name)
    return (release, part[0]) if part else None


def node_partials_file(model_id: str, release: str, spectra_name: str) -> str:
    """Relative path of one cube's node co-add partial sums under a model.

    Named like the cube's assignments (:func:`assignment_part_name`), so
    :func:`parse_assignment_part_name` reads it back.
    """
    return model_file("node_partials", model_id, assignment_part_name(release, spectra_name))


#: The error model of the label fits (:mod:`desomdb.pipeline.calibrate`).
LABEL_ERRORS = "label_errors"


def label_errors_name(fitter: str, generation: int | None = None) -> str:
    """File name of one fitter's error model in a release partition of ``label_errors``.

    Re-calibrating commits the new model under a new name (tagged with the manifest
    generation, as :func:`label_part_name`) and drops the old file.
    """
    return f"label_errors-{fitter}{_generation_tag(generation)}.parquet"


def parse_label_errors_name(name: str) -> str | None:
    """Inverse of :func:`label_errors_name`: the fitter id, None for other names."""
    if not (name.startswith("label_errors-") and name.endswith(".parquet")):
        return None
    return name.removeprefix("label_errors-").removesuffix(".parquet").split(GENERATION_TAG)[0]


def checkpoint_name(model_id: str, digest: str) -> str:
    """File name of a model's final checkpoint: id and content-hash prefix."""
    return f"{model_id}-{digest[:16]}.pt"


def parse_checkpoint_name(name: str) -> tuple[str, str]:
    """Inverse of :func:`checkpoint_name`: ``(model_id, digest prefix)``."""
    stem = name.removesuffix(".pt")
    model_id, _, digest = stem.rpartition("-")
    return model_id, digest


def staged_cube_dir(staging: Path, plateifu: str, checksum: str) -> Path:
    """Folder in which a worker stages one cube's tables (inside ``_staging``)."""
    return staging / f"{plateifu}-{checksum[:12]}"


def staged_table_file(unit: Path, table: str) -> Path:
    """One table's staged rows inside a staging folder."""
    return unit / f"{table}.parquet"


def truth_sidecar_name(release: str) -> str:
    """File name of a mock survey's per-spaxel truth, written beside its drpall table."""
    return f"truth-{release}.parquet"


def train_state_path(root: Path, model_id: str) -> Path:
    """Resumable training state of a model being trained."""
    return artefact_dir(root, model_id) / "train_state.pt"


def comparison_path(root: Path, new_id: str, old_id: str) -> Path:
    """Movement report of a retrained model against its parent."""
    return artefact_dir(root, new_id) / f"comparison-{old_id}.json"


def artefact_dir(root: Path, model_id: str) -> Path:
    """Folder holding a model's checkpoint files."""
    return root / MODELS_DIR / model_id


#: A similarity index of a DESOM-1 model: kind ``baxels`` (latents) or ``galaxies``
#: (fingerprints), and the digest of the committed files it was built from.
_INDEX_FILE = re.compile(r"^(baxels|galaxies)-([0-9a-f]{16})(\.usearch|-keys\.parquet)$")


def index_dir(root: Path, model_id: str) -> Path:
    """Folder of a DESOM-1 model's similarity indexes (an artefact, outside the manifest)."""
    return artefact_dir(root, model_id) / "similar"


def index_meta_path(root: Path, model_id: str, kind: str) -> Path:
    """Path of the JSON naming the current index of ``kind`` and what it was built from."""
    return index_dir(root, model_id) / f"{kind}.json"


def index_file_name(kind: str, source: str) -> str:
    """File name of an index of ``kind`` built from committed files with digest ``source``."""
    return f"{kind}-{source[:16]}.usearch"


def index_keys_name(kind: str, source: str) -> str:
    """File name of the table mapping an index's integer keys to rows (baxels or galaxies)."""
    return f"{kind}-{source[:16]}-keys.parquet"


def parse_index_file_name(name: str) -> tuple[str, str] | None:
    """Inverse of :func:`index_file_name` / :func:`index_keys_name`: ``(kind, source prefix)``.

    None for other files (the JSON pointers, temporary files).
    """
    m = _INDEX_FILE.match(name)
    return (m.group(1), m.group(2)) if m else None
