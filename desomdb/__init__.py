"""desomdb: an archive of integral-field galaxy spectra organised by a Deep Embedded SOM.

The pipeline follows Teimoorinia et al. (2022, ApJ 926, 92): MaNGA DRP cubes are
Voronoi-binned into "baxels", labelled with pPXF, mapped onto a DESOM, and summarised per
galaxy as fingerprints that a second DESOM groups. See the documentation (``docs/``)
for the commands.

``desomdb.connect(archive)`` returns a read-only DuckDB connection with every view;
``desomdb.predict_spectra(archive, file)`` gives nodes and label PDFs for new spectra.
"""

from typing import Any

from desomdb._version import __version__
from desomdb.archive import hooks
from desomdb.errors import DesomdbError


def _regenerate_setup_sql(archive: Any) -> None:
    # The views own setup.sql and the query cache; imported here, when a writer ends, not at
    # package import.
    from desomdb.query.views import write_query_cache, write_setup_sql

    write_setup_sql(archive)
    write_query_cache(archive)


hooks.on_commit(_regenerate_setup_sql)

#: Modules that lived at the top of the package before it was cut into floors, and where they
#: are now: ``desomdb.stack.stack(...)`` and ``from desomdb import similar`` keep working.
MOVED = {
    "stack": "desomdb.products.stack",
    "similar": "desomdb.products.similar",
    "predict": "desomdb.products.predict",
    "calibrate": "desomdb.pipeline.calibrate",
    "templates": "desomdb.science.templates",
    "intake_catalog": "desomdb.query.intake_catalog",
    "views": "desomdb.query.views",
}

__all__ = ["DesomdbError", "__version__", "connect", "predict_spectra", *MOVED]


def __getattr__(name: str) -> Any:
    # Lazy: importing torch or DuckDB is not needed for every use of the package.
    if name == "connect":
        from desomdb.query.views import connect

        return connect
    if name == "predict_spectra":
        from desomdb.products.predict import predict

        return predict
    if name in MOVED:
        import importlib

        return importlib.import_module(MOVED[name])
    raise AttributeError(f"module 'desomdb' has no attribute {name!r}")
