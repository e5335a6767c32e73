"""The batched fitter: many baxels of one cube fitted at once, on CPU or GPU (torch).

The same model and objective as the reference (:func:`desomdb.science.fitting._fit_ppxf`):
Gaussian stellar and gas LOSVDs, Calzetti (2000) attenuation of the stars, non-negative
SSP weights with second-order regularisation, untied gas lines; the weights minimise χ² plus
the regularisation, the nonlinear parameters the data χ² alone. The stages are the fast
fitter's (:func:`desomdb.science.fastfit._fit_fast`), each run on a whole batch:

1. Stellar V, σ, A_V with the coarse template subset on the line-free bins: a damped
   Gauss-Newton (Levenberg-Marquardt) iteration per spectrum, run in lockstep. At every trial
   point the weights are the exact non-negative least-squares solution (:func:`nnls`), the
   Jacobian that of the model at fixed weights, in closed form in Fourier space (pPXF
   differentiates numerically instead).
2. Gas V, σ the same way, on the spectrum minus stage 1's stellar model, in the line windows.
3. Every template at those kinematics (one batched FFT convolution), regularised linear fit,
   then :data:`~desomdb.science.fitsetup.GN_ITERATIONS` times a Gauss-Newton step in all five
   nonlinear parameters and A_V on a parabola through three linear fits, kept per spectrum
   where the data χ² drops.

Why batched: one spectrum is ~100 small dense problems, dominated by Python overhead when
solved one by one. Batched, the convolutions are one FFT over (batch × templates) columns, the
normal equations one batched matrix product and the non-negative solves one batched
active-set iteration (Lawson & Hanson 1974) whose linear systems are batched Cholesky
factorisations. The same code runs on a GPU (``device='cuda'``). Everything is float64.

Conventions (units, labels): :mod:`desomdb.science.fitting`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from desomdb.science import spectra
from desomdb.science.fastfit import N_NONLINEAR, LinearFit, _regularisation_rows
from desomdb.science.fitsetup import AV_STEP, GN_GAS_MIN_SNR, GN_ITERATIONS, FitSetup

#: Spectra fitted together on a CPU: CPU-s per spectrum on one thread, 32 constructed
#: spectra: 4: 0.086, 8: 0.086, 16: 0.090, 32: 0.089 (smaller batches stay in cache).
BATCH_SIZE = 8
#: Damped Gauss-Newton iterations of the kinematic stages 1 and 2 (all converge in fewer).
LM_ITERATIONS = 20
#: Relative χ² change below which a spectrum's kinematic stage has converged (pPXF's ftol).
LM_FTOL = 1e-4
#: Largest step (km/s) of a velocity or dispersion in one damped Gauss-Newton iteration.
LM_MAX_STEP_KMS = 100.0
#: Bounds of the nonlinear parameters: V (km/s, about the drpall redshift), σ (km/s), A_V (mag).
V_BOUND_KMS = 2000.0
SIGMA_RANGE_KMS = (5.0, 1000.0)
SIGMA_GAS_RANGE_KMS = (1.0, 1000.0)
AV_RANGE = (0.0, 4.0)


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


@dataclass
class _Templates:
    """A fit set-up's templates and constants as tensors on one device.

    Template transforms are stored templates × frequencies, so that every FFT runs along the
    last, contiguous axis (2.4x faster than along the first, measured), and every design
    matrix is templates × bins.
    """

    rfft_stars: Any  # (n_stars, n_freq) complex128
    rfft_gas: Any  # (n_gas, n_freq)
    rfft_coarse: Any  # (n_coarse, n_freq)
    omega: Any  # (n_freq,) radians per pixel
    ln_att1: Any  # (n_pix,) ln of the Calzetti attenuation at A_V = 1
    reg_gram: Any  # (n_templates, n_templates) RᵀR of the regularisation rows
    line_bins: Any  # (n_pix,) bool
    velscale: float
    vsyst: float
    npad: int
    n_pix: int


#: (id of the set-up, device, regul) -> (the set-up, kept alive, and its tensors).
_ON_DEVICE: dict[tuple[int, str, float], tuple[FitSetup, _Templates]] = {}


def _templates(setup: FitSetup, device: str, regul: float) -> _Templates:
    """Move one fit set-up to ``device`` (cached per set-up, device and regularisation)."""
    key = (id(setup), device, regul)
    if key not in _ON_DEVICE:
        if len(_ON_DEVICE) >= 8:
            _ON_DEVICE.pop(next(iter(_ON_DEVICE)))
        _ON_DEVICE[key] = (setup, _move(setup, device, regul))
    return _ON_DEVICE[key][1]


def _move(setup: FitSetup, device: str, regul: float) -> _Templates:
    import scipy.fft
    from ppxf.ppxf import attenuation

    torch = _torch()
    n_stars = setup.stars.shape[1]
    wave = spectra.rest_wave_aa()
    # pPXF pads to a power of two (8192 here); a shorter fast length that still holds the
    # templates, the galaxy and the largest LOSVD shift gives the same galaxy bins (to
    # 1e-15) for 40 % less FFT work.
    padded = np.fft.irfft(setup.templates_rfft, setup.npad, axis=0)
    used = np.flatnonzero(np.abs(padded).max(axis=1) > 1e-12 * np.abs(padded).max())[-1] + 1
    reach = int(np.ceil(abs(setup.vsyst) + (V_BOUND_KMS + 6 * SIGMA_RANGE_KMS[1])
                        / setup.velscale))
    npad = min(scipy.fft.next_fast_len(max(int(used), wave.size) + reach, real=True),
               setup.npad)
    rfft = torch.as_tensor(np.fft.rfft(padded[:npad].T, axis=1), dtype=torch.complex128,
                           device=device)
    reg = _regularisation_rows(setup.reg_dim, setup.templates_rfft.shape[1], float(regul))
    return _Templates(
        rfft_stars=rfft[:n_stars].contiguous(), rfft_gas=rfft[n_stars:].contiguous(),
        rfft_coarse=rfft[torch.as_tensor(setup.coarse, device=device)].contiguous(),
        omega=torch.linspace(0, np.pi, rfft.shape[1], dtype=torch.float64, device=device),
        ln_att1=torch.as_tensor(np.log(attenuation(wave, 1.0)), device=device),
        reg_gram=torch.as_tensor(reg.T @ reg, device=device),
        line_bins=torch.as_tensor(setup.line_bins, device=device),
        velscale=float(setup.velscale), vsyst=float(setup.vsyst), npad=int(npad),
        n_pix=wave.size)


def _kernel(tp: _Templates, vel: Any, sig: Any) -> Any:
    """PPXF's Gaussian LOSVD in Fourier space, shape (batch, n_freq); V, σ in km/s."""
    torch = _torch()
    v_pix = vel / tp.velscale + tp.vsyst
    s_pix = sig / tp.velscale
    return torch.exp(torch.complex(-0.5 * (s_pix[:, None] * tp.omega) ** 2,
                                   -v_pix[:, None] * tp.omega))


def convolve(tp: _Templates, rfft: Any, vel: Any, sig: Any) -> Any:
    """Templates convolved with each spectrum's LOSVD, shape (batch, n_templates, n_pix).

    Parameters
    ----------
    tp : _Templates
    rfft : Tensor, shape (n_templates, n_freq)
        Template transforms (one of ``tp.rfft_*``).
    vel, sig : Tensor, shape (batch,)
        V and σ, km/s.
    """
    torch = _torch()
    return torch.fft.irfft(rfft[None] * _kernel(tp, vel, sig)[:, None, :], n=tp.npad,
                           dim=2)[:, :, :tp.n_pix]


def nnls(gram: Any, rhs: Any, start: Any | None = None, max_iter: int | None = None) -> Any:
    """Solve min ½ xᵀ G x − rᵀ x subject to x ≥ 0 for a batch (Lawson-Hanson active set).

    This is min ||A x − b||² with G = AᵀA and r = Aᵀb, the normal equations of the weights.
    Every spectrum runs the classic algorithm on its own passive set (the other rows and
    columns replaced by the identity, one batched Cholesky factorisation per step); only the
    spectra still moving are carried into the next step. It starts from a passive set
    (``start``, or every variable) pruned of the variables whose least-squares value is not
    positive until none is left (a few solves): that point is feasible and optimal on its
    set, as Lawson-Hanson requires, and usually close to the answer, so few of the
    one-variable-at-a-time steps remain. The matrix is scaled to a unit diagonal first
    (non-negativity is unchanged by a positive scaling); a factorisation that fails gets a
    1e-10 diagonal load.

    Parameters
    ----------
    gram : Tensor, shape (batch, n, n)
        Symmetric positive semi-definite.
    rhs : Tensor, shape (batch, n)
    start : Tensor of bool, shape (batch, n), optional
        A guess of the variables that end up positive (e.g. a previous solution's).
    max_iter : int, optional
        Outer iterations (each frees at most one variable); default 3 n.

    Returns
    -------
    Tensor, shape (batch, n)
        The non-negative solution.
    """
    torch = _torch()
    batch, n = rhs.shape
    scale = torch.diagonal(gram, dim1=1, dim2=2).clamp_min(1e-300).rsqrt()
    g = gram * scale[:, :, None] * scale[:, None, :]
    r = rhs * scale
    eye = torch.eye(n, dtype=g.dtype, device=g.device)

    def solve_on(gs: Any, rs: Any, p: Any) -> Any:
        pf = p.to(gs.dtype)
        sub = gs * pf[:, :, None] * pf[:, None, :] + torch.diag_embed(1.0 - pf)
        chol, info = torch.linalg.cholesky_ex(sub)
        if bool((info != 0).any()):
            chol = torch.linalg.cholesky(sub + 1e-10 * eye)
        return torch.cholesky_solve((rs * pf)[:, :, None], chol)[:, :, 0] * pf

    passive = (torch.ones((batch, n), dtype=torch.bool, device=r.device) if start is None
               else start.clone())
    x = torch.zeros_like(r)
    todo = torch.arange(batch, device=r.device)
    for _ in range(n + 1):  # prune to a feasible, set-optimal start
        s = solve_on(g[todo], r[todo], passive[todo])
        keep = passive[todo] & (s > 0)
        x[todo] = s * keep
        changed = (keep != passive[todo]).any(dim=1)
        passive[todo] = keep
        todo = todo[changed]
        if todo.numel() == 0:
            break
    tol = 1e-10 * (r.abs().amax(dim=1) + 1e-300)
    todo = torch.arange(batch, device=r.device)
    for _ in range(max_iter or 3 * n):
        gt, rt, xt, pt = g[todo], r[todo], x[todo], passive[todo]
        grad = rt - (gt @ xt[:, :, None])[:, :, 0]
        best, j = torch.where(pt, -torch.inf, grad).max(dim=1)
        moving = best > tol[todo]
        todo, gt, rt, xt, pt, j = (t[moving] for t in (todo, gt, rt, xt, pt, j))
        if todo.numel() == 0:
            break
        pt[torch.arange(todo.numel(), device=r.device), j] = True
        sub = torch.arange(todo.numel(), device=r.device)
        for _ in range(n):
            s = solve_on(gt[sub], rt[sub], pt[sub])
            infeasible = pt[sub] & (s <= 0)
            bad = infeasible.any(dim=1)
            xt[sub[~bad]] = s[~bad]
            if not bool(bad.any()):
                break
            sub, s, infeasible = sub[bad], s[bad], infeasible[bad]
            xs = xt[sub]
            ratio = torch.where(infeasible, xs / (xs - s).clamp_min(1e-300), torch.inf)
            stepped = xs + ratio.amin(dim=1).clamp(0.0, 1.0)[:, None] * (s - xs)
            tiny = 1e-14 * stepped.abs().amax(dim=1, keepdim=True)
            still = pt[sub] & (stepped > tiny)
            pt[sub] = still
            xt[sub] = stepped * still
        x[todo], passive[todo] = xt, pt
    return (x * scale).clamp_min(0.0)


def _chi2(b: Any, gram: Any, rhs: Any, x: Any) -> Any:
    """Return ||A x − b||² = bᵀb − 2 xᵀAᵀb + xᵀAᵀA x for a batch, shape (batch,)."""
    return ((b**2).sum(dim=1) - 2 * (x * rhs).sum(dim=1)
            + (x * (gram @ x[:, :, None])[:, :, 0]).sum(dim=1)).clamp_min(0.0)


def _apply(weights: Any, design: Any) -> Any:
    """Σ_k weights_k design_k: (batch, n) and (batch, n, n_pix) -> (batch, n_pix)."""
    return (weights[:, None, :] @ design)[:, 0, :]


@dataclass
class _Linear:
    """Linear fits of a batch at fixed nonlinear parameters."""

    weights: Any  # (batch, n_templates)
    bestfit: Any  # (batch, n_pix)
    chi2: Any  # (batch,) data χ² (not per degree of freedom)


def _linear(design: Any, weight: Any, galaxy: Any, start: Any | None = None
            ) -> tuple[Any, Any]:
    """Non-negative fit of ``design`` to ``galaxy`` with pixel weights 1/noise.

    Parameters
    ----------
    design : Tensor, shape (batch, n, n_pix)
    weight : Tensor, shape (batch, n_pix)
        1/noise on the fitted bins, 0 elsewhere.
    galaxy : Tensor, shape (batch, n_pix)
    start : Tensor of bool, shape (batch, n), optional
        Guess of the positive weights (:func:`nnls`).

    Returns
    -------
    weights : Tensor, shape (batch, n)
    chi2 : Tensor, shape (batch,)
        Data χ², from the normal equations.
    """
    a = design * weight[:, None, :]
    b = galaxy * weight
    gram = a @ a.mT
    rhs = (a @ b[:, :, None])[:, :, 0]
    x = nnls(gram, rhs, start)
    return x, _chi2(b, gram, rhs, x)


def _jacobian_columns(tp: _Templates, rfft: Any, weights: Any, vel: Any, sig: Any) -> Any:
    """Model at fixed weights and its derivatives in V and σ (per km/s), (batch, 3, n_pix).

    With T_w the weighted sum of the template transforms and K pPXF's Gaussian LOSVD
    transform exp(-i v ω - σ² ω² / 2) (v, σ in pixels), ∂/∂v = IFFT(-i ω T_w K) and
    ∂/∂σ = IFFT(-σ ω² T_w K): one FFT each instead of pPXF's finite differences.
    """
    torch = _torch()
    shaped = (weights.to(rfft.dtype) @ rfft) * _kernel(tp, vel, sig)
    s_pix = (sig / tp.velscale)[:, None]
    cols = torch.stack([shaped, -1j * tp.omega * shaped, -s_pix * tp.omega**2 * shaped], dim=1)
    conv = torch.fft.irfft(cols, n=tp.npad, dim=2)[:, :, :tp.n_pix]
    return conv * torch.tensor([1.0, 1 / tp.velscale, 1 / tp.velscale], dtype=conv.dtype,
                               device=conv.device)[:, None]


def _damped_kinematics(tp: _Templates, rfft: Any, galaxy: Any, weight: Any, vel: Any,
                       sig: Any, a_v: Any | None, sigma_range: tuple[float, float]
                       ) -> tuple[Any, Any, Any | None, _Linear]:
    """Levenberg-Marquardt in (V, σ[, A_V]) with exact non-negative weights at every point.

    Each iteration computes only the spectra that have not converged (χ² gain of an accepted
    step below :data:`LM_FTOL`, or a damping grown past 1e6 by rejected steps).

    Parameters
    ----------
    tp : _Templates
    rfft : Tensor, shape (n, n_freq)
        The templates fitted (coarse stars, or gas).
    galaxy, weight : Tensor, shape (batch, n_pix)
        Spectrum and 1/noise on the fitted bins (0 elsewhere).
    vel, sig : Tensor, shape (batch,)
        Start, km/s.
    a_v : Tensor, shape (batch,), or None
        Start A_V (mag); None: no attenuation (gas).
    sigma_range : tuple of float
        Bounds of σ, km/s.

    Returns
    -------
    vel, sig, a_v : Tensor, shape (batch,)
        The converged parameters (``a_v`` None when not fitted).
    fit : _Linear
        The linear fit there.
    """
    torch = _torch()
    dusty = a_v is not None
    v0 = vel.clone()
    if a_v is None:
        a_v = torch.zeros_like(vel)

    def evaluate(idx: Any, v: Any, s: Any, av: Any, start: Any | None
                 ) -> tuple[Any, Any, Any, Any]:
        conv = convolve(tp, rfft, v, s)
        att = torch.exp(av[:, None] * tp.ln_att1) if dusty else torch.ones_like(conv[:, 0])
        design = conv * att[:, None, :]
        x, chi2 = _linear(design, weight[idx], galaxy[idx], start=start)
        return x, chi2, att, design

    todo = torch.arange(vel.numel(), device=vel.device)
    x, chi2, att, design = evaluate(todo, vel, sig, a_v, None)
    fit = _Linear(x, _apply(x, design), chi2)
    damping = torch.full_like(vel, 1e-3)
    for _ in range(LM_ITERATIONS):
        w, gal, at, fw = weight[todo], galaxy[todo], att[todo], fit.weights[todo]
        v, s, av = vel[todo], sig[todo], a_v[todo]
        cols = _jacobian_columns(tp, rfft, fw, v, s)
        jac = torch.stack([cols[:, 1] * at, cols[:, 2] * at, cols[:, 0] * at * tp.ln_att1],
                          dim=1)
        jw = _project_out((jac if dusty else jac[:, :2]) * w[:, None, :],
                          design[todo] * w[:, None, :], fw > 0)
        jtj = jw @ jw.mT
        jtr = (jw @ ((gal - fit.bestfit[todo]) * w)[:, :, None])[:, :, 0]
        diag = torch.diagonal(jtj, dim1=1, dim2=2)
        load = damping[todo, None] * diag + 1e-12 * diag.amax(dim=1, keepdim=True)
        step = torch.linalg.solve(jtj + torch.diag_embed(load), jtr)
        step[:, :2] = step[:, :2].clamp(-LM_MAX_STEP_KMS, LM_MAX_STEP_KMS)
        v_new = torch.minimum(torch.maximum(v + step[:, 0], v0[todo] - V_BOUND_KMS),
                              v0[todo] + V_BOUND_KMS)
        s_new = (s + step[:, 1]).clamp(*sigma_range)
        av_new = (av + step[:, 2]).clamp(*AV_RANGE) if dusty else av
        x, chi2, att_new, trial_design = evaluate(todo, v_new, s_new, av_new, fw > 0)
        old = fit.chi2[todo]
        better = chi2 < old
        gain = (old - chi2) / old.clamp_min(1e-300)
        up = todo[better]
        vel[up], sig[up], a_v[up], att[up] = v_new[better], s_new[better], av_new[better], \
            att_new[better]
        fit.weights[up], fit.chi2[up] = x[better], chi2[better]
        design[up] = trial_design[better]
        fit.bestfit[up] = _apply(x[better], trial_design[better])
        damping[todo] = torch.where(better, damping[todo] / 3, damping[todo] * 4)
        converged = (better & (gain < LM_FTOL)) | (damping[todo] > 1e6)
        todo = todo[~converged]
        if todo.numel() == 0:
            break
    return vel, sig, a_v if dusty else None, fit


def _project_out(jac_w: Any, design_w: Any, active: Any) -> Any:
    """Remove from each Jacobian row its part in the span of the active templates.

    The nonlinear parameters' Jacobian of variable projection (Kaufman 1975): with the
    weights re-solved at every point, a change of the model that the templates themselves
    can absorb is no change of χ². Without this projection the steps in A_V, whose effect
    the stellar weights largely absorb, were 50x too short on dusty spectra (stage 1 stalled
    at A_V 0.6 where pPXF found 1.3, measured).

    Parameters
    ----------
    jac_w : Tensor, shape (batch, n_par, n_pix)
        Noise-weighted derivatives of the model.
    design_w : Tensor, shape (batch, n, n_pix)
        Noise-weighted templates at the current point.
    active : Tensor of bool, shape (batch, n)
        The templates with positive weight (the others are held at zero by the bounds).
    """
    torch = _torch()
    a = design_w * active[:, :, None]
    gram = a @ a.mT + torch.diag_embed((~active).to(a.dtype))
    scale = torch.diagonal(gram, dim1=1, dim2=2).rsqrt()
    coef = torch.linalg.solve(gram * scale[:, :, None] * scale[:, None, :],
                              (a @ jac_w.mT) * scale[:, :, None]) * scale[:, :, None]
    return jac_w - coef.mT @ a


@dataclass
class _Full:
    """Stage 3's state for a batch."""

    kin: Any  # (batch, 4): stellar V, σ, gas V, σ (km/s)
    a_v: Any  # (batch,)
    conv_gas: Any  # (batch, n_gas, n_pix), the gas templates at the gas kinematics
    fit: _Linear


@dataclass
class _Convolved:
    """Every template convolved at one set of kinematics, with what every A_V shares."""

    stars: Any  # (batch, n_stars, n_pix), unattenuated
    gas: Any  # (batch, n_gas, n_pix)
    stars_w: Any  # stars × 1/noise
    gas_w: Any  # gas × 1/noise
    gram_gas: Any  # (batch, n_gas, n_gas), with the regularisation's gas block
    rhs_gas: Any  # (batch, n_gas)
    galaxy_w: Any  # (batch, n_pix) galaxy × 1/noise
    scratch: Any  # like stars: every A_V's attenuated columns, in one reused buffer


def _full_conv(tp: _Templates, kin: Any, galaxy: Any, weight: Any) -> _Convolved:
    """Convolve every template at ``kin`` (batch, 4) and the parts that do not depend on A_V."""
    torch = _torch()
    stars = convolve(tp, tp.rfft_stars, kin[:, 0], kin[:, 1])
    gas = convolve(tp, tp.rfft_gas, kin[:, 2], kin[:, 3])
    n_stars = stars.shape[1]
    gas_w = gas * weight[:, None, :]
    galaxy_w = galaxy * weight
    return _Convolved(stars, gas, stars * weight[:, None, :], gas_w,
                      gas_w @ gas_w.mT + tp.reg_gram[n_stars:, n_stars:],
                      (gas_w @ galaxy_w[:, :, None])[:, :, 0], galaxy_w,
                      torch.empty_like(stars))


def _full_fit(tp: _Templates, conv: _Convolved, a_v: Any,
              start: Any | None = None) -> tuple[Any, Any]:
    """Every template (stars attenuated by ``a_v``), regularised: stage 3's linear fit.

    The normal equations are built by blocks, so that only the stellar rows are touched
    per A_V: [[SSᵀ, SGᵀ], [GSᵀ, GGᵀ]] + RᵀR, with S the attenuated, noise-weighted stellar
    templates and G the gas ones. The data χ² comes from the same products,
    bᵀb − 2 xᵀAᵀb + xᵀAᵀA x, so the model itself is built only for the fit that is kept
    (:func:`_model`).

    Returns
    -------
    weights : Tensor, shape (batch, n_templates)
    chi2 : Tensor, shape (batch,)
        Data χ² (not per degree of freedom).
    """
    torch = _torch()
    # Into a buffer reused by every A_V: a fresh (batch, n_stars, n_pix) tensor per fit
    # costs as much as the normal equations (page faults), measured.
    s_w = torch.mul(conv.stars_w, torch.exp(a_v[:, None] * tp.ln_att1)[:, None, :],
                    out=conv.scratch)
    cross = s_w @ conv.gas_w.mT
    data = torch.cat([torch.cat([s_w @ s_w.mT, cross], dim=2),
                      torch.cat([cross.mT, conv.gram_gas], dim=2)], dim=1)
    rhs = torch.cat([(s_w @ conv.galaxy_w[:, :, None])[:, :, 0], conv.rhs_gas], dim=1)
    x = nnls(data + tp.reg_gram, rhs, start)
    return x, _chi2(conv.galaxy_w, data, rhs, x)


def _model(tp: _Templates, conv: _Convolved, a_v: Any, weights: Any) -> Any:
    """Return the best-fitting model on every bin, shape (batch, n_pix)."""
    torch = _torch()
    n_stars = conv.stars.shape[1]
    att = torch.exp(a_v[:, None] * tp.ln_att1)
    return att * _apply(weights[:, :n_stars], conv.stars) + _apply(weights[:, n_stars:],
                                                                   conv.gas)


def _refine_av(tp: _Templates, conv: _Convolved, a_v: Any, start: Any) -> tuple[_Linear, Any]:
    """Best linear fit over A_V by data χ²: three fits around ``a_v`` and the parabola's vertex."""
    torch = _torch()
    centre = a_v.clamp_min(AV_STEP)
    avs = [centre + d * AV_STEP for d in (-1, 0, 1)]
    fits = [_full_fit(tp, conv, av, start) for av in avs]
    obj = torch.stack([f[1] for f in fits], dim=1)
    curvature = obj[:, 0] - 2 * obj[:, 1] + obj[:, 2]
    shift = (0.5 * (obj[:, 0] - obj[:, 2]) / torch.where(curvature > 0, curvature, 1.0)
             ).clamp(-3.0, 3.0)
    avs.append(torch.where(curvature > 0, (centre + shift * AV_STEP).clamp_min(0.0), centre))
    fits.append(_full_fit(tp, conv, avs[3], start))
    chi2 = torch.stack([f[1] for f in fits], dim=1)
    chi2[:, 3] = torch.where(curvature > 0, chi2[:, 3], torch.inf)
    pick = chi2.argmin(dim=1)
    rows = torch.arange(pick.numel(), device=pick.device)
    weights = torch.stack([f[0] for f in fits], dim=1)[rows, pick]
    a_v_best = torch.stack(avs, dim=1)[rows, pick]
    return (_Linear(weights, _model(tp, conv, a_v_best, weights), chi2[rows, pick]),
            a_v_best)


def _gauss_newton_step(tp: _Templates, galaxy: Any, weight: Any, state: _Full) -> tuple[Any, Any]:
    """One Gauss-Newton step in all five nonlinear parameters at fixed weights (per spectrum).

    As :func:`desomdb.science.fastfit._gauss_newton_step`: gas kinematics held where the
    fitted lines have S/N below :data:`GN_GAS_MIN_SNR`; every V, σ step at most 50 km/s,
    σ_* ≥ 10 km/s, σ_gas ≥ 1 km/s, A_V in [0, 4].
    """
    torch = _torch()
    n_stars = tp.rfft_stars.shape[0]
    kin, a_v, fit = state.kin, state.a_v, state.fit
    att = torch.exp(a_v[:, None] * tp.ln_att1)
    stars = _jacobian_columns(tp, tp.rfft_stars, fit.weights[:, :n_stars], kin[:, 0], kin[:, 1])
    gas = _jacobian_columns(tp, tp.rfft_gas, fit.weights[:, n_stars:], kin[:, 2], kin[:, 3])
    jac = torch.stack([stars[:, 1] * att, stars[:, 2] * att, stars[:, 0] * att * tp.ln_att1,
                       gas[:, 1], gas[:, 2]], dim=1)
    gas_snr = ((gas[:, 0] * weight) ** 2).sum(dim=1).sqrt()
    free = torch.ones((kin.shape[0], 5), dtype=torch.bool, device=kin.device)
    free[:, 3:] = (gas_snr >= GN_GAS_MIN_SNR)[:, None]
    jw = jac * weight[:, None, :] * free[:, :, None]
    jtj = jw @ jw.mT + torch.diag_embed((~free).to(jw.dtype))
    jtr = (jw @ ((galaxy - fit.bestfit) * weight)[:, :, None])[:, :, 0]
    step = torch.linalg.lstsq(jtj, jtr[:, :, None]).solution[:, :, 0]
    step = torch.where(free, step, torch.zeros_like(step))
    new = kin + step[:, [0, 1, 3, 4]].clamp(-50.0, 50.0)
    new[:, 1] = new[:, 1].clamp_min(10.0)
    new[:, 3] = new[:, 3].clamp_min(1.0)
    return new, (a_v + step[:, 2]).clamp(*AV_RANGE)


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
    tp = _templates(setup, device, float(regul))
    gal = torch.as_tensor(galaxy, dtype=torch.float64, device=device)
    weight = torch.where(torch.as_tensor(good, device=device),
                         1.0 / torch.as_tensor(noise, dtype=torch.float64, device=device), 0.0)
    n = gal.shape[0]
    zeros = torch.zeros(n, dtype=torch.float64, device=device)
    # Stage 1: stars on the line-free bins, coarse templates, dust.
    vel, sig, a_v, stars = _damped_kinematics(
        tp, tp.rfft_coarse, gal, weight * ~tp.line_bins, zeros.clone(), zeros + 100.0,
        zeros + 0.3, SIGMA_RANGE_KMS)
    assert a_v is not None
    # Stage 2: gas on the continuum-subtracted line windows.
    vel_gas, sig_gas, _, _ = _damped_kinematics(
        tp, tp.rfft_gas, gal - stars.bestfit, weight * tp.line_bins, vel.clone(),
        zeros + 60.0, None, SIGMA_GAS_RANGE_KMS)
    # Stage 3: every template, Gauss-Newton in all five parameters, A_V on a parabola.
    kin = torch.stack([vel, sig, vel_gas, sig_gas], dim=1)
    conv = _full_conv(tp, kin, gal, weight)
    weights, chi2 = _full_fit(tp, conv, a_v)
    best = _Full(kin, a_v, conv.gas, _Linear(weights, _model(tp, conv, a_v, weights), chi2))
    alive = torch.ones(n, dtype=torch.bool, device=device)
    for _ in range(GN_ITERATIONS):
        new_kin, new_av = _gauss_newton_step(tp, gal, weight, best)
        conv = _full_conv(tp, new_kin, gal, weight)
        fit, av_fit = _refine_av(tp, conv, new_av, best.fit.weights > 0)
        better = alive & (fit.chi2 < best.fit.chi2)
        alive &= better
        b1, b2 = better[:, None], better[:, None, None]
        best = _Full(torch.where(b1, new_kin, best.kin), torch.where(better, av_fit, best.a_v),
                     torch.where(b2, conv.gas, best.conv_gas),
                     _Linear(torch.where(b1, fit.weights, best.fit.weights),
                             torch.where(b1, fit.bestfit, best.fit.bestfit),
                             torch.where(better, fit.chi2, best.fit.chi2)))
        if not bool(alive.any()):
            break
    return _results(setup, tp, best, noise, good)


def _results(setup: FitSetup, tp: _Templates, best: _Full, noise: np.ndarray,
             good: np.ndarray) -> list[tuple[LinearFit, float]]:
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
