"""Write query results as Parquet, FITS or VOTable with units, descriptions and provenance.

Units and descriptions come from ``sql/schema.yml`` (:mod:`desomdb.query.schema`), provenance
from :mod:`desomdb.products.provenance`. Where they go:

- **Parquet**: each field's metadata holds ``unit`` (astropy string) and ``description``;
  the schema metadata holds the provenance (``desomdb_*`` keys) and an astropy
  ``table_meta_yaml`` header, so ``astropy.table.Table.read(file)`` gives the units too.
- **FITS**: a binary table (``TUNITn`` in the FITS unit format, ``TCOMMn`` descriptions,
  as TOPCAT reads them) after a primary HDU; the provenance cards are in both headers.
  FITS headers are ASCII, so Å, Hα ... are spelled out there.
- **VOTable**: FIELD ``unit`` (VOUnit, CDS for dex units) and DESCRIPTION; provenance as
  INFO elements.

Nested columns become array columns when their rows have one length (spectra: 4544);
other nested columns (lists of varying length, structs) are left out and named.
"""

from __future__ import annotations

import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from astropy import units as u
from astropy.io import fits
from astropy.io.votable import from_table
from astropy.io.votable.exceptions import VOWarning
from astropy.io.votable.tree import Info
from astropy.table import MaskedColumn, Table

from desomdb.atomic import PARQUET_OPTIONS
from desomdb.errors import ConfigError
from desomdb.products.provenance import Provenance, provenance
from desomdb.query.schema import ColumnDoc, column_docs, fits_unit, unit_note, vo_unit

FORMATS = ("parquet", "fits", "votable")
_ASCII = {"Å": "Angstrom", "α": "alpha", "β": "beta", "Σ": "sum ", "Ω": "Omega",
          "Δ": "d", "σ": "sigma", "χ": "chi", "γ": "gamma", "·": "*", "×": "x", "−": "-",
          "≤": "<=", "≥": ">=", "—": "-", "–": "-"}


@dataclass(frozen=True)
class Exported:
    """What :func:`export_query` wrote: the file, its rows, and columns left out."""

    path: Path
    n_rows: int
    dropped: tuple[str, ...]


def export_query(archive: str | Path, query: str, path: str | Path, fmt: str,
                 model: str | None = None) -> Exported:
    """Run one read-only ``query`` on the archive and write its result to ``path``.

    The same guard as ``desomdb sql`` (:func:`desomdb.query.views.query`); ``model`` sets
    ``current_model()`` for the convenience views and the provenance.
    """
    from desomdb.query import views

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
    con = views.connect(archive, model=model)
    try:
        table = views.query(con, query).to_arrow_table()
    finally:
        con.close()
    dropped = write_table(table, path, fmt, provenance(archive, model), query)
    return Exported(Path(path), table.num_rows, tuple(dropped))


def write_table(table: pa.Table, path: str | Path, fmt: str, prov: Provenance,
                query: str = "", docs: dict[str, ColumnDoc] | None = None) -> list[str]:
    """Write ``table`` to ``path`` as ``fmt`` with column units and provenance.

    Parameters
    ----------
    table : pyarrow.Table
    path : str or Path
    fmt : {"parquet", "fits", "votable"}
    prov : Provenance
    query : str
        The SQL that made ``table`` (picks the views whose documentation applies).
    docs : dict, optional
        Column documentation; default :func:`desomdb.query.schema.column_docs` of the names.

    Returns
    -------
    list of str
        Columns left out (nested columns FITS/VOTable cannot hold); empty for Parquet.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
    docs = column_docs(table.column_names, query) if docs is None else docs
    path = Path(path)
    if fmt == "parquet":
        pq.write_table(annotate(table, docs, prov), path, **PARQUET_OPTIONS)
        return []
    astro, dropped = to_astropy(table)
    if fmt == "fits":
        _write_fits(astro, path, docs, prov)
    else:
        _write_votable(astro, path, docs, prov)
    return dropped


def annotate(table: pa.Table, docs: dict[str, ColumnDoc], prov: Provenance) -> pa.Table:
    """``table`` with units/descriptions in its field metadata and provenance in its schema."""
    fields = []
    header = []
    for field in table.schema:
        doc = docs.get(field.name)
        md = dict(field.metadata or {})
        entry: dict[str, object] = {"name": field.name, "datatype": _astropy_type(field.type)}
        if doc is not None:
            md[b"description"] = doc.description.encode()
            entry["description"] = doc.description
            if doc.unit:
                md[b"unit"] = doc.unit.encode()
                entry["unit"] = doc.unit
        fields.append(field.with_metadata(md) if md else field)
        header.append(entry)
    schema_md = dict(table.schema.metadata or {})
    schema_md.update({k.encode(): v.encode() for k, v in prov.as_dict().items()})
    schema_md[b"table_meta_yaml"] = yaml.safe_dump(
        {"datatype": header, "meta": prov.as_dict()}, sort_keys=False).encode()
    for field in table.schema:
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            lengths = [len(v) for v in table.column(field.name).to_pylist() if v is not None]
            schema_md[f"table::len::{field.name}".encode()] = str(max(lengths, default=1)).encode()
    return table.cast(pa.schema(fields, metadata=schema_md))


def _astropy_type(t: pa.DataType) -> str:
    if pa.types.is_floating(t):
        return f"float{t.bit_width}"
    if pa.types.is_integer(t):
        return f"{'u' if pa.types.is_unsigned_integer(t) else ''}int{t.bit_width}"
    if pa.types.is_boolean(t):
        return "bool"
    return "string"


def to_astropy(table: pa.Table) -> tuple[Table, list[str]]:
    """Convert to an astropy Table for FITS/VOTable; returns it and the columns left out."""
    out = Table()
    dropped = []
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        values = _numpy(col)
        if values is None:
            dropped.append(name)
            continue
        mask = np.asarray(col.is_null()) if col.null_count else None
        if mask is not None and values.ndim == 1 and values.dtype.kind not in "US":
            out[name] = MaskedColumn(values, mask=mask)
        else:
            out[name] = values
    return out, dropped


def _numpy(col: pa.Array) -> np.ndarray | None:
    t = col.type
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        lengths = set(col.value_lengths().drop_null().to_pylist()) if not \
            pa.types.is_fixed_size_list(t) else {t.list_size}
        inner = col.flatten()
        if len(lengths) != 1 or col.null_count or not _is_scalar(inner.type):
            return None
        flat = _numpy(inner)
        return None if flat is None else flat.reshape(len(col), lengths.pop())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return np.array([v if v is not None else "" for v in col.to_pylist()], dtype=str)
    if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_time(t):
        return np.array([v.isoformat() if v is not None else "" for v in col.to_pylist()],
                        dtype=str)
    if pa.types.is_boolean(t):
        return np.asarray(col.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        filler = 0 if pa.types.is_integer(t) else float("nan")
        return np.asarray(col.fill_null(filler).to_numpy(zero_copy_only=False))
    if pa.types.is_decimal(t):
        return np.asarray(col.cast(pa.float64()).fill_null(float("nan")).to_numpy(
            zero_copy_only=False))
    return None


def _is_scalar(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def ascii_text(text: str) -> str:
    """``text`` in ASCII for a FITS header (Å -> Angstrom, Hα -> Halpha, ...)."""
    for k, v in _ASCII.items():
        text = text.replace(k, v)
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def set_card(header: fits.Header, key: str, value: str | int | float, comment: str = ""
             ) -> None:
    """Set ``key`` in ASCII; a value too long for its comment keeps the value only."""
    text = ascii_text(value) if isinstance(value, str) else value
    # a long string continues over CONTINUE cards, which hold no comment
    header[key] = (text, comment if len(str(text)) + len(comment) < 60 else "")


def provenance_header(prov: Provenance) -> fits.Header:
    """FITS header cards of ``prov`` (ASCII)."""
    header = fits.Header()
    for key, value, comment in prov.fits_cards():
        set_card(header, key, value, comment)
    for ref in prov.references:
        header.add_comment(ascii_text(f"cite: {ref}"))
    return header


def _write_fits(astro: Table, path: Path, docs: dict[str, ColumnDoc], prov: Provenance
                ) -> None:
    hdu = fits.table_to_hdu(astro)
    hdu.name = "DESOMDB"
    for i, name in enumerate(astro.colnames, start=1):
        doc = docs.get(name)
        if doc is None:
            continue
        unit = fits_unit(doc.unit) if doc.unit else None
        if unit:
            hdu.header[f"TUNIT{i}"] = unit
        note = unit_note(doc.unit) if doc.unit and not unit else ""
        if doc.description or note:
            hdu.header[f"TCOMM{i}"] = ascii_text((doc.description or "") + note)
    cards = provenance_header(prov)
    hdu.header.extend(cards)
    primary = fits.PrimaryHDU(header=cards.copy())
    fits.HDUList([primary, hdu]).writeto(path, overwrite=True)


def _write_votable(astro: Table, path: Path, docs: dict[str, ColumnDoc], prov: Provenance
                   ) -> None:
    with warnings.catch_warnings():
        # units VOUnit deprecates (erg, Angstrom) or lacks (dex) are still written: they are
        # what MaNGA and VizieR use, and TOPCAT shows them
        warnings.simplefilter("ignore", u.UnitsWarning)
        warnings.simplefilter("ignore", VOWarning)
        vot = from_table(astro)
        for field in vot.get_first_table().fields:
            doc = docs.get(field.name)
            if doc is None:
                continue
            if doc.unit:
                # as written: the setter would re-parse 'dex' as deci-ex
                field.unit = u.UnrecognizedUnit(vo_unit(doc.unit))
            field.description = doc.description
        resource = vot.resources[0]
        for key, value in prov.as_dict().items():
            resource.infos.append(Info(name=key, value=value))
        vot.to_xml(str(path))
