"""The explorer app: its routes, middleware and error pages (endpoints: :mod:`desomdb.web.routes`).

URLs name the model, so a link keeps showing what it showed::

    /                                         -> the current model's map
    /model/<id>/map?colour=<quantity>[&map=desom2]
    /model/<id>/node/<row>,<col>              (+ /coadd.csv, /coadd.fits)
    /galaxy/<mangaid>[?plateifu=&colour=]     (current model; /model/<id>/galaxy/... too)
    /baxel/<release>/<plateifu>/<bin>         (current model; /model/<id>/baxel/... too)
    /search?q=<plateifu | mangaid | RA DEC [radius]>  (one exact match: its galaxy page)
    /sql?q=<select ...>                       (+ /sql.csv?q=...)
    /predict                                  (POST a spectra FITS: predict in memory)

Every query runs on a guarded, sandboxed connection from :func:`desomdb.query.views.connect`
(the same guard as ``desomdb sql``). Connections are opened per (model, archive generation):
when a writer commits, the next request sees the new files.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from desomdb.errors import DesomdbError
from desomdb.web import routes as r
from desomdb.web.explorer import Explorer


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
    static = StaticFiles(directory=str(resources.files("desomdb.web").joinpath("static")))
    routes = [
        Route("/", r.home),
        Route("/map", ex.cached(r.map_page)),
        Route("/model/{model_id}/map", ex.cached(r.map_page)),
        Route("/model/{model_id}/node/{rc}", ex.cached(r.node_page)),
        Route("/model/{model_id}/node/{rc}/coadd.{fmt:str}", r.node_download),
        Route("/model/{model_id}/node/{rc}/stack.{fmt:str}", r.node_stack),
        Route("/galaxy/{mangaid}", ex.cached(r.galaxy_page)),
        Route("/model/{model_id}/galaxy/{mangaid}", ex.cached(r.galaxy_page)),
        Route("/baxel/{release}/{plateifu}/{bin_id:int}", ex.cached(r.baxel_page)),
        Route("/model/{model_id}/baxel/{release}/{plateifu}/{bin_id:int}",
              ex.cached(r.baxel_page)),
        Route("/search", r.search_page),
        Route("/sql", r.sql_page),
        Route("/sql.csv", r.sql_csv),
        Route("/predict", r.predict_page, methods=["GET", "POST"]),
        Mount("/static", static, name="static"),
    ]
    hosts = allowed_hosts or ["127.0.0.1", "localhost", "testserver"]
    app = Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware,
                                                          allowed_hosts=hosts)],
                    exception_handlers={HTTPException: r.not_found,
                                        DesomdbError: r.bad_request,
                                        Exception: r.server_error})
    app.state.explorer = ex
    app.state.templates = _templates()
    return app
