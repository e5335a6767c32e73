"""The explorer's baxel page with and without the fit redrawn over the spectrum.

Run: python benchmarks/bench_fit_redraw.py ARCHIVE [--baxels 6] [--repeats 2]

ARCHIVE is an archive with labels and a current, assigned model (e.g. the demo's). The
baxel page recomputes the stored fit (:func:`desomdb.web.explorer.redraw_fit`); this times
uncached pages of the first ``--baxels`` fitted baxels with the redraw and with it switched
off, interleaved, and prints ms per page of each and their difference: the cost of drawing
the fit rather than storing it.
"""

from __future__ import annotations

import argparse
import time

from starlette.testclient import TestClient

from desomdb.query import views
from desomdb.web import create_app, routes


def main() -> None:
    """Time the baxel page with and without the fit, interleaved; print ms per page."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive")
    ap.add_argument("--baxels", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    keys = views.connect(args.archive).sql(
        "select release, plateifu, bin_id, fitter from preferred_labels where status = 'ok' "
        f"order by plateifu, bin_id limit {args.baxels}").fetchall()
    redraw = routes.redraw_fit
    best: dict[str, float] = {}
    with TestClient(create_app(args.archive, cache_pages=0)) as client:
        client.get(f"/baxel/{keys[0][0]}/{keys[0][1]}/{keys[0][2]}")  # templates, network
        for _ in range(args.repeats):
            for mode in ("with the fit", "without"):
                routes.redraw_fit = redraw if mode == "with the fit" else (
                    lambda *a, **k: None)
                t0 = time.perf_counter()
                for release, plateifu, bin_id, _ in keys:
                    assert client.get(f"/baxel/{release}/{plateifu}/{bin_id}").is_success
                ms = (time.perf_counter() - t0) / len(keys) * 1e3
                best[mode] = min(best.get(mode, ms), ms)
    routes.redraw_fit = redraw
    fitters = sorted({k[3] for k in keys})
    print(f"baxel page, {len(keys)} baxels ({', '.join(fitters)}), best of {args.repeats}: "
          f"{best['with the fit']:.0f} ms with the fit, {best['without']:.0f} ms without "
          f"(+{best['with the fit'] - best['without']:.0f} ms)")


if __name__ == "__main__":
    main()
