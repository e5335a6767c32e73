"""Ingest speed: seconds per cube vs only reading the same .fits.gz with astropy.

Run: python benchmarks/bench_ingest.py [--ifu 127] [--cubes 3] [--first 0] [--repeat 2] [--wvt]
Prints a table of wall times, the ratio ingest/read, baxels per cube and peak RSS. The
named baseline is "gunzip + read" (decompress into memory, astropy reads every HDU: what
ingest itself must do); baseline and ingest alternate ``--repeat`` times per cube and the
best of each is kept, so machine load hits both alike. Heavy imports run first, as an
ingest worker's start-up does (``binning.preload``). ``--wvt`` also times the ingest with
vorbin's WVT step (``[binning] wvt = true``) in the same alternation, as a third column.
"""

from __future__ import annotations

import argparse
import gzip
import io
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from desomdb import mock
from desomdb.mock.galaxy import draw_galaxy
from desomdb.pipeline import baxels, ingest
from desomdb.science import binning
from desomdb.survey import manga
from desomdb.survey.cube import read_cube


def read_only(path: Path) -> float:
    """Baseline 1: astropy reading every HDU of the .fits.gz directly."""
    t = time.perf_counter()
    with fits.open(path, memmap=False) as hdul:
        for h in hdul:
            _ = h.data
    return time.perf_counter() - t


def read_decompressed(path: Path) -> float:
    """Baseline 2: gunzip into memory, then astropy reads every HDU (what ingest does)."""
    t = time.perf_counter()
    with fits.open(io.BytesIO(gzip.decompress(path.read_bytes())), memmap=False) as hdul:
        for h in hdul:
            _ = h.data
    return time.perf_counter() - t


def full_ingest(path: Path, drp: dict, wvt: bool = False) -> tuple[float, int]:
    t = time.perf_counter()
    tables = baxels.process_cube(read_cube(path), drp, ingest.IngestConfig(wvt=wvt))
    return time.perf_counter() - t, tables.baxels.num_rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ifu", type=int, default=127)
    parser.add_argument("--cubes", type=int, default=3)
    parser.add_argument("--first", type=int, default=0,
                        help="index of the first mock galaxy (1 is the 1,933-bin one)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--wvt", action="store_true",
                        help="also time vorbin's WVT step (the default before this change)")
    args = parser.parse_args()
    binning.preload()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.first, args.first + args.cubes):
            p = draw_galaxy(i, 99, (args.ifu,))
            hdul, _ = mock.render_cube(p, manga.release("DR15"))
            path = Path(tmp) / f"manga-{p.plateifu}-LOGCUBE.fits.gz"
            mock.write_cube(hdul, path)
            drp = {"z": p.z, "nsa_elpetro_phi": p.pa_deg, "nsa_elpetro_ba": p.ba,
                   "nsa_elpetro_th50_r": p.th50_arcsec}
            t_read = read_only(path)
            t_dec, t_ing, t_wvt = np.inf, np.inf, np.inf
            for _ in range(args.repeat):
                t_dec = min(t_dec, read_decompressed(path))
                t, n_bax = full_ingest(path, drp)
                t_ing = min(t_ing, t)
                if args.wvt:
                    t_wvt = min(t_wvt, full_ingest(path, drp, wvt=True)[0])
            rows.append((p.gtype, path.stat().st_size / 1e6, t_read, t_dec, t_ing, n_bax, t_wvt))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"{'galaxy':<16}{'MB':>7}{'astropy s':>10}{'gunzip+read s':>14}{'ingest s':>10}"
          f"{'ingest/astropy':>15}{'ingest/gunzip':>14}{'baxels':>8}"
          + (f"{'wvt s':>8}{'wvt/gunzip':>11}" if args.wvt else ""))
    for gtype, mb, tr, td, ti, nb, tw in rows:
        print(f"{gtype:<16}{mb:>7.1f}{tr:>10.2f}{td:>14.2f}{ti:>10.2f}{ti / tr:>15.2f}"
              f"{ti / td:>14.2f}{nb:>8d}" + (f"{tw:>8.2f}{tw / td:>11.2f}" if args.wvt else ""))
    tr, td, ti = (float(np.mean([r[k] for r in rows])) for k in (2, 3, 4))
    print(f"mean ({args.ifu}-fibre): astropy read {tr:.2f} s, gunzip+read {td:.2f} s, ingest "
          f"{ti:.2f} s per cube; peak RSS {peak_gb:.2f} GB (includes rendering the mocks)")


if __name__ == "__main__":
    main()
