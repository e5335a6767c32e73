"""What each explorer page shows, read from the archive's views (no HTML here).

One function per page, each taking a guarded :class:`desomdb.query.views.ReadOnlyConnection`
whose ``current_model()`` is the page's model, and returning a typed result. The queries are
the page's whole cost on the archive, so ``benchmarks/bench_serve.py`` times these functions
alone against the rendered page. Unknown nodes, galaxies and baxels raise
:class:`NotFoundError` with a one-line message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from desomdb.errors import QueryError
from desomdb.query.views import ReadOnlyConnection
from desomdb.science import label_catalogue

#: Labels a map can be coloured by and node PDFs are drawn for (the report's units).
LABELS = tuple(label_catalogue.ACCURACY_DISPLAY)
#: Rows shown in the SQL page (the CSV download has all).
SQL_ROWS_SHOWN = 500
#: Members, neighbours and nearest items listed per page.
N_LISTED = 50


class NotFoundError(QueryError):
    """A node, galaxy, baxel or model the archive does not have (HTTP 404)."""


@dataclass(frozen=True)
class CubeParts:
    """The committed per-cube part files of the tables written one file per cube.

    ``spectra`` and ``labels`` (per release) and ``assignments`` (per model) hold one file
    per cube (and fitter) until compacted; a survey has ~10,000 of them. A view reads every
    file's footer for a point lookup, so the pages read one cube's rows from its own files
    (still through the guarded connection, which may read only inside the archive) and fall
    back to the view where a cube has no file of its own (compacted rows).

    Attributes
    ----------
    files : dict
        table -> (release, plateifu) -> absolute paths of that cube's files.
    """

    files: dict[str, dict[tuple[str, str], list[str]]]

    def source(self, table: str, release: str, plateifu: str) -> str | None:
        """Return ``read_parquet([...])`` over one cube's files of ``table``, or None."""
        found = self.files.get(table, {}).get((release, plateifu))
        if not found:
            return None
        listed = ", ".join("'" + f.replace("'", "''") + "'" for f in found)
        return f"read_parquet([{listed}], union_by_name = true)"


NO_PARTS = CubeParts({})


@dataclass(frozen=True)
class ModelInfo:
    """A registered model as the pages need it.

    Attributes
    ----------
    model_id, kind : str
    rows, cols : int
        Map shape.
    distance_p99 : float or None
        The training p99 latent distance (``model_thresholds``; DESOM-1 only).
    """

    model_id: str
    kind: str
    rows: int
    cols: int
    distance_p99: float | None


def models(con: ReadOnlyConnection) -> dict[str, ModelInfo]:
    """Return every registered model, by id."""
    if not has_view(con, "models"):
        return {}
    out = {}
    for mid, kind, config, metrics in con.sql(
            "select model_id, kind, config, metrics from models").fetchall():
        cfg, met = json.loads(config or "{}"), json.loads(metrics or "{}")
        p99 = met.get("distance_p99")
        out[mid] = ModelInfo(mid, kind, int(cfg.get("map_rows", 0)), int(cfg.get("map_cols", 0)),
                             float(p99) if p99 is not None else None)
    return out


def has_view(con: ReadOnlyConnection, name: str) -> bool:
    """Whether the connection has a view or table called ``name``."""
    return bool(con.sql("select count(*) from duckdb_views() where view_name = ?",
                        params=[name]).fetchall()[0][0])


# ----------------------------------------------------------------------------- map
@dataclass(frozen=True)
class MapNode:
    """One node of a map with what its hover text and colour need.

    Attributes
    ----------
    node, row, col : int
    n_members : int
        Baxels (DESOM-1) or galaxies (DESOM-2) on the node.
    value : float or None
        The chosen quantity.
    medians : dict
        label -> median over the node's labelled members (DESOM-1).
    """

    node: int
    row: int
    col: int
    n_members: int
    value: float | None
    medians: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class MapData:
    """A map coloured by one quantity.

    Attributes
    ----------
    model : ModelInfo
        The map's model (DESOM-1, or the DESOM-2 of the DESOM-1 ``desom1_id``).
    desom1_id : str
    desom2_id : str or None
        The DESOM-2 built on this DESOM-1's fingerprints, if any.
    quantity : str
        ``occupancy``, ``median:<label>``, ``width:<label>`` or ``beyond_p99``.
    nodes : list of MapNode
    """

    model: ModelInfo
    desom1_id: str
    desom2_id: str | None
    quantity: str
    nodes: list[MapNode]


def quantities() -> list[tuple[str, str]]:
    """Return the quantities a DESOM-1 map can be coloured by: (key, description)."""
    out = [("occupancy", "baxels per node"),
           ("beyond_p99", "fraction of members beyond the model's p99 latent distance")]
    out += [(f"median:{lab}", f"median {unit}")
            for lab, unit in label_catalogue.ACCURACY_DISPLAY.items()]
    out += [(f"width:{lab}", f"p84 − p16 width of {unit}")
            for lab, unit in label_catalogue.ACCURACY_DISPLAY.items()]
    return out


def map_data(con: ReadOnlyConnection, model: ModelInfo, quantity: str,
             desom2: ModelInfo | None = None) -> MapData:
    """Read the DESOM-1 map (or, with ``desom2``, that DESOM-2 map) coloured by ``quantity``.

    Raises
    ------
    QueryError
        An unknown quantity (the message lists the known ones).
    """
    known = dict(quantities())
    if quantity not in known:
        raise QueryError(f"unknown colour {quantity!r}; choose from {', '.join(known)}")
    d2_id = desom2_id(con, model.model_id)
    if desom2 is not None:
        rows = con.sql("select desom2_node, desom2_row, desom2_col, count(*) from fingerprints "
                       "where model_id = ? and desom2_model_id = ? group by all",
                       params=[model.model_id, desom2.model_id]).fetchall()
        found = {r[0]: r for r in rows}
        nodes = [MapNode(k, k // desom2.cols, k % desom2.cols,
                         int(found[k][3]) if k in found else 0,
                         float(found[k][3]) if k in found else 0.0)
                 for k in range(desom2.rows * desom2.cols)]
        return MapData(desom2, model.model_id, d2_id, "occupancy", nodes)
    base = con.sql("select node, row, col, n_members from nodes where model_id = ? "
                   "order by node", params=[model.model_id]).fetchall()
    stats: dict[tuple[int, str], tuple[Any, ...]] = {}
    if has_view(con, "node_labels"):
        for node, label, median, p16, p84 in con.sql(
                "select node, label, median, p16, p84 from node_labels where model_id = ?",
                params=[model.model_id]).fetchall():
            stats[(node, label)] = (median, p16, p84)
    beyond = beyond_p99_fractions(con, model) if quantity == "beyond_p99" else {}
    nodes = []
    for node, row, col, n in base:
        medians = {lab: stats.get((node, lab), (None,))[0] for lab in LABELS}
        kind, _, label = quantity.partition(":")
        value: float | None
        if kind == "occupancy":
            value = float(n)
        elif kind == "beyond_p99":
            value = beyond.get(node)
        elif kind == "median":
            value = medians.get(label)
        else:
            s = stats.get((node, label))
            value = s[2] - s[1] if s and s[1] is not None and s[2] is not None else None
        nodes.append(MapNode(int(node), int(row), int(col), int(n or 0),
                             None if value is None else float(value), medians))
    return MapData(model, model.model_id, d2_id, quantity, nodes)


def beyond_p99_fractions(con: ReadOnlyConnection, model: ModelInfo) -> dict[int, float]:
    """Return, per occupied node, the fraction of its members beyond the model's p99 distance.

    Read from ``nodes.n_beyond_p99 / n_members`` (stored by ``desomdb assign``); nodes
    written before that column existed fall back to counting every assignment of the
    newest cubes, which reads every cube's assignment file (seconds at survey scale).

    Returns
    -------
    dict
        node -> fraction in [0, 1]; nodes without members (or a model without a p99) absent.
    """
    if "n_beyond_p99" in con.sql("select * from nodes limit 0").columns:
        stored = con.sql("select node, n_beyond_p99, n_members from nodes where model_id = ?",
                         params=[model.model_id]).fetchall()
        if model.distance_p99 is None or any(r[1] is not None for r in stored):
            return {int(node): beyond / n for node, beyond, n in stored
                    if beyond is not None and n}
    return {int(node): float(f) for node, f in con.sql(
        "select a.node, avg((a.distance > t.distance_p99)::double) from assignments a "
        "join latest_cubes using (release, plateifu) join model_thresholds t "
        "using (model_id) where a.model_id = ? group by a.node",
        params=[model.model_id]).fetchall() if f is not None}


def desom2_id(con: ReadOnlyConnection, model_id: str) -> str | None:
    """Return the DESOM-2 model built on ``model_id``'s fingerprints, or None."""
    if not has_view(con, "fingerprints"):
        return None
    found = con.sql("select any_value(desom2_model_id) from fingerprints where model_id = ?",
                    params=[model_id]).fetchall()
    return str(found[0][0]) if found and found[0][0] is not None else None


# ----------------------------------------------------------------------------- node
@dataclass(frozen=True)
class LabelPdf:
    """One ``node_labels`` row: a label's empirical PDF on a node.

    Attributes
    ----------
    label : str
    n : int
    median, p16, p84 : float or None
    histogram : ndarray, shape (n_bins,), float
        Counts between ``lo`` and ``hi`` in equal bins (edges fixed per label).
    lo, hi : float
    """

    label: str
    n: int
    median: float | None
    p16: float | None
    p84: float | None
    histogram: np.ndarray
    lo: float
    hi: float


@dataclass(frozen=True)
class NodeData:
    """A DESOM-1 node.

    Attributes
    ----------
    model : ModelInfo
    node, row, col, n_members : int
    decoded : ndarray, shape (4544,), float
        Decoded prototype (normalised flux).
    coadd : ndarray, shape (4544,), float
        Mean of members' normalised spectra; NaN where none.
    pdfs : list of LabelPdf
    members : polars.DataFrame
        ``mangaid, n_cubes, n_baxels`` (baxels on the node, newest cubes, summed over the
        galaxy's cubes), most first.
    neighbours : list of (row, col, n_members)
        The 4-neighbours on the grid (Manhattan distance 1).
    """

    model: ModelInfo
    node: int
    row: int
    col: int
    n_members: int
    decoded: np.ndarray
    coadd: np.ndarray
    pdfs: list[LabelPdf]
    members: pl.DataFrame
    neighbours: list[tuple[int, int, int]]


def node_data(con: ReadOnlyConnection, model: ModelInfo, row: int, col: int) -> NodeData:
    """Read one DESOM-1 node: spectra, label PDFs, member galaxies and grid neighbours.

    Raises
    ------
    NotFoundError
        If (row, col) is not on the model's map.
    """
    if not (0 <= row < model.rows and 0 <= col < model.cols):
        raise NotFoundError(f"node {row},{col} is not on the {model.rows}x{model.cols} map of "
                            f"{model.model_id}")
    node = row * model.cols + col
    found = con.sql("select n_members, decoded, coadd from nodes where model_id = ? and "
                    "node = ?", params=[model.model_id, node]).fetchall()
    if not found:
        raise NotFoundError(f"model {model.model_id} has no node {row},{col} in its nodes "
                            "table; run 'desomdb assign'")
    n, decoded, coadd = found[0]
    pdfs = node_pdfs(con, model.model_id, node)
    if has_view(con, "fingerprints"):
        # the galaxies' fingerprints count their baxels per node (newest cubes, summed over a
        # galaxy's cubes): one small file instead of every cube's assignments
        members = con.sql(  # one row per DESOM-2 built on the model: any_value
            "select mangaid, any_value(n_cubes) as n_cubes, any_value(counts[? + 1]) as "
            "n_baxels from fingerprints where model_id = ? and counts[? + 1] > 0 group by "
            f"mangaid order by n_baxels desc, mangaid limit {N_LISTED}",
            params=[node, model.model_id, node]).pl()
    else:
        members = con.sql(
            "select c.mangaid, count(distinct a.plateifu) as n_cubes, count(*) as n_baxels "
            "from assignments a join latest_cubes using (release, plateifu) join cubes c "
            "using (release, plateifu) where a.model_id = ? and a.node = ? group by all "
            f"order by n_baxels desc, c.mangaid limit {N_LISTED}",
            params=[model.model_id, node]).pl()
    around = [(row + dr, col + dc) for dr, dc in ((-1, 0), (0, -1), (0, 1), (1, 0))
              if 0 <= row + dr < model.rows and 0 <= col + dc < model.cols]
    sizes = dict(con.sql("select node, n_members from nodes where model_id = ? and node in "
                         f"({', '.join('?' * len(around))})",
                         params=[model.model_id, *(r * model.cols + c for r, c in around)]
                         ).fetchall()) if around else {}
    neighbours = [(r, c, int(sizes.get(r * model.cols + c, 0) or 0)) for r, c in around]
    return NodeData(model, node, row, col, int(n or 0), np.asarray(decoded, dtype=float),
                    np.asarray(coadd, dtype=float), pdfs, members, neighbours)


def node_pdfs(con: ReadOnlyConnection, model_id: str, node: int) -> list[LabelPdf]:
    """Return the label PDFs of one node, in :data:`LABELS` order."""
    if not has_view(con, "node_labels"):
        return []
    rows = con.sql("select label, n, median, p16, p84, histogram, hist_lo, hist_hi from "
                   "node_labels where model_id = ? and node = ?",
                   params=[model_id, node]).fetchall()
    by_label = {r[0]: r for r in rows}
    return [LabelPdf(lab, int(r[1] or 0), r[2], r[3], r[4],
                     np.asarray(r[5] or [], dtype=float), float(r[6]), float(r[7]))
            for lab in LABELS if (r := by_label.get(lab)) is not None and r[5] is not None]


# ----------------------------------------------------------------------------- sql
@dataclass(frozen=True)
class SqlResult:
    """A query's result as the SQL page shows it.

    Attributes
    ----------
    columns : list of str
    rows : list of tuple of str
        At most :data:`SQL_ROWS_SHOWN`, nested values summarised (``[4544 values]``).
    n_rows : int
        Rows in the whole result.
    """

    columns: list[str]
    rows: list[tuple[str, ...]]
    n_rows: int


def sql_result(df: pl.DataFrame) -> SqlResult:
    """Summarise a query result for an HTML table.

    ``df`` may be cut at ``SQL_ROWS_SHOWN + 1`` rows: then ``n_rows`` says there are more.
    """
    head = df.head(SQL_ROWS_SHOWN)
    rows = [tuple(_cell(v) for v in r) for r in head.iter_rows()]
    return SqlResult(list(df.columns), rows, df.height)


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, list | tuple | np.ndarray):
        return f"[{len(v)} values]"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def csv_text(df: pl.DataFrame, header: bool = True) -> str:
    """Return the result as CSV; nested columns (spectra, histograms) are left out."""
    flat = df.drop([c for c, t in df.schema.items() if t.is_nested()])
    return flat.write_csv(include_header=header)


# ----------------------------------------------------------------------------- display
@dataclass(frozen=True)
class Shown:
    """One column of a row as a page shows it.

    Attributes
    ----------
    name : str
    text : str
        The value with sensible precision: degrees to 5 decimals (0.02 arcsec), other
        floats to 4 significant digits, "–" for null or NaN.
    unit : str
        The column's unit from ``sql/schema.yml`` (astropy spelling), "" if none.
    description : str
        The column's description there.
    """

    name: str
    text: str
    unit: str
    description: str


def shown_row(view: str, row: dict[str, Any]) -> list[Shown]:
    """Format a row of ``view`` for a page, with each column's unit and description."""
    from desomdb.query import schema

    docs = schema.view_docs().get(view, {})
    out = []
    for name, value in row.items():
        doc = docs.get(name)
        unit = (doc.unit or "") if doc else ""
        out.append(Shown(name, shown_value(value, unit), unit, doc.description if doc else ""))
    return out


def shown_value(value: Any, unit: str = "") -> str:
    """One value as text: see :class:`Shown`."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        return f"{value:.5f}" if unit == "deg" else f"{value:.4g}"
    if isinstance(value, list | tuple | np.ndarray):
        return f"[{len(value)} values]"
    return str(value)


@dataclass(frozen=True)
class ViewDoc:
    """A public view (or table macro) as the SQL page lists it.

    Attributes
    ----------
    name, description : str
    columns : list of (name, unit, description)
    macro : bool
        A table macro (called with arguments, e.g. ``cone(ra, dec, radius)``), not a view.
    """

    name: str
    description: str
    columns: list[tuple[str, str, str]]
    macro: bool = False


def view_catalogue() -> list[ViewDoc]:
    """Every documented view and macro of ``sql/schema.yml``, in its order."""
    from desomdb.query import schema, views

    about = schema.view_descriptions()
    macros = views.macro_sql()
    return [ViewDoc(view, about[view], [(c, d.unit or "", d.description)
                                        for c, d in cols.items()], view in macros)
            for view, cols in schema.view_docs().items()]


#: The SQL page's examples: (what it answers, the query). Each runs on any archive that has
#: labels, a model and fingerprints (tests/web/test_serve.py runs them all).
SQL_EXAMPLES = (
    ("The nodes of the current model, most populated first",
     "select node, row, col, n_members from node_summary order by n_members desc"),
    ("Median light-weighted age and [M/H] per node",
     "select node, median(log_age_lw) as log_age_lw, median(mh_lw) as mh_lw, count(*) as n\n"
     "from baxel_labels group by node order by node"),
    ("One galaxy's baxels: node, radius and labels",
     "select plateifu, bin_id, node, radius_re, age_mw_gyr, mh_mw, ebv_star\n"
     "from baxel_labels where mangaid = (select min(mangaid) from galaxies) order by bin_id"),
    ("Galaxies within 2 degrees of the first galaxy (the cone() macro: RA, Dec in degrees, "
     "radius in arcsec)",
     "select plateifu, mangaid, sep_arcsec from cone(\n"
     "  (select arg_min(ra, plateifu) from galaxies),\n"
     "  (select arg_min(dec, plateifu) from galaxies), 7200)"),
    ("Star-forming baxels (BPT) and their sSFR",
     "select plateifu, bin_id, log_ssfr from preferred_labels\n"
     "where bpt_class = 'star_forming' and ssfr_ok order by log_ssfr desc limit 100"),
)


# ----------------------------------------------------------------------------- search
#: Radius of a position search without one (arcsec): about a MaNGA IFU's size.
CONE_ARCSEC = 60.0
#: Largest search radius accepted (arcsec).
MAX_CONE_ARCSEC = 36_000.0


@dataclass(frozen=True)
class SearchResult:
    """What the search box found.

    Attributes
    ----------
    query : str
    kind : str
        ``name`` (plateifu or mangaid, exact or by prefix) or ``cone`` (a position).
    rows : polars.DataFrame
        ``mangaid, plateifu, release, ra, dec`` (+ ``sep_arcsec`` for a cone) per matching
        cube, at most :data:`N_LISTED`.
    cone : tuple of (float, float, float) or None
        RA, Dec (deg) and radius (arcsec) searched.
    exact : tuple of (str, str) or None
        ``(mangaid, plateifu)`` when the text named one galaxy exactly (the page goes there;
        plateifu None when a mangaid was given).
    """

    query: str
    kind: str
    rows: pl.DataFrame
    cone: tuple[float, float, float] | None = None
    exact: tuple[str, str | None] | None = None


def search(con: ReadOnlyConnection, text: str) -> SearchResult:
    """Find galaxies by plateifu, mangaid (exact, else by prefix) or position.

    Parameters
    ----------
    text : str
        ``8485-1901``, ``1-209232``, a prefix of either, or ``RA DEC [RADIUS]``: RA and Dec
        in decimal degrees or sexagesimal (``09:00:00 +01:00:00``, read by astropy's
        SkyCoord), the radius in arcsec (default :data:`CONE_ARCSEC`), searched with the
        ``cone()`` macro.

    Raises
    ------
    QueryError
        For a position outside the sky or a radius out of range.
    """
    text = " ".join(text.split())
    position = parse_position(text)
    if position is not None:
        ra, dec, radius = position
        rows = con.sql("select mangaid, plateifu, release, ra, dec, sep_arcsec from "
                       f"cone(?, ?, ?) limit {N_LISTED}", params=[ra, dec, radius]).pl()
        return SearchResult(text, "cone", rows, cone=position)
    cols = "select distinct mangaid, plateifu, release, ra, dec from cubes where status = 'ok'"
    exact = con.sql(f"{cols} and (plateifu = ? or mangaid = ?) order by plateifu, release",
                    params=[text, text]).pl()
    if exact.height:
        hit = None
        if exact["mangaid"].n_unique() == 1:
            named = exact.filter(pl.col("plateifu") == text)
            hit = (str(exact["mangaid"][0]), str(named["plateifu"][0]) if named.height else None)
        return SearchResult(text, "name", exact, exact=hit)
    prefix = con.sql(f"{cols} and (starts_with(plateifu, ?) or starts_with(mangaid, ?)) "
                     f"order by plateifu, release limit {N_LISTED}", params=[text, text]).pl()
    return SearchResult(text, "name", prefix)


def parse_position(text: str) -> tuple[float, float, float] | None:
    """``RA DEC [RADIUS]`` -> (ra_deg, dec_deg, radius_arcsec); None if ``text`` is no position.

    Raises
    ------
    QueryError
        If it is a position but outside the sky, or its radius is out of range.
    """
    parts = text.replace(",", " ").split()
    if len(parts) not in (2, 3):
        return None
    try:
        ra, dec = float(parts[0]), float(parts[1])
    except ValueError:
        if not any(c in parts[0] for c in ":hms"):
            return None
        from astropy import units as u
        from astropy.coordinates import SkyCoord

        try:
            sky = SkyCoord(parts[0], parts[1], unit=(u.hourangle, u.deg))
        except ValueError:
            return None
        ra, dec = float(sky.ra.deg), float(sky.dec.deg)
    try:
        radius = float(parts[2]) if len(parts) == 3 else CONE_ARCSEC
    except ValueError:
        return None
    if not (0 <= ra < 360 and -90 <= dec <= 90):
        raise QueryError(f"position {text!r}: RA must be 0-360 and Dec -90-90 degrees")
    if not 0 < radius <= MAX_CONE_ARCSEC:
        raise QueryError(f"radius {radius:g} arcsec: choose one between 0 and "
                         f"{MAX_CONE_ARCSEC:g}")
    return ra, dec, radius
