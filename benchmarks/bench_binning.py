"""vorbin's last step, CVT (the default) against WVT: time, bins and S/N spread per cube.

Run: python benchmarks/bench_binning.py [--galaxies 8] [--seed 99]
Renders mock cubes (127-fibre IFUs for the first four, 61-fibre after), computes the same
g-band signal and noise as ingest, bins them both ways and prints, per cube: the bin count,
the S/N of the multi-spaxel bins (10th percentile, median, rms of S/N / target − 1) and
the time of each. Single-spaxel bins are left out of the S/N figures: they are above the
target and identical in both.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from desomdb import mock
from desomdb.mock.galaxy import draw_galaxy
from desomdb.science import binning, dust
from desomdb.survey import manga
from desomdb.survey.cube import read_cube


def _row(bins: binning.Binning, seconds: float, target: float) -> str:
    sn = bins.snr[bins.n_spaxels > 1]
    if sn.size == 0:
        return f"{seconds:6.2f} s {bins.n_bins:5d} bins (no multi-spaxel bin)"
    rms = float(np.sqrt(np.mean((sn / target - 1) ** 2)))
    return (f"{seconds:6.2f} s {bins.n_bins:5d} bins  S/N p10 {np.percentile(sn, 10):5.1f} "
            f"p50 {np.median(sn):5.1f} rms {rms:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--galaxies", type=int, default=8)
    parser.add_argument("--seed", type=int, default=99)
    parser.add_argument("--target", type=float, default=20.0)
    args = parser.parse_args()
    binning.preload()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.galaxies):
            p = draw_galaxy(i, args.seed, (127,) if i < 4 else (61,))
            hdul, _ = mock.render_cube(p, manga.release("DR15"))
            path = Path(tmp) / f"manga-{p.plateifu}-LOGCUBE.fits.gz"
            mock.write_cube(hdul, path)
            cube = read_cube(path)
            mw = dust.milky_way_transmission(cube.wave, cube.ebvgal)
            signal, noise = binning.spaxel_signal_noise(cube.flux, cube.ivar, cube.good,
                                                        cube.wave, transmission=mw)
            print(f"{i} {p.gtype} ({p.n_fibres}-fibre)")
            for wvt in (False, True):
                t = time.perf_counter()
                bins = binning.voronoi_bins(signal, noise, args.target, wvt=wvt)
                step = "wvt" if wvt else "cvt"
                print(f"  {step} {_row(bins, time.perf_counter() - t, args.target)}")


if __name__ == "__main__":
    main()
