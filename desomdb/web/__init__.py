"""``desomdb serve``: a local, read-only explorer of an archive in the browser.

Pages: the DESOM-1 map coloured by a chosen quantity (and the DESOM-2 map), a node (decoded
prototype, co-add, label PDFs, member galaxies, grid neighbours), a galaxy (fingerprint, bin
map by node or label, radial profiles, DESOM-2 node, nearest galaxies, drpall row), a baxel
(spectrum, reconstruction and residual, its labels beside its node's PDFs, nearest baxels),
an upload that runs ``predict`` on a spectra FITS in memory, and the guarded SQL box. URLs
are listed in :mod:`desomdb.web.app`.

Why Starlette + uvicorn and not datasette: datasette serves SQLite databases (its tables,
facets and permissions are built on SQLite's catalogue and connection model); this archive
is Parquet read through DuckDB views, and every query must pass the archive's own guard and
sandbox (:mod:`desomdb.query.guard`). Starlette is a small, well-kept ASGI toolkit (routing,
Jinja2 templates, static files, multipart uploads) that lets the pages call
:func:`desomdb.query.views.connect` directly; uvicorn runs it. Figures are drawn on the server
(matplotlib SVG, or SVG grids of links for the maps), with one small script of our own: no
JavaScript library and nothing fetched from a CDN.

Safety: the app binds 127.0.0.1 by default, accepts only local Host headers, writes nothing
to the archive, and runs every query through the guarded connection of ``desomdb sql``.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

from desomdb.archive.store import Archive
from desomdb.errors import ConfigError
from desomdb.web.app import create_app

__all__ = ["create_app", "serve"]


def serve(archive: str | Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the explorer of ``archive`` until interrupted (Ctrl+C).

    Parameters
    ----------
    archive : str or Path
        An existing archive folder.
    host : str
        Interface to bind (default loopback only). Another address shows the archive to
        the network, which is announced on stderr.
    port : int

    Raises
    ------
    ArchiveError
        If ``archive`` is not an archive folder.
    ConfigError
        If ``port`` is out of range.
    """
    import uvicorn

    root = Archive(archive).root  # an ArchiveError says when it is no archive
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: choose a port between 1 and 65535")
    hosts = ["127.0.0.1", "localhost", "[::1]"]
    if not _loopback(host):
        hosts.append(host)
        print(f"desomdb: note: serving on {host}, reachable from other machines; the "
              "archive is read only, but anyone who can reach the port can query it",
              file=sys.stderr)
    app = create_app(root, allowed_hosts=hosts)
    print(f"desomdb explorer: http://{'localhost' if _loopback(host) else host}:{port}/ "
          f"(archive {root}; Ctrl+C stops it)", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
