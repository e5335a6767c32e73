"""What each column of the public views means: descriptions and units from ``sql/schema.yml``.

Units are astropy unit strings (``u.Unit(text)`` parses them, with
:mod:`astropy.cosmology.units` enabled for ``littleh``). Logarithmic quantities carry
``dex`` units (``dex(solMass / solLum)``), which neither the FITS nor the VOUnit standard
can express. FITS files get no ``TUNITn``/``BUNIT`` for them, nor for other units outside
the FITS standard (``littleh``; SDSS's ``nanomaggy``, 3.631e-6 Jy), since astropy would warn
on every read: :func:`fits_unit` returns None and :func:`unit_note` gives the text the
column's comment carries instead,
with the unit in the CDS convention that VizieR and TOPCAT use (``[solMass/solLum]``; a
bare ``dex``, a logarithmic ratio such as [M/H], as ``dex``). VOTables keep them as units
(CDS spelling).

A query's result columns are matched to documented columns by name: first in the views the
query names (in the order it names them) and the views those are built from (so
``galaxy_summary`` columns from ``galaxies`` get its descriptions), then in any view where the
name has one physical unit.
``median(age_mw_gyr)`` and other aggregates that keep their argument's unit get that unit.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, cast

import duckdb
import yaml
from astropy import units as u
from astropy.cosmology import units as cu

#: Aggregates whose result has the unit of their argument.
SAME_UNIT = frozenset({"median", "avg", "mean", "min", "max", "any_value", "first", "last",
                       "arg_min", "arg_max", "quantile", "quantile_cont", "quantile_disc",
                       "stddev", "stddev_samp", "stddev_pop", "sum"})
_CALL = re.compile(r"^\s*([a-z_]+)\s*\(\s*(?:distinct\s+)?\"?([a-z_][a-z0-9_]*)\"?\s*[,)]", re.I)


@dataclass(frozen=True)
class ColumnDoc:
    """One documented column.

    Attributes
    ----------
    description : str
    unit : str or None
        astropy unit string (generic format); None for dimensionless or non-physical values.
    """

    description: str
    unit: str | None = None


@cache
def _spec() -> dict[str, Any]:
    text = resources.files("desomdb.sql").joinpath("schema.yml").read_text()
    return cast(dict[str, Any], yaml.safe_load(text))


@cache
def view_docs() -> dict[str, dict[str, ColumnDoc]]:
    """Every documented view (and table macro) -> column name -> :class:`ColumnDoc`.

    In ``schema.yml``'s order: views, then macros.
    """
    out: dict[str, dict[str, ColumnDoc]] = {}
    for section in ("views", "macros"):
        for view, body in (_spec().get(section) or {}).items():
            out[view] = {name: _doc(value) for name, value in body["columns"].items()}
    return out


@cache
def view_descriptions() -> dict[str, str]:
    """Every documented view (and table macro) -> its one-line description."""
    return {view: str(body.get("description", "")) for section in ("views", "macros")
            for view, body in (_spec().get(section) or {}).items()}


def _doc(value: Any) -> ColumnDoc:
    if isinstance(value, dict):
        return ColumnDoc(str(value.get("description", "")), value.get("unit"))
    return ColumnDoc(str(value))


def parse_unit(text: str) -> u.UnitBase:
    """Parse a ``schema.yml`` unit string (astropy generic format, ``littleh`` known)."""
    with u.add_enabled_units(cu):
        return u.Unit(text)


def column_docs(names: Sequence[str], query: str = "") -> dict[str, ColumnDoc]:
    """Documentation of a result's columns (only those that can be matched).

    Parameters
    ----------
    names : sequence of str
        The result's column names.
    query : str
        The SQL that made them. The views it names, then the views those are built from
        (``galaxy_summary`` -> ``galaxies``, ``labels`` ...), are searched in that order.
    """
    docs = view_docs()
    named = _views_named(query, docs)
    out: dict[str, ColumnDoc] = {}
    for name in names:
        doc = _lookup(name, named, docs)
        if doc is None:
            call = _CALL.match(name)
            if call and call.group(1).lower() in SAME_UNIT:
                inner = _lookup(call.group(2), named, docs)
                if inner is not None:
                    doc = ColumnDoc(f"{call.group(1).lower()} of {call.group(2)}: "
                                    f"{inner.description}", inner.unit)
        if doc is not None:
            out[name] = doc
    return out


def _views_named(query: str, docs: dict[str, dict[str, ColumnDoc]]) -> list[str]:
    """Documented views ``query`` names, followed by the views their definitions name."""
    from desomdb.query.views import macro_sql, view_sql

    definitions = {**view_sql(), **macro_sql()}
    named = _identifiers(query, docs)
    for view in named:  # grows while it is walked: breadth first, each view once
        named.extend(v for v in _identifiers(definitions.get(view, ""), docs) if v not in named)
    return named


def _identifiers(query: str, docs: dict[str, dict[str, ColumnDoc]]) -> list[str]:
    if not query:
        return []
    try:
        tokens = duckdb.tokenize(query)
    except duckdb.Error:
        return []
    ends = [pos for pos, _ in tokens[1:]] + [len(query)]
    words = [query[pos:end].strip().strip('"').lower()
             for (pos, kind), end in zip(tokens, ends, strict=True)
             if kind == duckdb.token_type.identifier]
    return list(dict.fromkeys(w for w in words if w in docs))


def _lookup(name: str, named: list[str], docs: dict[str, dict[str, ColumnDoc]]
            ) -> ColumnDoc | None:
    for view in named:
        if name in docs[view]:
            return docs[view][name]
    # elsewhere only for a physical unit all views agree on: a bare name like "n" in another
    # view is more likely a different quantity than the same one
    found = [cols[name] for cols in docs.values() if name in cols]
    units = {d.unit for d in found}
    if not found or len(units) > 1 or None in units:
        return None
    return found[0]


def fits_unit(unit: str) -> str | None:
    """Spell a ``schema.yml`` unit for FITS ``TUNITn``/``BUNIT``; None if FITS cannot.

    Logarithmic (``dex``) units have no FITS spelling: write :func:`unit_note` into the
    column's comment instead (see the module notes).
    """
    parsed = parse_unit(unit)
    if isinstance(parsed, u.FunctionUnitBase):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", u.UnitsWarning)
        try:
            text = parsed.to_string("fits")
            u.Unit(text, format="fits")  # what a reader will do with it
        except (ValueError, TypeError):
            return None
    return str(text)


def unit_note(unit: str) -> str:
    """Text naming a unit FITS cannot carry, for a column comment: `` [unit: [yr]]``."""
    return f" [unit: {_format(unit, ('cds',))}]"


def vo_unit(unit: str) -> str:
    """Spell a ``schema.yml`` unit for a VOTable FIELD: VOUnit where it can, else CDS."""
    return _format(unit, ("vounit", "cds"))


def _format(unit: str, formats: tuple[str, ...]) -> str:
    parsed = parse_unit(unit)
    with warnings.catch_warnings():
        # VOUnit 1.0 deprecates erg and Angstrom but keeps them valid; they are what MaNGA uses
        warnings.simplefilter("ignore", u.UnitsWarning)
        for fmt in formats:
            try:
                return parsed.to_string(fmt)
            except (ValueError, TypeError):
                continue
    return unit
