"""Where an export came from: archive, releases, models, template library, package version.

Every export (``desomdb sql --format fits|votable|parquet``, ``desomdb export-hats``,
``desomdb maps``) carries one :class:`Provenance`: as FITS header cards, VOTable INFO
elements, Parquet schema metadata or HATS properties. ``REFERENCES`` lists what a user of
the exported values should cite (``docs/cite.md`` says the same).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from desomdb._version import __version__
from desomdb.archive.store import Archive
from desomdb.som.registry import current_model

#: Template libraries by the name in a fitter id (``ppxf-<library>-v<N>``).
TEMPLATE_LIBRARIES = {
    "miuscat": "MIUSCAT SSPs (Vazdekis et al. 2012), unimodal IMF slope 1.3 (Salpeter-like): "
               "log M*/L about 0.2 dex above Kroupa",
    "bc03": "BC03 SSPs (Bruzual & Charlot 2003)",
}

REFERENCES = (
    "DESOM: Teimoorinia et al. 2022, ApJ 926, 92",
    "MaNGA: Bundy et al. 2015, ApJ 798, 7; DR15: Aguado et al. 2019, ApJS 240, 23; "
    "DR17: Abdurro'uf et al. 2022, ApJS 259, 35",
    "pPXF: Cappellari 2017, MNRAS 466, 798; Cappellari 2023, MNRAS 526, 3273",
    "vorbin: Cappellari & Copin 2003, MNRAS 342, 345",
    "MIUSCAT: Vazdekis et al. 2012, MNRAS 424, 157",
)
#: Added to :data:`REFERENCES` when labels were fitted with that library.
LIBRARY_REFERENCES = {"bc03": "BC03: Bruzual & Charlot 2003, MNRAS 344, 1000"}


@dataclass(frozen=True)
class Provenance:
    """The archive state and software an export was made from.

    Attributes
    ----------
    archive : str
        Archive folder (absolute).
    generation : int
        The archive's manifest generation (its commit counter) when the export was made.
    releases : tuple of str
        Data releases in the archive.
    model_id, desom2_model_id : str or None
        DESOM-1 model the model-dependent columns use (default: the current one), and the
        DESOM-2 of its fingerprints.
    fitters : tuple of str
        Fit set-ups in the labels table (e.g. ``ppxf-miuscat-v2``).
    package_version : str
    created_at : str
        UTC, ISO 8601.
    """

    archive: str
    generation: int
    releases: tuple[str, ...]
    model_id: str | None
    desom2_model_id: str | None
    fitters: tuple[str, ...]
    package_version: str
    created_at: str

    @property
    def libraries(self) -> tuple[str, ...]:
        """Template library names in the fitter ids (``ppxf-<library>-v<N>``)."""
        return tuple(dict.fromkeys(
            f.split("-")[1] if f.count("-") >= 2 else f for f in self.fitters))

    @property
    def template_library(self) -> str:
        """The SSP libraries behind the labels, with their IMF."""
        return "; ".join(TEMPLATE_LIBRARIES.get(lib, lib) for lib in self.libraries) or (
            "none (no labels)")

    @property
    def references(self) -> tuple[str, ...]:
        """What to cite for the exported values."""
        return REFERENCES + tuple(LIBRARY_REFERENCES[lib] for lib in self.libraries
                                  if lib in LIBRARY_REFERENCES)

    def as_dict(self) -> dict[str, str]:
        """Flat string key -> value (Parquet metadata, VOTable INFO, HATS properties)."""
        return {
            "desomdb_version": self.package_version,
            "desomdb_archive": self.archive,
            "desomdb_archive_generation": str(self.generation),
            "desomdb_releases": ",".join(self.releases),
            "desomdb_model_id": self.model_id or "",
            "desomdb_desom2_model_id": self.desom2_model_id or "",
            "desomdb_fitters": ",".join(self.fitters),
            "desomdb_template_library": self.template_library,
            "desomdb_created_at": self.created_at,
            "desomdb_references": "; ".join(self.references),
        }

    def fits_cards(self) -> list[tuple[str, str | int, str]]:
        """(keyword, value, comment) header cards; long values continue (CONTINUE cards)."""
        return [
            ("DESOMVER", self.package_version, "desomdb version that wrote this file"),
            ("ARCHIVE", self.archive, "desomdb archive folder"),
            ("ARCHGEN", self.generation, "archive manifest generation (commit)"),
            ("RELEASES", ",".join(self.releases), "MaNGA data releases in the archive"),
            ("DESOM1", self.model_id or "", "DESOM-1 model of node columns"),
            ("DESOM2", self.desom2_model_id or "", "DESOM-2 model of its fingerprints"),
            ("FITTER", ",".join(self.fitters), "label fit set-up(s)"),
            ("TEMPLIB", self.template_library, "SSP template library"),
            ("DATE", self.created_at, "UTC time of the export"),
            ("REFERENC", REFERENCES[0], "cite; see docs/cite.md"),
        ]


def provenance(archive: str | Path, model_id: str | None = None) -> Provenance:
    """Describe ``archive`` now; ``model_id`` defaults to its current DESOM-1 model."""
    from desomdb.query import views

    arch = Archive(archive)
    model_id = model_id or current_model(arch)
    con = views.connect(arch.root, model=model_id)

    def column(table: str, sql: str) -> list[str]:
        return [str(r[0]) for r in con.sql(sql).fetchall() if r[0]] if arch.has_table(
            table) else []

    try:
        releases = column("cubes", "select distinct release from cubes order by 1")
        fitters = column("labels", "select distinct fitter from labels order by 1")
        desom2 = column("fingerprints", "select distinct desom2_model_id from fingerprints "
                                        "where model_id = current_model()")
    finally:
        con.close()
    return Provenance(
        archive=str(arch.root.resolve()),
        generation=arch.generation(),
        releases=tuple(releases),
        model_id=model_id,
        desom2_model_id=desom2[0] if desom2 else None,
        fitters=tuple(fitters),
        package_version=__version__,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
