"""The batched fitter: many baxels of one cube fitted at once, on CPU or GPU (torch).

The same model and objective as the reference (:func:`desomdb.science.fitting._fit_ppxf`):
Gaussian stellar and gas LOSVDs, Calzetti (2000) attenuation of the stars, non-negative
SSP weights with second-order regularisation, untied gas lines; the weights minimise χ² plus
the regularisation, the nonlinear parameters the data χ² alone. The stages are the fast
fitter's (:func:`desomdb.science.fastfit._fit_fast`), each run on a whole batch:

1. Stellar V, σ, A_V with the coarse template subset on the line-free bins: a damped
   Gauss-Newton (Levenberg-Marquardt) iteration per spectrum, run in lockstep. At every trial
   point the weights are the exact non-negative least-squares solution
   (:func:`batchcore.nnls`); the Jacobian is the variable-projection one (the model's
   derivatives at fixed weights, in closed form in Fourier space, less their part the
   templates can absorb), where pPXF differentiates numerically with the weights re-solved.
2. Gas V, σ the same way, on the spectrum minus stage 1's stellar model, in the line windows.
3. Every template at those kinematics (one batched FFT convolution), regularised linear fit,
   then :data:`~desomdb.science.fitsetup.GN_ITERATIONS` times a Gauss-Newton step in all five
   nonlinear parameters and A_V on a parabola through three linear fits, kept per spectrum
   where the data χ² drops.

Why batched: one spectrum is ~100 small dense problems, dominated by Python overhead when
solved one by one. Batched, the convolutions are one FFT over (batch × templates) columns, the
normal equations one batched matrix product and the non-negative solves one batched
pivoting iteration (block principal pivoting, then Lawson & Hanson 1974 where needed) whose
linear systems are batched Cholesky factorisations. The same code runs on a GPU
(``device='cuda'``). Everything is float64.
The maths is :mod:`desomdb.science.batchcore` (torch and numpy only); this module builds its
inputs from a fit set-up and turns its results into the fast fitter's :class:`LinearFit`, so
the labels are derived by the same code (:func:`desomdb.science.fitting.fit_spectra`).

Conventions (units, labels): :mod:`desomdb.science.fitting`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

from desomdb.science import batchcore, spectra
from desomdb.science.fastfit import N_NONLINEAR, LinearFit, _regularisation_rows
from desomdb.science.fitsetup import AV_STEP, GN_GAS_MIN_SNR, GN_ITERATIONS, FitSetup

#: Spectra fitted together on a CPU: CPU-s per spectrum on one thread, 64 mock spectra, two
#: runs: 4: 0.064, 0.062; 8: 0.063, 0.058; 16: 0.060, 0.058 (flat; smaller batches stay in
#: cache).
BATCH_SIZE = 8
#: On a GPU a batch is a whole cube (a DR17 cube has ~250 baxels): it needs thousands of
#: spectra in flight to be busy (``benchmarks/bench_gpu.py`` measures 256 to 4,096).
GPU_BATCH_SIZE = 1024


def batch_size(device: str) -> int:
    """Spectra per batch on ``device``."""
    return BATCH_SIZE if device == "cpu" else GPU_BATCH_SIZE


#: glibc's malloc settings (``mallopt``) for a fitting process: blocks up to 1 GiB come from
#: the heap (not fresh ``mmap`` pages) and freed memory stays there. A batch's tens-of-MB
#: temporaries are then not page-faulted in again at every step: 10 % less CPU per fit
#: (0.062 against 0.070 s on one thread, measured on 64 mock spectra, three runs each).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory() -> None:
    """Make this process's malloc keep freed memory for reuse (glibc only; else nothing).

    Runs once per process. The price is a resident size that stays at the largest batch's
    (~200 MB on a CPU).
    """
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the process's own C library
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def _torch() -> Any:
    import torch

    return torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch's own operations on ``n`` threads inside the block (restored after)."""
    torch = _torch()
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: (id of the set-up, device, regul) -> (the set-up, kept alive, and its tensors).
_ON_DEVICE: dict[tuple[int, str, float], tuple[FitSetup, batchcore.Templates]] = {}


def _templates(setup: FitSetup, device: str, regul: float) -> batchcore.Templates:
    """Move one fit set-up to ``device`` (cached per set-up, device and regularisation)."""
    key = (id(setup), device, regul)
    if key not in _ON_DEVICE:
        if len(_ON_DEVICE) >= 8:
            _ON_DEVICE.pop(next(iter(_ON_DEVICE)))
        _ON_DEVICE[key] = (setup, _move(setup, device, regul))
    return _ON_DEVICE[key][1]


#: FFT lengths are 2**k * m with k >= 6 and m one of these: torch's (MKL's) inverse real FFT
#: of 8 x 96 templates takes 12.6-13.5 ms at 5,040-5,400 points against 16-20 ms at 4,860
#: (scipy's ``next_fast_len`` for this set-up) and 42 ms at 4,880 (measured, one thread).
_FFT_ODD_FACTORS = (1, 3, 5, 9, 15, 25, 27, 45, 75, 81)


def fft_length(need: int) -> int:
    """Return the shortest fast FFT length (:data:`_FFT_ODD_FACTORS`) of ``need`` points or more."""
    lengths = []
    for m in _FFT_ODD_FACTORS:
        k = 6
        while m << k < need:
            k += 1
        lengths.append(m << k)
    return min(lengths)


def _move(setup: FitSetup, device: str, regul: float) -> batchcore.Templates:
    """Build the tensors of :class:`batchcore.Templates` from a fit set-up."""
    from ppxf.ppxf import attenuation

    torch = _torch()
    n_stars = setup.stars.shape[1]
    wave = spectra.rest_wave_aa()
    # pPXF pads to a power of two (8192 here); a shorter fast length that still holds the
    # templates, the galaxy and the largest LOSVD shift gives the same galaxy bins (to
    # 1e-15) for 40 % less FFT work.
    padded = np.fft.irfft(setup.templates_rfft, setup.npad, axis=0)
    used = np.flatnonzero(np.abs(padded).max(axis=1) > 1e-12 * np.abs(padded).max())[-1] + 1
    widest = batchcore.V_BOUND_KMS + 6 * batchcore.SIGMA_RANGE_KMS[1]
    reach = int(np.ceil(abs(setup.vsyst) + widest / setup.velscale))
    npad = min(fft_length(max(int(used), wave.size) + reach), setup.npad)
    rfft = torch.as_tensor(np.fft.rfft(padded[:npad].T, axis=1), dtype=torch.complex128,
                           device=device)
    reg = _regularisation_rows(setup.reg_dim, setup.templates_rfft.shape[1], float(regul))
    return batchcore.Templates(
        rfft_stars=rfft[:n_stars].contiguous(), rfft_gas=rfft[n_stars:].contiguous(),
        rfft_coarse=rfft[torch.as_tensor(setup.coarse, device=device)].contiguous(),
        omega=torch.linspace(0, np.pi, rfft.shape[1], dtype=torch.float64, device=device),
        ln_att1=torch.as_tensor(np.log(attenuation(wave, 1.0)), device=device),
        reg_gram=torch.as_tensor(reg.T @ reg, device=device),
        line_bins=torch.as_tensor(setup.line_bins, device=device),
        velscale=float(setup.velscale), vsyst=float(setup.vsyst), npad=int(npad),
        n_pix=wave.size, av_step=AV_STEP, gas_min_snr=GN_GAS_MIN_SNR,
        gn_iterations=GN_ITERATIONS)


def fit_batch(setup: FitSetup, galaxy: np.ndarray, noise: np.ndarray, good: np.ndarray,
              regul: float, device: str = "cpu") -> list[tuple[LinearFit, float]]:
    """Fit a batch of one cube's spectra (all stages); see the module docstring.

    Parameters
    ----------
    setup : FitSetup
        Templates of the cube's redshift bucket and LSF.
    galaxy, noise : ndarray, shape (batch, 4544)
        Normalised spectra and their 1σ noise (finite everywhere).
    good : ndarray of bool, shape (batch, 4544)
        Bins to fit.
    regul : float
        Regularisation strength (:class:`~desomdb.science.fitsetup.FitOptions`).
    device : str
        torch device (``cpu``, ``cuda``).

    Returns
    -------
    list of (LinearFit, float)
        Per spectrum, the final fit (as the fast fitter's, for the same label derivation) and
        its stellar A_V (mag).
    """
    torch = _torch()
    keep_freed_memory()
    tp = _templates(setup, device, float(regul))
    gal = torch.as_tensor(galaxy, dtype=torch.float64, device=device)
    weight = torch.where(torch.as_tensor(good, device=device),
                         1.0 / torch.as_tensor(noise, dtype=torch.float64, device=device), 0.0)
    best = batchcore.solve(tp, gal, weight)
    return _results(setup, tp, best, noise, good)


def _results(setup: FitSetup, tp: batchcore.Templates, best: batchcore.Full,
             noise: np.ndarray, good: np.ndarray) -> list[tuple[LinearFit, float]]:
    """Per spectrum, the final fit as a :class:`LinearFit` (numpy, on the host)."""
    n_stars = tp.rfft_stars.shape[0]
    weights = best.fit.weights.cpu().numpy()
    bestfit = best.fit.bestfit.cpu().numpy()
    gas_cols = best.conv_gas.mT.cpu().numpy()  # (batch, n_pix, n_gas)
    kin = best.kin.cpu().numpy()
    a_v = best.a_v.cpu().numpy()
    chi2 = best.fit.chi2.cpu().numpy()
    penalty = ((best.fit.weights @ tp.reg_gram) * best.fit.weights).sum(dim=1).cpu().numpy()
    n_gas = gas_cols.shape[2]
    out = []
    for i in range(weights.shape[0]):
        cols = np.ascontiguousarray(gas_cols[i])
        w_gas = weights[i, n_stars:]
        integ = np.abs(cols.sum(axis=0))
        empty = ~np.any(cols[good[i]] != 0, axis=0)
        gas_flux = integ * w_gas
        gas_flux[empty] = np.nan
        templates = cols * w_gas
        n_dof = max(int(good[i].sum()) - N_NONLINEAR, 1)
        out.append((LinearFit(
            weights=weights[i], bestfit=bestfit[i], gas_bestfit=templates.sum(axis=1),
            gas_bestfit_templates=templates, gas_flux=gas_flux, gas_names=setup.gas_names,
            gas_component=np.arange(n_stars + n_gas) >= n_stars, chi2=float(chi2[i]) / n_dof,
            sol=[[float(kin[i, 0]), float(kin[i, 1])], [float(kin[i, 2]), float(kin[i, 3])]],
            objective=float(chi2[i] + penalty[i]), a_v=float(a_v[i]),
            gas_design=cols, noise=noise[i]), float(a_v[i])))
    return out
