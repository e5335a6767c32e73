"""The archive's galaxies as a HATS catalog, for cross-matching at scale with LSDB.

``export_hats(archive, out)`` writes the ``galaxy_summary`` view (RA/Dec, redshift, drpall
properties, median labels, fingerprint peak node, DESOM-2 node; one row per cube in its
newest release) with ``hats-import``, so that::

    lsdb.open_catalog(out).crossmatch(other_catalog, radius_arcsec=3, n_neighbors=1)

works. Columns keep their units and descriptions in the Parquet field metadata, and the
provenance is in the catalog's ``hats.properties`` (``desomdb_*`` keys) and in each file's
Parquet metadata. hats-import runs on a local Dask client inside this process (one worker,
one thread, no dashboard), closed before returning. The catalog is built beside ``out`` and
renamed into place, so ``out`` is either the previous catalog or the new one.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from desomdb.archive.outputs import output_folder
from desomdb.archive.store import Archive
from desomdb.errors import ArchiveError, ConfigError
from desomdb.products import export
from desomdb.products.provenance import Provenance, provenance
from desomdb.query import views
from desomdb.query.schema import column_docs

QUERY = "select * from galaxy_summary where ra is not null and dec is not null"


@dataclass(frozen=True)
class HatsExport:
    """What :func:`export_hats` wrote.

    Attributes
    ----------
    path : Path
        The catalog folder (open it with ``lsdb.open_catalog``).
    n_rows : int
        Galaxies (cubes) written.
    n_without_position : int
        Rows of galaxy_summary left out for lack of RA/Dec.
    provenance : Provenance
    """

    path: Path
    n_rows: int
    n_without_position: int
    provenance: Provenance


def export_hats(archive: str | Path, out: str | Path, model: str | None = None,
                overwrite: bool = False) -> HatsExport:
    """Write the archive's galaxy summary as a HATS catalog at ``out``.

    Parameters
    ----------
    archive : str or Path
    out : str or Path
        Catalog folder to create; its name is the catalog name.
    model : str, optional
        DESOM-1 model for the node columns (default: the current one).
    overwrite : bool
        Replace an existing ``out``.

    Raises
    ------
    ConfigError
        ``out`` exists (and not ``overwrite``), or hats-import is not installed.
    ArchiveError
        The archive lacks what ``galaxy_summary`` needs (labels, assignments under the model,
        fingerprints); the message says which command makes it.
    """
    try:
        from dask.distributed import Client
        from hats_import import ImportArguments, pipeline_with_client
    except ImportError as exc:
        raise ConfigError(f"export-hats needs hats-import ({exc}); install it with "
                          "python -m pip install 'desomdb[hats]'") from exc

    out = output_folder(Path(out).absolute(), overwrite, wrote_it=is_hats_catalog)
    arch = Archive(archive)
    prov = provenance(arch.root, model)
    table, n_missing = _summary(arch, prov.model_id)
    if table.num_rows == 0:
        raise ArchiveError(f"{arch.root}: no galaxy with RA/Dec to export")
    docs = column_docs(table.column_names, QUERY)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        source = work / "input" / "galaxy_summary.parquet"
        source.parent.mkdir()
        pq.write_table(export.annotate(table, docs, prov), source)
        args = ImportArguments(
            output_path=work / "catalog", output_artifact_name=out.name,
            input_file_list=[source], file_reader="parquet", use_schema_file=source,
            ra_column="ra", dec_column="dec", sort_columns="plateifu", catalog_type="object",
            tmp_dir=work / "tmp", dask_tmp=work / "dask", resume=False, progress_bar=False,
            addl_hats_properties=_properties(prov), expected_total_rows=table.num_rows,
        )
        with Client(n_workers=1, threads_per_worker=1, processes=False,
                              dashboard_address=None, local_directory=str(work / "dask")
                              ) as client:
            pipeline_with_client(args, client)
        built = work / "catalog" / out.name
        if out.exists():
            old = work / "replaced"
            out.rename(old)
        built.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return HatsExport(out, table.num_rows, n_missing, prov)


#: Names a HATS catalogue folder holds at its top (hats-import's layout).
_HATS_NAMES = ("properties", "hats.properties", "partition_info.csv", "point_map.fits",
               "dataset", "_metadata", "_common_metadata", "data_thumbnail.parquet")


def is_hats_catalog(folder: Path) -> bool:
    """Whether ``folder`` is a HATS catalogue and nothing else (--overwrite may replace it)."""
    names = [p.name for p in folder.iterdir()]
    return (("properties" in names or "hats.properties" in names)
            and all(n in _HATS_NAMES or n.startswith(("Norder=", "skymap")) for n in names))


def _summary(arch: Archive, model_id: str | None) -> tuple[pa.Table, int]:
    """Rows of galaxy_summary with a position, and how many lack one."""
    con = views.connect(arch.root, model=model_id)
    try:
        present = {r[0] for r in con.sql(
            "select view_name from duckdb_views() where not internal").fetchall()}
        if "galaxy_summary" not in present:
            missing = views.missing_inputs("galaxy_summary", present)
            raise ArchiveError(f"{arch.root}: the galaxy_summary view needs "
                               f"{', '.join(missing) or 'a current DESOM-1 model'}")
        if model_id is None:
            raise ArchiveError(f"{arch.root}: no current DESOM-1 model; pick one with "
                               "'desomdb model use' or --model")
        table = con.sql(QUERY).to_arrow_table()
        total = con.sql("select count(*) from galaxy_summary").fetchall()[0][0]
    finally:
        con.close()
    return table, int(total) - table.num_rows


def _properties(prov: Provenance) -> dict[str, str]:
    """hats.properties entries: provenance (one line each) and the survey id column."""
    props = {k: v.replace("\n", " ") for k, v in prov.as_dict().items()}
    props["hats_cols_survey_id"] = "plateifu"
    return props
