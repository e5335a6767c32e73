"""The archive behind the explorer, and the lookups its pages share.

:class:`Explorer` opens guarded connections (:func:`desomdb.query.views.connect`, the same
guard as ``desomdb sql``) per model and keeps what pages reuse for as long as the archive's
manifest generation stays the same. The functions below it answer the pages' heavier
questions: a node's stack, a spectrum's reconstruction, the nearest galaxies and baxels, and
predictions for an uploaded file.
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from desomdb.archive.store import Archive
from desomdb.errors import DesomdbError
from desomdb.query import views
from desomdb.som.registry import current_model
from desomdb.web import galaxy_pages, pages
from desomdb.web.pages import ModelInfo, NotFoundError

T = TypeVar("T")

#: Neighbours listed by the similarity searches on the galaxy and baxel pages.
K_SIMILAR = 8


@dataclass
class _Session:
    con: views.ReadOnlyConnection
    lock: threading.Lock
    models: dict[str, ModelInfo]


class Explorer:
    """The archive behind the app: guarded connections per model, and what pages reuse.

    Everything the pages reuse (connections, cube file lists, fingerprint vectors, the
    baxel index, loaded networks) is kept by one helper, :meth:`memo`, for as long as the
    archive's manifest generation stays the same: committed data never changes in place, so
    a commit is the only thing that makes a kept value stale.

    Parameters
    ----------
    archive : str or Path
        The archive folder (read only; nothing is written to it).
    cache_pages : int
        Drawn pages kept per archive state (:meth:`cached`); 0 keeps none.
    """

    def __init__(self, archive: str | Path, cache_pages: int = 64):
        self.arch = Archive(archive)
        self.root = self.arch.root
        self.cache_pages = cache_pages
        self.search_lock = threading.Lock()
        self._lock = threading.RLock()  # a value's build may ask memo for another value
        self._generation: int | None = None
        self._kept: dict[tuple[str, str | None], Any] = {}
        self._pages: OrderedDict[tuple[Any, ...], Response] = OrderedDict()

    def memo(self, what: str, model_id: str | None, build: Callable[[], T]) -> T:
        """Return ``build()``, built once per (archive generation, ``what``, ``model_id``)."""
        generation = self.arch.generation()
        with self._lock:
            if generation != self._generation:
                self._kept.clear()  # a commit: every kept value may be stale
                self._generation = generation
            key = (what, model_id)
            if key not in self._kept:
                self._kept[key] = build()
            return cast(T, self._kept[key])

    def cached(self, endpoint: Callable[[Request], Response]) -> Callable[[Request], Response]:
        """Wrap a page endpoint so a page is drawn once per archive state.

        The key holds the manifest generation and the current model, so a commit or
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
        def build() -> _Session:
            # a model the archive does not know is checked by connection(), not by connect()
            con = views.connect(self.root)
            assert isinstance(con, views.ReadOnlyConnection)
            known = pages.models(con)
            if model_id is not None and model_id in known:
                views.use_model(con, model_id)
            return _Session(con, threading.Lock(), known)

        return self.memo("session", model_id, build)

    def models(self, model_id: str | None = None) -> dict[str, ModelInfo]:
        """Return the archive's registered models (model id -> :class:`ModelInfo`)."""
        return self._session(model_id).models

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

        Listed by the archive (:meth:`desomdb.archive.store.Archive.cube_parts`).
        """
        def build() -> pages.CubeParts:
            listed = {"spectra": self.arch.cube_parts("spectra"),
                      "labels": self.arch.cube_parts("labels"),
                      "assignments": self.arch.cube_parts("assignments", model_id=model_id)}
            return pages.CubeParts({table: {cube: [str(f) for f in files]
                                            for cube, files in by_cube.items()}
                                    for table, by_cube in listed.items() if by_cube})

        return self.memo("cube_parts", model_id, build)

    def galaxy_vectors(self, model_id: str) -> tuple[dict[str, str], Any, np.ndarray]:
        """Return the model's fingerprint files and galaxy vectors (for nearest galaxies).

        See :func:`desomdb.pipeline.similar_index.fingerprint_files` and
        :func:`~desomdb.pipeline.similar_index.galaxy_vectors`; no files gives empty vectors.
        """
        from desomdb.pipeline import similar_index as sx

        def build() -> tuple[dict[str, str], Any, np.ndarray]:
            files = sx.fingerprint_files(self.arch, model_id)
            rows, vectors = (sx.galaxy_vectors(self.arch, model_id) if files
                             else (None, np.zeros((0, 0), np.float32)))
            return files, rows, vectors

        return self.memo("galaxy_vectors", model_id, build)

    def latest_assignment_files(self, model_id: str) -> dict[str, str]:
        """Return the model's assignment files of the newest cubes -> sha256 (search input).

        See :func:`desomdb.pipeline.similar_index.latest_assignment_files`.
        """
        from desomdb.pipeline import similar_index as sx

        return self.memo("latest_assignment_files", model_id,
                         lambda: sx.latest_assignment_files(self.arch, model_id))

    def baxel_index(self, model_id: str) -> tuple[tuple[Any, Any] | None, str | None]:
        """Return the model's opened baxel HNSW index and its keys, or None and why not.

        Opened by :mod:`desomdb.products.similar`, which checks that the index matches the
        newest cubes' assignment files; searches share it under :attr:`search_lock`.
        """
        from desomdb.pipeline import similar_index as sx
        from desomdb.products import similar

        def build() -> tuple[tuple[Any, Any] | None, str | None]:
            files = self.latest_assignment_files(model_id)
            return similar.open_index(self.arch, model_id, "baxels",
                                      sx.source_digest("baxels", files))

        return self.memo("baxel_index", model_id, build)

    def network(self, model_id: str) -> Any:
        """Return the loaded DESOM network of ``model_id``."""
        from desomdb.som.registry import load_model

        return self.memo("network", model_id, lambda: load_model(self.arch, model_id)[0])


def map_query(con: views.ReadOnlyConnection, info: ModelInfo, colour: str, want_d2: bool,
              ex: Explorer) -> pages.MapData:
    """Read the map a request asks for (the DESOM-2 map of ``info`` when ``want_d2``)."""
    if not want_d2:
        return pages.map_data(con, info, colour)
    d2_id = pages.desom2_id(con, info.model_id)
    d2 = ex.models(info.model_id).get(d2_id) if d2_id else None
    if d2 is None:
        raise NotFoundError(f"model {info.model_id} has no DESOM-2 yet; build it with "
                            "'desomdb fingerprints'")
    return pages.map_data(con, info, "occupancy", desom2=d2)


def stack_available() -> bool:
    """Whether this installation has the stacking module (a node page offers stacks then)."""
    try:
        import desomdb.products.stack  # noqa: F401
    except ImportError:
        return False
    return True


def stack_file(ex: Explorer, model_id: str, node: int, fmt: str) -> bytes:
    """Stack a node's members with :mod:`desomdb.products.stack` (no fit) and return the file bytes.

    The file is written by :func:`desomdb.products.stack_output.write` (units, provenance,
    WAVE extension) into a temporary folder outside the archive and read back.
    """
    if fmt not in ("fits", "parquet"):
        raise NotFoundError(f"no stack format {fmt!r}; use stack.fits or stack.parquet")
    if not stack_available():
        raise NotFoundError("this installation has no desomdb.products.stack; download coadd.fits")
    from desomdb.products import stack, stack_output

    result = stack.stack(ex.root, where=f"node = {int(node)}", by="none", model_id=model_id,
                         fit=False)
    with tempfile.TemporaryDirectory(prefix="desomdb-stack-") as tmp:
        out = stack_output.write(result, ex.root, Path(tmp) / f"stack.{fmt}")
        return out.read_bytes()


#: One spectrum through the network at a time, on one thread (see :func:`reconstruct`).
_ONE_THREAD = threading.Lock()


def reconstruct(ex: Explorer, model_id: str, x: np.ndarray) -> np.ndarray:
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


@dataclass(frozen=True)
class FitDrawing:
    """A baxel's stored fit, recomputed for drawing (see :func:`redraw_fit`).

    Attributes
    ----------
    stored_id : str
        The fitter id of the stored row (``labels.fitter``).
    fitter_id : str
        The fitter id that recomputed it (the same unless the stored row is of an older
        version of that fitter).
    model : FitModel
        The curves and the recomputed labels row.
    """

    stored_id: str
    fitter_id: str
    model: Any


#: One fit at a time: a fit is seconds of CPU, and the pages run on a thread pool.
_ONE_FIT = threading.Lock()


def redraw_fit(ex: Explorer, model_id: str, data: galaxy_pages.BaxelData
               ) -> FitDrawing | None:
    """Recompute a baxel's stored fit to draw its model over the spectrum.

    The best-fit model is not stored (4,544 floats per baxel per fitter would more than
    double the archive); it is recomputed on demand by the fitter that made the stored row,
    from the stored spectrum, the cube's redshift and LSF, with the same set-up: the same
    code that labelled the archive, so its labels equal the stored row's (the page shows
    both χ²). One fit runs at a time; not memoised, since the drawn page is
    (:meth:`Explorer.cached`, bounded).

    Returns
    -------
    FitDrawing or None
        None when the baxel has no ``ok`` fit in the archive.
    """
    from desomdb.science import fitting

    fit = data.fit
    if fit is None or fit["status"] != "ok":
        return None
    stored_id = str(fit["fitter"])
    name = stored_id.split("-")[0]  # ids are <fitter>-<library>-<version>
    if name not in fitting.FITTERS or data.stored is None:
        return None
    with ex.connection(model_id) as (con, _):
        cube = con.sql("select * from cubes where release = ? and plateifu = ?",
                       params=[data.release, data.plateifu]).pl().row(0, named=True)
    lsf = cube.get("lsf_sigma_aa")  # none for cubes ingested before it was stored
    flux, ivar, mask = data.stored
    with _ONE_FIT:
        model = fitting.fit_model(flux, ivar, mask, float(data.baxel["norm_flux"]),
                                  float(cube["z"]), fitter=name,
                                  lsf_sigma_aa=None if lsf is None else np.asarray(lsf))
    return FitDrawing(stored_id, fitting.FITTERS[name], model)


def similar_galaxies(ex: Explorer, model_id: str, mangaid: str) -> tuple[Any, str | None]:
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


def similar_baxels(ex: Explorer, model_id: str, data: galaxy_pages.BaxelData, exact: bool
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


def predict_bytes(ex: Explorer, body: bytes, model_id: str) -> Any:
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
