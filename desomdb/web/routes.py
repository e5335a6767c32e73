"""The explorer's endpoints: each reads :mod:`desomdb.web.pages` and renders a template.

Endpoints are plain functions of the request; the app (:func:`desomdb.web.app.create_app`)
keeps its :class:`~desomdb.web.explorer.Explorer` and templates in ``app.state``.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast
from urllib.parse import quote, urlencode

import anyio
import duckdb
import numpy as np
import polars as pl
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.templating import Jinja2Templates

from desomdb.errors import DesomdbError, QueryError
from desomdb.products import figure_base
from desomdb.query import views
from desomdb.web import figures, galaxy_pages, pages
from desomdb.web.explorer import (
    Explorer,
    map_query,
    predict_bytes,
    reconstruct,
    redraw_fit,
    similar_baxels,
    similar_galaxies,
    stack_available,
    stack_file,
)
from desomdb.web.pages import ModelInfo, NotFoundError

T = TypeVar("T")

#: Wall-clock limit of one query on the SQL page or its CSV download (seconds).
SQL_SECONDS = 30.0
#: Rows a CSV download holds at most, and rows per streamed batch.
SQL_CSV_ROWS = 1_000_000
SQL_CSV_BATCH = 50_000

#: Largest spectra file accepted by the upload form.
MAX_UPLOAD_BYTES = 50 * 1024 * 1024



def explorer(request: Request) -> Explorer:
    """Return the :class:`Explorer` of the app serving ``request``."""
    return cast(Explorer, request.app.state.explorer)



def page(request: Request, template: str, status: int = 200, **context: Any) -> Response:
    """Render ``template`` with ``context`` (its title defaults to the template's name)."""
    context.setdefault("title", template.split(".")[0])
    templates = cast(Jinja2Templates, request.app.state.templates)
    return templates.TemplateResponse(request, template,
                                      {"root": str(explorer(request).root), **context},
                                      status_code=status)


def model_of(request: Request) -> str:
    """Return the model a URL names, or the current model."""
    return str(request.path_params.get("model_id") or explorer(request).current())


def node_of(request: Request) -> tuple[str, int, int, pages.NodeData]:
    """Return the model and node that ``/model/<id>/node/<row>,<col>`` names (404: unknown)."""
    ex = explorer(request)
    model_id = model_of(request)
    row, col = _row_col(request.path_params["rc"])
    with ex.connection(model_id) as (con, info):
        assert info is not None
        return model_id, row, col, pages.node_data(con, info, row, col)


def home(request: Request) -> Response:
    """``/``: redirect to the current model's map."""
    ex = explorer(request)
    return RedirectResponse(f"/model/{quote(ex.current())}/map")


def map_page(request: Request) -> Response:
    """``/model/<id>/map``: the map coloured by a quantity, or the DESOM-2 map."""
    ex = explorer(request)
    model_id = model_of(request)
    colour = request.query_params.get("colour", "occupancy")
    want_d2 = request.query_params.get("map") == "desom2"
    with ex.connection(model_id) as (con, info):
        assert info is not None
        data = map_query(con, info, colour, want_d2, ex)
    if data.model.kind == "desom2":
        cells = [figures.Cell(n.row, n.col, n.value, _sql_link(
            f"select mangaid, n_baxels, desom2_distance from fingerprints where model_id = "
            f"'{model_id}' and desom2_node = {n.node} order by desom2_distance"),
            f"DESOM-2 node {n.row},{n.col}: {n.n_members} galaxies", str(n.n_members))
            for n in data.nodes]
        label = "galaxies per DESOM-2 node"
    else:
        cells = [figures.Cell(n.row, n.col, n.value,
                              f"/model/{quote(model_id)}/node/{n.row},{n.col}",
                              _node_summary(n), str(n.n_members)) for n in data.nodes]
        label = dict(pages.quantities())[colour]
    svg = figures.grid_svg(cells, data.model.rows, data.model.cols, label)
    return page(request, "map.html", data=data, svg=svg, label=label,
                quantities=pages.quantities(), colour=colour, model_id=model_id)


def node_page(request: Request) -> Response:
    """``/model/<id>/node/<row>,<col>``: a node's spectra, label PDFs and members."""
    model_id, row, col, data = node_of(request)
    curves = [("co-add of members", data.coadd, "0.6"),
              ("decoded prototype", data.decoded, "k")]
    spectrum = figures.spectrum_figure(
        curves, f"node {row},{col} of {model_id}: {data.n_members} baxels")
    sparks = {q.label: figures.pdf_sparkline(_pdf(q)) for q in data.pdfs}
    return page(request, "node.html", data=data, spectrum=spectrum, sparks=sparks,
                min_n=figure_base.PDF_MIN_N,
                model_id=model_id, stack=stack_available(), title=f"node {row},{col}")


def node_download(request: Request) -> Response:
    """``.../coadd.csv|fits``: a node's decoded prototype and co-add as a file."""
    model_id, row, col, data = node_of(request)
    fmt = request.path_params["fmt"]
    body, media = _coadd_file(data, fmt)
    return _attachment(body, media, f"node-{row}-{col}-{model_id}.{fmt}")


def node_stack(request: Request) -> Response:
    """``.../stack.fits|parquet``: a node's members stacked (no fit) as a file."""
    ex = explorer(request)
    model_id, row, col, data = node_of(request)
    fmt = request.path_params["fmt"]
    return _attachment(stack_file(ex, model_id, data.node, fmt),
                       "application/fits" if fmt == "fits" else
                       "application/vnd.apache.parquet",
                       f"stack-node-{row}-{col}-{model_id}.{fmt}")


def galaxy_page(request: Request) -> Response:
    """``/galaxy/<mangaid>``: fingerprint, bin map, radial profile and nearest galaxies."""
    ex = explorer(request)
    model_id = model_of(request)
    mangaid = request.path_params["mangaid"]
    colour = request.query_params.get("colour", "node")
    if colour != "node" and colour not in pages.LABELS:
        raise QueryError(f"unknown colour {colour!r}; choose node or one of "
                         f"{', '.join(pages.LABELS)}")
    with ex.connection(model_id) as (con, info):
        assert info is not None
        data = galaxy_pages.galaxy_data(con, info, mangaid, request.query_params.get("plateifu"),
                                 ex.cube_parts(model_id))
    nearest, note = similar_galaxies(ex, model_id, mangaid)
    return page(request, "galaxy.html", data=data, model_id=model_id, colour=colour,
                labels=pages.LABELS, nearest=nearest, nearest_note=note,
                drpall=pages.shown_row("galaxies", data.drpall),
                **galaxy_figures(data, info, model_id, colour), title=f"galaxy {mangaid}")


def baxel_page(request: Request) -> Response:
    """``/baxel/<release>/<plateifu>/<bin>``: spectrum, reconstruction, labels, neighbours."""
    ex = explorer(request)
    model_id = model_of(request)
    p = request.path_params
    with ex.connection(model_id) as (con, info):
        assert info is not None
        data = galaxy_pages.baxel_data(con, info, p["release"], p["plateifu"], int(p["bin_id"]),
                                ex.cube_parts(model_id))
    recon = reconstruct(ex, model_id, data.x)
    good = np.isfinite(data.flux)
    residual = np.where(good, data.flux - recon, np.nan)
    spectrum = figures.spectrum_figure(
        [("spectrum", data.flux, "k"), ("DESOM reconstruction", recon,
                                         figure_base.NODE_COLOURS[0])],
        f"{data.release} {data.plateifu} bin {data.bin_id} (normalised)", residual)
    drawing = redraw_fit(ex, model_id, data)
    fit_figure, fit_rms = None, None
    if drawing is not None and drawing.model.stars is not None:
        m = drawing.model
        total = m.stars + m.gas
        fit_res = np.where(m.good, m.galaxy - total, np.nan)
        fit_figure = figures.spectrum_figure(
            [("spectrum (fitted bins)", m.galaxy, "k"),
             ("stellar continuum", m.stars, figure_base.NODE_COLOURS[0]),
             ("stars + emission lines", total, "#d62728")],
            f"{data.plateifu} bin {data.bin_id}: {drawing.fitter_id} fit (normalised)",
            fit_res)
        fit_rms = float(np.sqrt(np.nanmean(fit_res**2))) if m.good.any() else None
    sparks = {q.label: figures.pdf_sparkline(_pdf(q), data.labels.get(q.label))
              for q in data.pdfs}
    exact = request.query_params.get("exact") == "1"
    nearest, note = (similar_baxels(ex, model_id, data, exact) if data.is_latest else
                     (None, "similarity search covers the newest release of each cube"))
    p99 = info.distance_p99
    return page(request, "baxel.html", data=data, model_id=model_id, spectrum=spectrum,
                sparks=sparks, nearest=nearest, nearest_note=note, p99=p99, exact=exact,
                rms=float(np.sqrt(np.nanmean(residual**2))) if good.any() else None,
                fit_figure=fit_figure, fit_rms=fit_rms, drawing=drawing,
                shown=pages.shown_row("baxels", data.baxel),
                rc=lambda node: _rc(node, info.cols),
                title=f"baxel {data.plateifu}:{data.bin_id}")


def search_page(request: Request) -> Response:
    """``/search?q=``: a galaxy by plateifu or mangaid (goes to its page) or a position.

    One exact match goes straight to the galaxy's page; otherwise the matches are listed
    (prefix matches, or the galaxies within the cone).
    """
    ex = explorer(request)
    model_id = ex.current()
    text = request.query_params.get("q", "").strip()
    found = None
    if text:
        with ex.connection(model_id) as (con, _):
            found = pages.search(con, text)
        if found.exact is not None:
            mangaid, plateifu = found.exact
            url = f"/model/{quote(model_id)}/galaxy/{quote(mangaid)}"
            return RedirectResponse(url + (f"?{urlencode({'plateifu': plateifu})}"
                                           if plateifu else ""), status_code=303)
    return page(request, "search.html", query=text, found=found, model_id=model_id,
                radius=pages.CONE_ARCSEC, status=404 if found is not None and
                not found.rows.height else 200, title="search")


async def sql_page(request: Request) -> Response:
    """``/sql?q=``: a guarded query and its first :data:`~desomdb.web.pages.SQL_ROWS_SHOWN` rows.

    The query runs on its own connection (one slow query never blocks other clients), is
    stopped after :data:`SQL_SECONDS` or when the client goes away, and reads one row more
    than the page shows (so the page can say there are more).
    """
    query = request.query_params.get("q", "").strip()
    result, error = None, None
    if query:
        try:
            result = await _limited(request, lambda con: pages.sql_result(
                views.query(con, query).limit(pages.SQL_ROWS_SHOWN + 1).pl()))
        except QueryError as exc:
            error = " ".join(str(exc).split())
    return page(request, "sql.html", query=query, result=result, error=error,
                catalogue=pages.view_catalogue(), examples=pages.SQL_EXAMPLES,
                csv_link="/sql.csv?" + urlencode({"q": query}) if result else None,
                status=400 if error else 200, title="SQL", seconds=SQL_SECONDS,
                csv_rows=SQL_CSV_ROWS)


async def sql_csv(request: Request) -> Response:
    """``/sql.csv?q=``: a guarded query's rows as CSV, streamed in batches.

    At most :data:`SQL_CSV_ROWS` rows; stopped after :data:`SQL_SECONDS` or when the client
    goes away (``desomdb sql --format csv --output FILE`` has no limits).
    """
    query = request.query_params.get("q", "").strip()
    con = _own_connection(request)
    try:
        rel = views.query(con, query).limit(SQL_CSV_ROWS)
        reader = rel.to_arrow_reader(batch_size=SQL_CSV_BATCH)
    except BaseException:
        con.close()
        raise
    timer = threading.Timer(SQL_SECONDS, con.interrupt)
    timer.start()

    def chunks() -> Iterator[bytes]:
        try:
            first = True
            for batch in reader:
                df = pl.from_arrow(batch)
                assert isinstance(df, pl.DataFrame)
                yield pages.csv_text(df, header=first).encode()
                first = False
            if first:  # no rows: still the header
                empty = pl.from_arrow(reader.schema.empty_table())
                assert isinstance(empty, pl.DataFrame)
                yield pages.csv_text(empty).encode()
        except duckdb.InterruptException:
            yield f"# stopped after {SQL_SECONDS:.0f} s (the explorer's limit)\n".encode()
        finally:  # also when the client leaves: the generator is closed
            timer.cancel()
            con.interrupt()
            con.close()

    return StreamingResponse(chunks(), media_type="text/csv", headers={
        "content-disposition": 'attachment; filename="desomdb-query.csv"'})


def _own_connection(request: Request) -> views.ReadOnlyConnection:
    con = views.connect(explorer(request).root)
    assert isinstance(con, views.ReadOnlyConnection)
    return con


async def _limited(request: Request, work: Callable[[views.ReadOnlyConnection], T]) -> T:
    """Run ``work`` on a fresh guarded connection in a thread, within :data:`SQL_SECONDS`.

    The query is interrupted when the time is up or the client disconnects.
    """
    con = await anyio.to_thread.run_sync(_own_connection, request)
    timer = threading.Timer(SQL_SECONDS, con.interrupt)
    timer.start()
    done = anyio.Event()

    async def watch() -> None:
        while not done.is_set():
            if await request.is_disconnected():
                con.interrupt()
                return
            with anyio.move_on_after(0.5):
                await done.wait()

    def capture(c: views.ReadOnlyConnection) -> tuple[T | None, BaseException | None]:
        try:  # the error leaves the task group as itself, not in an exception group
            return work(c), None
        except Exception as exc:
            return None, exc

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            try:
                result, error = await anyio.to_thread.run_sync(capture, con)
            finally:
                done.set()
        if error is not None:
            raise error
        return cast(T, result)
    except duckdb.InterruptException:
        raise QueryError(f"the query was stopped after {SQL_SECONDS:.0f} s (the explorer's "
                         "limit); run it with 'desomdb sql', which has none") from None
    finally:
        timer.cancel()
        con.close()


async def predict_page(request: Request) -> Response:
    """``/predict``: nodes and label PDFs of an uploaded spectra file (kept in memory)."""
    ex = explorer(request)
    results, error, name = None, None, None
    if request.method == "POST":
        async with request.form(max_files=1, max_part_size=MAX_UPLOAD_BYTES) as form:
            upload = form.get("spectra")
            if upload is None or isinstance(upload, str) or not upload.filename:
                error = "choose a spectra FITS file to upload"
            else:
                name = upload.filename
                body = await upload.read()
        if error is None:
            try:
                model_id = ex.current()
                results = predict_bytes(ex, body, model_id)
            except DesomdbError as exc:
                error = f"{name}: {' '.join(str(exc).split())}"
    return page(request, "predict.html", results=results, error=error, name=name,
                status=400 if error else 200, title="predict")



async def not_found(request: Request, exc: Exception) -> Response:
    """Render an HTTP error (404 for an unknown URL) as the error page."""
    status = getattr(exc, "status_code", 404)
    detail = getattr(exc, "detail", None) or str(exc)
    return page(request, "error.html", status=status, message=" ".join(
        str(detail).split()), title=f"{status}")

async def bad_request(request: Request, exc: Exception) -> Response:
    """Render an error desomdb raised on purpose: 404 for an unknown item, else 400."""
    code = 404 if isinstance(exc, NotFoundError) else 400
    return page(request, "error.html", status=code, message=" ".join(str(exc).split()),
                title=str(code))

async def server_error(request: Request, exc: Exception) -> Response:
    """Render any other error in one line, as the CLI prints it (500)."""
    # not raised on purpose (a damaged file, a bug): one line, as the CLI prints it
    text = " ".join(str(exc).split())[:400] or type(exc).__name__
    return page(request, "error.html", status=500, title="500", message=(
        f"{text} ({type(exc).__name__}); if the archive is involved, run 'desomdb check "
        f"{explorer(request).root}'"))



def galaxy_figures(data: galaxy_pages.GalaxyData, info: ModelInfo, model_id: str, colour: str
                   ) -> dict[str, Any]:
    """Draw a galaxy page's pictures: fingerprint grid, bin map and radial profiles."""
    fp = {int(r["node"]): r for r in data.fingerprint.iter_rows(named=True)}
    cells = [figures.Cell(r, c, float(fp[r * info.cols + c]["n_baxels"])
                          if r * info.cols + c in fp else None,
                          f"/model/{quote(model_id)}/node/{r},{c}",
                          f"node {r},{c}: {fp[r * info.cols + c]['n_baxels']} baxels"
                          if r * info.cols + c in fp else f"node {r},{c}: none",
                          str(fp[r * info.cols + c]["n_baxels"]) if r * info.cols + c in fp
                          else "")
             for r in range(info.rows) for c in range(info.cols)]
    fingerprint = figures.grid_svg(cells, info.rows, info.cols, "baxels of the galaxy",
                                   cmap="viridis")
    bins = data.bins
    node_of = {int(b): int(n) for b, n in zip(bins["bin_id"], bins["node"], strict=True)
               if n is not None}
    scale = None
    if colour == "node":
        colours = figures.node_colours(node_of, info.rows, info.cols)
    else:
        values = {int(b): float(v) if v is not None else np.nan
                  for b, v in zip(bins["bin_id"], bins[colour], strict=True)}
        colours, scale = figures.value_colours(values)
    titles = {}
    for r in bins.iter_rows(named=True):
        node = r["node"]
        where = f"node {_rc(node, info.cols)}" if node is not None else "no node"
        extra = "" if colour == "node" else f", {colour} {_num(r.get(colour))}"
        titles[int(r["bin_id"])] = (f"bin {r['bin_id']}: {where}, R/R_e "
                                    f"{_num(r['radius_re'])}, S/N {_num(r['snr'])}{extra}")
    hrefs = {int(b): f"/model/{quote(model_id)}/baxel/{quote(data.release)}/"
                     f"{quote(data.plateifu)}/{int(b)}" for b in bins["bin_id"]}
    binmap = figures.binmap_svg(data.bin_map, colours, titles, hrefs, x_right=data.x_right)
    composite = figures.composite_rgb(data.images)
    image = (figures.image_svg(composite, data.covered, x_right=data.x_right)
             if composite is not None and composite.shape[:2] == data.covered.shape else None)
    radial = None
    profile = colour if colour in pages.LABELS else "age_mw_gyr"  # not the node number
    if profile in bins.columns and bins.height:
        radial = figures.radial_figure(
            bins["radius_re"].cast(float).fill_null(np.nan).to_numpy(),
            bins[profile].cast(float).fill_null(np.nan).to_numpy(), profile,
            f"{data.plateifu}: {profile} against radius (black: median in radial bins)")
    key = None
    if colour == "node":  # the colour key: each map position in the bin map's colours
        rgb = figures.node_colours({k: k for k in range(info.rows * info.cols)}, info.rows,
                                   info.cols)
        key = figures.grid_svg([figures.Cell(k // info.cols, k % info.cols, None,
                                             f"/model/{quote(model_id)}/node/"
                                             f"{_rc(k, info.cols)}",
                                             f"node {_rc(k, info.cols)}",
                                             fill=rgb[k]) for k in rgb],
                               info.rows, info.cols, "map position", bar=False)
    return {"fingerprint": fingerprint, "binmap": binmap, "radial": radial, "scale": scale,
            "key": key, "image": image}


def _num(v: Any) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.3g}"


def _rc(node: Any, cols: int) -> str:
    """Name a node as everywhere in the explorer: ``row,col`` (its number in the hover)."""
    if node is None:
        return "–"
    return f"{int(node) // cols},{int(node) % cols}"


def _node_summary(n: pages.MapNode) -> str:
    parts = [f"node {n.row},{n.col}: {n.n_members} baxels"]
    if n.value is not None:
        parts.append(f"value {n.value:.3g}")
    parts += [f"{lab} {v:.3g}" for lab, v in n.medians.items() if v is not None]
    return "; ".join(parts)


def _attachment(body: str | bytes, media_type: str, filename: str) -> Response:
    """Return a download response: ``body``, saved by the browser as ``filename``."""
    return Response(body, media_type=media_type,
                    headers={"content-disposition": f'attachment; filename="{filename}"'})


def _row_col(text: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in text.split(","))
    except ValueError:
        raise NotFoundError(f"node {text!r}: expected ROW,COL, e.g. /node/2,3") from None
    return r, c


def _sql_link(query: str) -> str:
    return "/sql?" + urlencode({"q": query})


def _pdf(p: pages.LabelPdf) -> figures.Pdf:
    return figures.Pdf(p.label, p.n, p.median, p.histogram, p.lo, p.hi)


def _coadd_file(data: pages.NodeData, fmt: str) -> tuple[bytes, str]:
    """Write the node's decoded prototype and co-add as CSV or a FITS table (bytes, type)."""
    from desomdb.science import spectra

    wave = spectra.rest_wave_aa()
    if fmt == "csv":
        lines = ["wave_rest_aa,decoded,coadd"] + [
            f"{w:.3f},{d:.6g},{c:.6g}" for w, d, c in zip(wave, data.decoded, data.coadd,
                                                          strict=True)]
        return ("\n".join(lines) + "\n").encode(), "text/csv"
    if fmt == "fits":
        from astropy.io import fits

        hdu = fits.BinTableHDU.from_columns([
            fits.Column("WAVE_REST_AA", "D", array=wave, unit="Angstrom"),
            fits.Column("DECODED", "E", array=data.decoded),
            fits.Column("COADD", "E", array=data.coadd)], name="NODE")
        hdu.header["MODEL_ID"] = data.model.model_id
        hdu.header["NODE"] = data.node
        hdu.header["N_MEMBER"] = data.n_members
        buf = io.BytesIO()
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buf)
        return buf.getvalue(), "application/fits"
    raise NotFoundError(f"no download format {fmt!r}; use coadd.csv or coadd.fits")
