"""The explorer's routes: Starlette endpoints that read :mod:`desomdb.web.pages` and render.

URLs name the model, so a link keeps showing what it showed::

    /                                         -> the current model's map
    /model/<id>/map?colour=<quantity>[&map=desom2]
    /model/<id>/node/<row>,<col>              (+ /coadd.csv, /coadd.fits)
    /galaxy/<mangaid>[?plateifu=&colour=]     (current model; /model/<id>/galaxy/... too)
    /baxel/<release>/<plateifu>/<bin>         (current model; /model/<id>/baxel/... too)
    /sql?q=<select ...>                       (+ /sql.csv?q=...)
    /predict                                  (POST a spectra FITS: predict in memory)

Every query runs on a guarded, sandboxed connection from :func:`desomdb.query.views.connect`
(the same guard as ``desomdb sql``). Connections are opened per (model, archive generation):
when a writer commits, the next request sees the new files.
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from desomdb.archive.store import Archive
from desomdb.errors import DesomdbError, QueryError
from desomdb.products import figure_base
from desomdb.query import views
from desomdb.som.registry import current_model
from desomdb.web import figures, pages
from desomdb.web.pages import ModelInfo, NotFoundError

#: Largest spectra file accepted by the upload form.
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
#: Neighbours listed by the similarity searches on the galaxy and baxel pages.
K_SIMILAR = 8


@dataclass
class _Session:
    con: views.ReadOnlyConnection
    lock: threading.Lock
    models: dict[str, ModelInfo]


class Explorer:
    """The archive behind the app: guarded connections per model and loaded networks.

    Parameters
    ----------
    archive : str or Path
        The archive folder (read only; nothing is written to it).
    """

    def __init__(self, archive: str | Path, cache_pages: int = 64):
        self.arch = Archive(archive)
        self.root = self.arch.root
        self._sessions: dict[tuple[str | None, int], _Session] = {}
        self._networks: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._pages: OrderedDict[tuple[Any, ...], Response] = OrderedDict()
        self._index: dict[tuple[int, str, str], tuple[tuple[Any, Any] | None, str | None]] = {}
        self.search_lock = threading.Lock()
        self._parts: dict[tuple[int, str, str], pages.CubeParts] = {}
        self._vectors: dict[tuple[int, str, str], tuple[dict[str, str], Any, np.ndarray]] = {}
        self._files: dict[tuple[int, str, str], dict[str, str]] = {}
        self.cache_pages = cache_pages

    def cached(self, endpoint: Callable[[Request], Response]) -> Callable[[Request], Response]:
        """Wrap a page endpoint so a page is drawn once per archive state.

        Committed data never changes in place, so a page is the same for as long as the
        manifest generation and the current model are: the key holds both, and a commit or
        ``desomdb model use`` makes every page new. Only successful pages are kept (the
        last ``cache_pages`` of them); ``cache_pages=0`` draws every request afresh.
        """
        @functools.wraps(endpoint)
        def wrapper(request: Request) -> Response:
            key = (self.arch.generation(), current_model(self.arch), request.url.path,
                   request.url.query)
            with self._lock:
                hit = self._pages.get(key)
                if hit is not None:
                    self._pages.move_to_end(key)
                    return hit
            response = endpoint(request)
            if self.cache_pages and response.status_code == 200:
                with self._lock:
                    self._pages[key] = response
                    while len(self._pages) > self.cache_pages:
                        self._pages.popitem(last=False)
            return response

        return wrapper

    def current(self) -> str:
        """Return the current DESOM-1 model id (404 if the archive has none)."""
        model_id = current_model(self.arch)
        if model_id is None:
            raise NotFoundError(f"{self.root}: no current model; train one ('desomdb train') "
                                "and make it current ('desomdb model use ID')")
        return model_id

    def _session(self, model_id: str | None) -> _Session:
        key = (model_id, self.arch.generation())
        with self._lock:
            if key not in self._sessions:
                # a model the archive does not know is checked below, not by connect()
                con = views.connect(self.root)
                assert isinstance(con, views.ReadOnlyConnection)
                known = pages.models(con)
                if model_id is not None and model_id in known:
                    views.use_model(con, model_id)
                self._sessions = {k: v for k, v in self._sessions.items() if k[1] == key[1]}
                self._sessions[key] = _Session(con, threading.Lock(), known)
            return self._sessions[key]

    @contextmanager
    def connection(self, model_id: str | None = None
                   ) -> Iterator[tuple[views.ReadOnlyConnection, ModelInfo | None]]:
        """Yield the guarded connection whose ``current_model()`` is ``model_id``, and its model.

        Raises
        ------
        NotFoundError
            If ``model_id`` is not a registered model.
        """
        s = self._session(model_id)
        info = None
        if model_id is not None:
            info = s.models.get(model_id)
            if info is None:
                raise NotFoundError(f"no model {model_id!r} in {self.root}; registered: "
                                    f"{', '.join(sorted(s.models)) or 'none'}")
        with s.lock:
            yield s.con, info

    def cube_parts(self, model_id: str) -> pages.CubeParts:
        """Return the per-cube part files of spectra, labels and the model's assignments.

        Listed once per archive generation (from the manifest; file names parsed by
        :mod:`desomdb.archive.paths`).
        """
        from desomdb.archive import paths
        from desomdb.pipeline import similar_index as sx

        key = (self.arch.generation(), model_id, "parts")
        with self._lock:
            if key not in self._parts:
                state = self.arch.manifest()  # one reading: generation and files of a commit
                key = (state["generation"], model_id, "parts")
                files: dict[str, dict[tuple[str, str], list[str]]] = {}
                for table in ("spectra", "labels"):
                    for rel in state["tables"].get(table, []):
                        part = paths.parse_part_name(rel.rsplit("/", 1)[-1])
                        if part is not None:
                            release = paths.parse_partition(rel)[2]
                            files.setdefault(table, {}).setdefault(
                                (release, part[0]), []).append(str(self.root / rel))
                prefix = paths.partition_dir("assignments", "model_id", model_id) + "/"
                for rel in state["tables"].get("assignments", []):
                    cube = sx.cube_of(rel) if rel.startswith(prefix) else None
                    if cube is not None:
                        files.setdefault("assignments", {}).setdefault(cube, []).append(
                            str(self.root / rel))
                self._parts = {k: v for k, v in self._parts.items() if k[0] == key[0]}
                self._parts[key] = pages.CubeParts(files)
            return self._parts[key]

    def galaxy_vectors(self, model_id: str) -> tuple[dict[str, str], Any, np.ndarray]:
        """Return the model's fingerprint files and galaxy vectors (for nearest galaxies).

        Read once per archive generation (:func:`desomdb.pipeline.similar_index.fingerprint_files`
        and :func:`~desomdb.pipeline.similar_index.galaxy_vectors`); no files gives empty vectors.
        """
        from desomdb.pipeline import similar_index as sx

        key = (self.arch.generation(), model_id, "galaxy_vectors")
        with self._lock:
            if key not in self._vectors:
                files = sx.fingerprint_files(self.arch, model_id)
                rows, vectors = (sx.galaxy_vectors(self.arch, model_id) if files
                                 else (None, np.zeros((0, 0), np.float32)))
                self._vectors = {k: v for k, v in self._vectors.items() if k[0] == key[0]}
                self._vectors[key] = (files, rows, vectors)
            return self._vectors[key]

    def latest_assignment_files(self, model_id: str) -> dict[str, str]:
        """Return the model's assignment files of the newest cubes -> sha256 (search input).

        Listed once per archive generation
        (:func:`desomdb.pipeline.similar_index.latest_assignment_files`).
        """
        from desomdb.pipeline import similar_index as sx

        key = (self.arch.generation(), model_id, "latest_assignment_files")
        with self._lock:
            if key not in self._files:
                self._files = {k: v for k, v in self._files.items() if k[0] == key[0]}
                self._files[key] = sx.latest_assignment_files(self.arch, model_id)
            return self._files[key]

    def baxel_index(self, model_id: str) -> tuple[tuple[Any, Any] | None, str | None]:
        """Return the model's opened baxel HNSW index and its keys, or None and why not.

        Opened once per archive generation (by :mod:`desomdb.products.similar`, which checks
        that the index matches the newest cubes' assignment files); searches share it under a lock.
        """
        from desomdb.pipeline import similar_index as sx
        from desomdb.products import similar

        files = self.latest_assignment_files(model_id)
        key = (self.arch.generation(), model_id, "baxels")
        with self._lock:
            if key not in self._index:
                self._index = {k: v for k, v in self._index.items() if k[0] == key[0]}
                self._index[key] = similar.open_index(self.arch, model_id, "baxels",
                                                 sx.source_digest("baxels", files))
            return self._index[key]

    def network(self, model_id: str) -> Any:
        """Return the loaded DESOM network of ``model_id`` (kept for later requests)."""
        with self._lock:
            if model_id not in self._networks:
                from desomdb.som.registry import load_model

                self._networks[model_id] = load_model(self.arch, model_id)[0]
            return self._networks[model_id]


def _templates() -> Jinja2Templates:
    folder = resources.files("desomdb.web").joinpath("templates")
    return Jinja2Templates(directory=str(folder))


def create_app(archive: str | Path, allowed_hosts: list[str] | None = None,
               cache_pages: int = 64) -> Starlette:
    """Build the explorer app for ``archive`` (an ASGI app; run it with uvicorn).

    Parameters
    ----------
    archive : str or Path
    allowed_hosts : list of str, optional
        Host headers accepted (default: 127.0.0.1, localhost and the test client's
        ``testserver``); others get 400, which keeps a web page elsewhere from reaching the
        explorer through a rebound DNS name.
    cache_pages : int
        Drawn pages kept per archive state (:meth:`Explorer.cached`); 0 keeps none.

    Returns
    -------
    starlette.applications.Starlette
    """
    ex = Explorer(archive, cache_pages)
    templates = _templates()

    def page(request: Request, template: str, status: int = 200, **context: Any) -> Response:
        context.setdefault("title", template.split(".")[0])
        return templates.TemplateResponse(request, template, {"root": str(ex.root), **context},
                                          status_code=status)

    def model_of(request: Request) -> str:
        return str(request.path_params.get("model_id") or ex.current())

    def node_of(request: Request) -> tuple[str, int, int, pages.NodeData]:
        """Return the model and node that ``/model/<id>/node/<row>,<col>`` names (404: unknown)."""
        model_id = model_of(request)
        row, col = _row_col(request.path_params["rc"])
        with ex.connection(model_id) as (con, info):
            assert info is not None
            return model_id, row, col, pages.node_data(con, info, row, col)

    def home(request: Request) -> Response:
        return RedirectResponse(f"/model/{quote(ex.current())}/map")

    def map_page(request: Request) -> Response:
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
        model_id, row, col, data = node_of(request)
        curves = [("co-add of members", data.coadd, "0.6"),
                  ("decoded prototype", data.decoded, "k")]
        spectrum = figures.spectrum_figure(
            curves, f"node {row},{col} of {model_id}: {data.n_members} baxels")
        sparks = {q.label: figures.pdf_sparkline(_pdf(q)) for q in data.pdfs}
        return page(request, "node.html", data=data, spectrum=spectrum, sparks=sparks,
                    min_n=figure_base.PDF_MIN_N,
                    model_id=model_id, stack=_stack_available(), title=f"node {row},{col}")

    def node_download(request: Request) -> Response:
        model_id, row, col, data = node_of(request)
        fmt = request.path_params["fmt"]
        body, media = _coadd_file(data, fmt)
        return _attachment(body, media, f"node-{row}-{col}-{model_id}.{fmt}")

    def node_stack(request: Request) -> Response:
        model_id, row, col, data = node_of(request)
        fmt = request.path_params["fmt"]
        return _attachment(_stack_file(ex, model_id, data.node, fmt),
                           "application/fits" if fmt == "fits" else
                           "application/vnd.apache.parquet",
                           f"stack-node-{row}-{col}-{model_id}.{fmt}")

    def galaxy_page(request: Request) -> Response:
        model_id = model_of(request)
        mangaid = request.path_params["mangaid"]
        colour = request.query_params.get("colour", "node")
        if colour != "node" and colour not in pages.LABELS:
            raise QueryError(f"unknown colour {colour!r}; choose node or one of "
                             f"{', '.join(pages.LABELS)}")
        with ex.connection(model_id) as (con, info):
            assert info is not None
            data = pages.galaxy_data(con, info, mangaid, request.query_params.get("plateifu"),
                                     ex.cube_parts(model_id))
        nearest, note = _similar_galaxies(ex, model_id, mangaid)
        return page(request, "galaxy.html", data=data, model_id=model_id, colour=colour,
                    labels=pages.LABELS, nearest=nearest, nearest_note=note,
                    **galaxy_figures(data, info, model_id, colour), title=f"galaxy {mangaid}")

    def baxel_page(request: Request) -> Response:
        model_id = model_of(request)
        p = request.path_params
        with ex.connection(model_id) as (con, info):
            assert info is not None
            data = pages.baxel_data(con, info, p["release"], p["plateifu"], int(p["bin_id"]),
                                    ex.cube_parts(model_id))
        recon = _reconstruct(ex, model_id, data.x)
        good = np.isfinite(data.flux)
        residual = np.where(good, data.flux - recon, np.nan)
        spectrum = figures.spectrum_figure(
            [("spectrum", data.flux, "k"), ("DESOM reconstruction", recon,
                                             figure_base.NODE_COLOURS[0])],
            f"{data.release} {data.plateifu} bin {data.bin_id} (normalised)", residual)
        sparks = {q.label: figures.pdf_sparkline(_pdf(q), data.labels.get(q.label))
                  for q in data.pdfs}
        exact = request.query_params.get("exact") == "1"
        nearest, note = (_similar_baxels(ex, model_id, data, exact) if data.is_latest else
                         (None, "similarity search covers the newest release of each cube"))
        p99 = info.distance_p99
        return page(request, "baxel.html", data=data, model_id=model_id, spectrum=spectrum,
                    sparks=sparks, nearest=nearest, nearest_note=note, p99=p99, exact=exact,
                    rms=float(np.sqrt(np.nanmean(residual**2))) if good.any() else None,
                    title=f"baxel {data.plateifu}:{data.bin_id}")

    def sql_page(request: Request) -> Response:
        query = request.query_params.get("q", "").strip()
        result, error = None, None
        if query:
            try:
                with ex.connection() as (con, _):
                    result = pages.sql_result(views.query(con, query).pl())
            except QueryError as exc:
                error = " ".join(str(exc).split())
        return page(request, "sql.html", query=query, result=result, error=error,
                    csv_link="/sql.csv?" + urlencode({"q": query}) if result else None,
                    status=400 if error else 200, title="SQL")

    def sql_csv(request: Request) -> Response:
        query = request.query_params.get("q", "").strip()
        with ex.connection() as (con, _):
            df = views.query(con, query).pl()
        return _attachment(pages.csv_text(df), "text/csv", "desomdb-query.csv")

    async def predict_page(request: Request) -> Response:
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
                    results = _predict_bytes(ex, body, model_id)
                except DesomdbError as exc:
                    error = f"{name}: {' '.join(str(exc).split())}"
        return page(request, "predict.html", results=results, error=error, name=name,
                    status=400 if error else 200, title="predict")

    routes = [
        Route("/", home),
        Route("/map", ex.cached(map_page)),
        Route("/model/{model_id}/map", ex.cached(map_page)),
        Route("/model/{model_id}/node/{rc}", ex.cached(node_page)),
        Route("/model/{model_id}/node/{rc}/coadd.{fmt:str}", node_download),
        Route("/model/{model_id}/node/{rc}/stack.{fmt:str}", node_stack),
        Route("/galaxy/{mangaid}", ex.cached(galaxy_page)),
        Route("/model/{model_id}/galaxy/{mangaid}", ex.cached(galaxy_page)),
        Route("/baxel/{release}/{plateifu}/{bin_id:int}", ex.cached(baxel_page)),
        Route("/model/{model_id}/baxel/{release}/{plateifu}/{bin_id:int}",
              ex.cached(baxel_page)),
        Route("/sql", sql_page),
        Route("/sql.csv", sql_csv),
        Route("/predict", predict_page, methods=["GET", "POST"]),
        Mount("/static", StaticFiles(directory=str(resources.files("desomdb.web")
                                                   .joinpath("static"))), name="static"),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        detail = getattr(exc, "detail", None) or str(exc)
        return page(request, "error.html", status=status, message=" ".join(
            str(detail).split()), title=f"{status}")

    async def bad_request(request: Request, exc: Exception) -> Response:
        code = 404 if isinstance(exc, NotFoundError) else 400
        return page(request, "error.html", status=code, message=" ".join(str(exc).split()),
                    title=str(code))

    async def server_error(request: Request, exc: Exception) -> Response:
        # not raised on purpose (a damaged file, a bug): one line, as the CLI prints it
        text = " ".join(str(exc).split())[:400] or type(exc).__name__
        return page(request, "error.html", status=500, title="500", message=(
            f"{text} ({type(exc).__name__}); if the archive is involved, run 'desomdb check "
            f"{ex.root}'"))

    hosts = allowed_hosts or ["127.0.0.1", "localhost", "testserver"]
    return Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware,
                                                           allowed_hosts=hosts)],
                     exception_handlers={HTTPException: not_found, DesomdbError: bad_request,
                                         Exception: server_error})


def map_query(con: views.ReadOnlyConnection, info: ModelInfo, colour: str, want_d2: bool,
              ex: Explorer) -> pages.MapData:
    """Read the map a request asks for (the DESOM-2 map of ``info`` when ``want_d2``)."""
    if not want_d2:
        return pages.map_data(con, info, colour)
    d2_id = pages._desom2_id(con, info.model_id)
    d2 = ex._session(info.model_id).models.get(d2_id) if d2_id else None
    if d2 is None:
        raise NotFoundError(f"model {info.model_id} has no DESOM-2 yet; build it with "
                            "'desomdb fingerprints'")
    return pages.map_data(con, info, "occupancy", desom2=d2)


def galaxy_figures(data: pages.GalaxyData, info: ModelInfo, model_id: str, colour: str
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
        where = f"node {node // info.cols},{node % info.cols}" if node is not None else "no node"
        extra = "" if colour == "node" else f", {colour} {_num(r.get(colour))}"
        titles[int(r["bin_id"])] = (f"bin {r['bin_id']}: {where}, R/R_e "
                                    f"{_num(r['radius_re'])}, S/N {_num(r['snr'])}{extra}")
    hrefs = {int(b): f"/model/{quote(model_id)}/baxel/{quote(data.release)}/"
                     f"{quote(data.plateifu)}/{int(b)}" for b in bins["bin_id"]}
    binmap = figures.binmap_svg(data.bin_map, colours, titles, hrefs)
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
                                             f"/model/{quote(model_id)}/node/{k // info.cols},"
                                             f"{k % info.cols}",
                                             f"node {k // info.cols},{k % info.cols}",
                                             fill=rgb[k]) for k in rgb],
                               info.rows, info.cols, "map position", bar=False)
    return {"fingerprint": fingerprint, "binmap": binmap, "radial": radial, "scale": scale,
            "key": key}


def _num(v: Any) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.3g}"


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


def _stack_available() -> bool:
    try:
        import desomdb.products.stack  # noqa: F401
    except ImportError:
        return False
    return True


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


def _stack_file(ex: Explorer, model_id: str, node: int, fmt: str) -> bytes:
    """Stack a node's members with :mod:`desomdb.products.stack` (no fit) and return the file bytes.

    The file is written by :func:`desomdb.products.stack_output.write` (units, provenance,
    WAVE extension) into a temporary folder outside the archive and read back.
    """
    if fmt not in ("fits", "parquet"):
        raise NotFoundError(f"no stack format {fmt!r}; use stack.fits or stack.parquet")
    if not _stack_available():
        raise NotFoundError("this installation has no desomdb.products.stack; download coadd.fits")
    from desomdb.products import stack, stack_output

    result = stack.stack(ex.root, where=f"node = {int(node)}", by="none", model_id=model_id,
                         fit=False)
    with tempfile.TemporaryDirectory(prefix="desomdb-stack-") as tmp:
        out = stack_output.write(result, ex.root, Path(tmp) / f"stack.{fmt}")
        return out.read_bytes()


#: One spectrum through the network at a time, on one thread (see :func:`_reconstruct`).
_ONE_THREAD = threading.Lock()


def _reconstruct(ex: Explorer, model_id: str, x: np.ndarray) -> np.ndarray:
    """Decode the encoding of one normalised spectrum ``x`` (4544,) with the model.

    Runs with one intra-op thread: for a single spectrum, torch's thread pool only waits on
    its other threads, which on a busy 2-core machine took ~120 ms instead of ~3 ms.
    """
    import torch

    from desomdb.som.inference import encode_all

    net = ex.network(model_id)
    with _ONE_THREAD:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            z = encode_all(net, x[None, :].astype(np.float32))
            with torch.no_grad():
                return net.decode(torch.from_numpy(z)).numpy()[0].astype(float)
        finally:
            torch.set_num_threads(threads)


def _similar_galaxies(ex: Explorer, model_id: str, mangaid: str) -> tuple[Any, str | None]:
    """Nearest galaxies by Hellinger distance, as :func:`desomdb.products.similar.similar_galaxies`.

    The fingerprint vectors come from :meth:`Explorer.galaxy_vectors` (read once per archive
    generation: at 10,000 galaxies, listing and reading them took ~200 ms of every page).
    """
    from desomdb.products import similar

    files, rows_all, vectors = ex.galaxy_vectors(model_id)
    if not files:
        return None, (f"model {model_id} has no fingerprints; build them with "
                      f"'desomdb fingerprints {ex.root}'")
    hit = np.flatnonzero(rows_all["mangaid"].to_numpy() == mangaid)
    if hit.size == 0:
        return None, (f"no fingerprint of galaxy {mangaid} under model {model_id} "
                      f"('desomdb fingerprints {ex.root}' adds it)")
    try:
        rows, dist, _, _, note = similar.nearest(  # the index if current, else exact
            ex.arch, model_id, "galaxies", files, vectors[hit[0]], K_SIMILAR, False,
            lambda: (rows_all, vectors))
    except DesomdbError as exc:
        return None, " ".join(str(exc).split())
    table = similar.galaxy_table(rows, dist)
    return table.filter(table["mangaid"] != mangaid), note


def _similar_baxels(ex: Explorer, model_id: str, data: pages.BaxelData, exact: bool
                    ) -> tuple[Any, str | None]:
    """Nearest baxels through the model's HNSW index; exact only when asked.

    Without a current index the exact search reads every stored latent (seconds at survey
    scale), so the page offers it as a link instead of running it on every visit.
    """
    from desomdb.pipeline import similar_index as sx
    from desomdb.products import similar
    from desomdb.som import ann

    if data.latent is None:
        return None, (f"{data.release} {data.plateifu} was assigned before latents were "
                      f"stored; run 'desomdb assign {ex.root}'")
    # as similar.similar_baxels, but with the file list and the opened index kept per archive
    # generation and the query latent from the page's own read (similar_baxels lists the
    # manifest, ranks latest_cubes and opens the index on every call: seconds at 1.2 M)
    note: str | None = None
    if exact:
        files = ex.latest_assignment_files(model_id)
        try:
            rows, dist, _, _, note = similar.nearest(
                ex.arch, model_id, "baxels", files, data.latent, K_SIMILAR, True,
                lambda: sx.read_latents(ex.arch, sorted(files)))
        except DesomdbError as exc:
            return None, " ".join(str(exc).split())
    else:
        opened, _ = ex.baxel_index(model_id)
        if opened is None:
            return None, ("the baxel index of this model is missing or older than the archive "
                          "('desomdb assign' rebuilds it)")
        index, keys = opened
        with ex.search_lock:
            found, dist = ann.search(index, data.latent, K_SIMILAR)
        rows = similar.index_rows(keys, found)
    t = similar.baxel_table(rows, dist)
    return t.filter((t["plateifu"] != data.plateifu) | (t["bin_id"] != data.bin_id)), note


def _predict_bytes(ex: Explorer, body: bytes, model_id: str) -> Any:
    """Run :func:`desomdb.products.predict.predict` on an uploaded file without writing it to disk.

    The bytes go to an anonymous in-memory file (``memfd_create``) that ``predict`` opens by
    its ``/proc/self/fd`` path; where that does not exist (not Linux), to a temporary file
    deleted straight after.
    """
    from desomdb.products import predict

    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("desomdb-upload")
        try:
            os.write(fd, body)
            return predict.predict(ex.root, f"/proc/self/fd/{fd}", model_id=model_id)
        finally:
            os.close(fd)
    with tempfile.NamedTemporaryFile(suffix=".fits") as tmp:
        tmp.write(body)
        tmp.flush()
        return predict.predict(ex.root, tmp.name, model_id=model_id)
