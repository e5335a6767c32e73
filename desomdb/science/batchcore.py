"""The batched fitter's maths, on torch alone: convolutions, bounded least squares, Gauss-Newton.

Everything here needs only numpy and torch, so that ``benchmarks/bench_gpu.py`` can run it on a
machine without the rest of the package (a lent GPU). :mod:`desomdb.science.batchfit` builds
the inputs from a fit set-up and turns the results into labels; the stages are described
there. Shapes: templates × bins (every FFT along the last, contiguous axis, 2.4x faster than
along the first, measured); V and σ in km/s, A_V in mag; everything float64.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

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


@dataclass
class Templates:
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
    #: The fast fitter's stage-3 settings (``fitsetup.AV_STEP``, ``GN_GAS_MIN_SNR``,
    #: ``GN_ITERATIONS``).
    av_step: float
    gas_min_snr: float
    gn_iterations: int

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return every field as a numpy array (for ``np.savez``; complex kept complex)."""
        return {f.name: np.asarray(getattr(self, f.name).cpu() if torch.is_tensor(
            getattr(self, f.name)) else getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: Any, device: str) -> Templates:
        """Rebuild from :meth:`to_arrays` output (an ``np.load`` of it) on ``device``."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            a = np.asarray(arrays[f.name])
            values[f.name] = (torch.as_tensor(a, device=device) if a.ndim else
                              (int(a) if f.name in ("npad", "n_pix", "gn_iterations")
                               else float(a)))
        return cls(**values)


def _kernel(tp: Templates, vel: Any, sig: Any) -> Any:
    """Return pPXF's Gaussian LOSVD in Fourier space, shape (batch, n_freq); V, σ in km/s."""
    v_pix = vel / tp.velscale + tp.vsyst
    s_pix = sig / tp.velscale
    return torch.exp(torch.complex(-0.5 * (s_pix[:, None] * tp.omega) ** 2,
                                   -v_pix[:, None] * tp.omega))


def convolve(tp: Templates, rfft: Any, vel: Any, sig: Any) -> Any:
    """Templates convolved with each spectrum's LOSVD, shape (batch, n_templates, n_pix).

    Parameters
    ----------
    tp : Templates
    rfft : Tensor, shape (n_templates, n_freq)
        Template transforms (one of ``tp.rfft_*``).
    vel, sig : Tensor, shape (batch,)
        V and σ, km/s.
    """
    batch, n = vel.shape[0], rfft.shape[0]
    # Both operands expanded to the full shape: torch's broadcasting complex product is
    # 3.5x slower than the same product on expanded views (measured, one thread).
    shaped = rfft.expand(batch, -1, -1) * _kernel(tp, vel, sig)[:, None, :].expand(-1, n, -1)
    return torch.fft.irfft(shaped, n=tp.npad, dim=2)[:, :, :tp.n_pix]


#: Rounds of block principal pivoting before a spectrum falls back to Lawson-Hanson.
PIVOT_ROUNDS = 30
#: Rounds without fewer infeasible variables before pivoting swaps one variable at a time
#: (Júdice & Pires 1994's back-up rule, which guarantees termination).
PIVOT_PATIENCE = 3


def nnls(gram: Any, rhs: Any, start: Any | None = None, max_iter: int | None = None) -> Any:
    """Solve min ½ xᵀ G x − rᵀ x subject to x ≥ 0 for a batch of problems.

    This is min ||A x − b||² with G = AᵀA and r = Aᵀb, the normal equations of the weights.
    Two exact methods, each on every spectrum's own passive set (the other rows and columns
    replaced by the identity, one batched Cholesky factorisation per step; only the spectra
    still moving are carried into the next step):

    1. Block principal pivoting (Kim & Park 2011, Júdice & Pires 1994): solve on the passive
       set, then move every variable that breaks the optimality conditions (a passive
       weight ≤ 0, or a held weight whose gradient points inward) to the other set at once.
       From a warm start (``start``, e.g. the previous solve's positive set) it usually ends
       in two or three solves, where Lawson-Hanson frees one variable per solve.
    2. A spectrum not done after :data:`PIVOT_ROUNDS` rounds falls back to Lawson-Hanson
       (Lawson & Hanson 1974), from its start pruned of the variables whose least-squares
       value is not positive (a feasible, set-optimal point, as that method requires).

    With G positive definite (every fit here is regularised) the solution is unique, so the
    methods give the same answer. The matrix is scaled to a unit diagonal first
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
        Lawson-Hanson's outer iterations (each frees at most one variable); default 3 n.

    Returns
    -------
    Tensor, shape (batch, n)
        The non-negative solution.
    """
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

    tol = 1e-10 * (r.abs().amax(dim=1) + 1e-300)
    start = (torch.ones((batch, n), dtype=torch.bool, device=r.device) if start is None
             else start)
    x, todo = _block_pivoting(g, r, start.clone(), tol, solve_on)
    if todo.numel():
        x[todo] = _lawson_hanson(g[todo], r[todo], start[todo].clone(), tol[todo], solve_on,
                                 max_iter or 3 * n)
    return (x * scale).clamp_min(0.0)


def _block_pivoting(g: Any, r: Any, passive: Any, tol: Any, solve_on: Any
                    ) -> tuple[Any, Any]:
    """Block principal pivoting on scaled normal equations (see :func:`nnls`).

    Returns
    -------
    x : Tensor, shape (batch, n)
        The solution where found, 0 elsewhere.
    todo : Tensor of int, shape (k,)
        The spectra not done within :data:`PIVOT_ROUNDS` rounds.
    """
    batch, n = r.shape
    x = torch.zeros_like(r)
    fewest = torch.full((batch,), n + 1, dtype=torch.long, device=r.device)
    patience = torch.full((batch,), PIVOT_PATIENCE, dtype=torch.long, device=r.device)
    todo = torch.arange(batch, device=r.device)
    columns = torch.arange(n, device=r.device)
    for _ in range(PIVOT_ROUNDS):
        gt, rt, pt = g[todo], r[todo], passive[todo]
        s = solve_on(gt, rt, pt)
        grad = (gt @ s[:, :, None])[:, :, 0] - rt
        bad = torch.where(pt, s <= 0, grad < -tol[todo, None])
        count = bad.sum(dim=1)
        done = count == 0
        x[todo[done]] = s[done]
        fewer = count < fewest[todo]
        fewest[todo] = torch.where(fewer, count, fewest[todo])
        patience[todo] = torch.where(fewer, PIVOT_PATIENCE, patience[todo] - 1)
        # Back-up rule: once patience runs out, swap only the last infeasible variable.
        last = torch.where(bad, columns, -1).amax(dim=1, keepdim=True)
        swap = torch.where((patience[todo] >= 0)[:, None], bad, columns == last)
        passive[todo] = pt ^ swap
        todo = todo[~done]
        if todo.numel() == 0:
            break
    return x, todo


def _lawson_hanson(g: Any, r: Any, passive: Any, tol: Any, solve_on: Any, max_iter: int
                   ) -> Any:
    """Lawson-Hanson's active-set method on scaled normal equations (see :func:`nnls`)."""
    batch, n = r.shape
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
    todo = torch.arange(batch, device=r.device)
    for _ in range(max_iter):
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
    return x


def _chi2(b: Any, gram: Any, rhs: Any, x: Any) -> Any:
    """Return ||A x − b||² = bᵀb − 2 xᵀAᵀb + xᵀAᵀA x for a batch, shape (batch,)."""
    return ((b**2).sum(dim=1) - 2 * (x * rhs).sum(dim=1)
            + (x * (gram @ x[:, :, None])[:, :, 0]).sum(dim=1)).clamp_min(0.0)


def _apply(weights: Any, design: Any) -> Any:
    """Σ_k weights_k design_k: (batch, n) and (batch, n, n_pix) -> (batch, n_pix)."""
    return (weights[:, None, :] @ design)[:, 0, :]


@dataclass
class Linear:
    """Linear fits of a batch at fixed nonlinear parameters."""

    weights: Any  # (batch, n_templates)
    bestfit: Any  # (batch, n_pix)
    chi2: Any  # (batch,) data χ² (not per degree of freedom)


def _linear(design_w: Any, galaxy_w: Any, start: Any | None = None) -> tuple[Any, Any]:
    """Non-negative fit of noise-weighted templates to a noise-weighted spectrum.

    Parameters
    ----------
    design_w : Tensor, shape (batch, n, n_pix)
        Templates × 1/noise (0 off the fitted bins).
    galaxy_w : Tensor, shape (batch, n_pix)
        Spectrum × 1/noise.
    start : Tensor of bool, shape (batch, n), optional
        Guess of the positive weights (:func:`nnls`).

    Returns
    -------
    weights : Tensor, shape (batch, n)
    chi2 : Tensor, shape (batch,)
        Data χ², from the normal equations.
    """
    gram = design_w @ design_w.mT
    rhs = (design_w @ galaxy_w[:, :, None])[:, :, 0]
    x = nnls(gram, rhs, start)
    return x, _chi2(galaxy_w, gram, rhs, x)


def _jacobian_columns(tp: Templates, rfft: Any, weights: Any, vel: Any, sig: Any) -> Any:
    """Model at fixed weights and its derivatives in V and σ (per km/s), (batch, 3, n_pix).

    With T_w the weighted sum of the template transforms and K pPXF's Gaussian LOSVD
    transform exp(-i v ω - σ² ω² / 2) (v, σ in pixels), ∂/∂v = IFFT(-i ω T_w K) and
    ∂/∂σ = IFFT(-σ ω² T_w K): one FFT each instead of pPXF's finite differences.
    """
    shaped = (weights.to(rfft.dtype) @ rfft) * _kernel(tp, vel, sig)
    s_pix = (sig / tp.velscale)[:, None]
    cols = torch.stack([shaped, -1j * tp.omega * shaped, -s_pix * tp.omega**2 * shaped], dim=1)
    conv = torch.fft.irfft(cols, n=tp.npad, dim=2)[:, :, :tp.n_pix]
    return conv * torch.tensor([1.0, 1 / tp.velscale, 1 / tp.velscale], dtype=conv.dtype,
                               device=conv.device)[:, None]


def _damped_kinematics(tp: Templates, rfft: Any, galaxy: Any, weight: Any, vel: Any,
                       sig: Any, a_v: Any | None, sigma_range: tuple[float, float],
                       pixels: Any | None = None) -> tuple[Any, Any, Any | None, Linear]:
    """Levenberg-Marquardt in (V, σ[, A_V]) with exact non-negative weights at every point.

    Each iteration computes only the spectra that have not converged (χ² gain of an accepted
    step below :data:`LM_FTOL`, or a damping grown past 1e6 by rejected steps).

    Parameters
    ----------
    tp : Templates
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
    pixels : Tensor of int, shape (m,), optional
        The only bins with a non-zero weight (the line windows for the gas, the bins outside
        them for the stars): everything but the FFTs is computed on them alone.

    Returns
    -------
    vel, sig, a_v : Tensor, shape (batch,)
        The converged parameters (``a_v`` None when not fitted).
    fit : Linear
        The linear fit there (its model on every bin).
    """
    dusty = a_v is not None
    v0 = vel.clone()
    if a_v is None:
        a_v = torch.zeros_like(vel)

    def on_pixels(x: Any) -> Any:
        return x if pixels is None else x[..., pixels]

    # Everything in the loop is noise-weighted and on the weighted bins only.
    weight_p, ln_att1 = on_pixels(weight), on_pixels(tp.ln_att1)
    galaxy_w = on_pixels(galaxy) * weight_p

    def evaluate(idx: Any, v: Any, s: Any, av: Any, start: Any | None
                 ) -> tuple[Any, Any, Any, Any]:
        conv = on_pixels(convolve(tp, rfft, v, s))
        att = torch.exp(av[:, None] * ln_att1) if dusty else torch.ones_like(conv[:, 0])
        design_w = conv * (att * weight_p[idx])[:, None, :]
        x, chi2 = _linear(design_w, galaxy_w[idx], start=start)
        return x, chi2, att, design_w

    todo = torch.arange(vel.numel(), device=vel.device)
    x, chi2, att, design_w = evaluate(todo, vel, sig, a_v, None)
    weights, chi2_best = x, chi2
    bestfit_w = _apply(x, design_w)
    damping = torch.full_like(vel, 1e-3)
    for _ in range(LM_ITERATIONS):
        w, at, fw = weight_p[todo], att[todo], weights[todo]
        v, s, av = vel[todo], sig[todo], a_v[todo]
        cols = on_pixels(_jacobian_columns(tp, rfft, fw, v, s))
        jac = torch.stack([cols[:, 1], cols[:, 2], cols[:, 0] * ln_att1], dim=1) \
            if dusty else cols[:, 1:]
        jw = _project_out(jac * (at * w)[:, None, :], design_w[todo], fw > 0)
        jtj = jw @ jw.mT
        jtr = (jw @ (galaxy_w[todo] - bestfit_w[todo])[:, :, None])[:, :, 0]
        diag = torch.diagonal(jtj, dim1=1, dim2=2)
        load = damping[todo, None] * diag + 1e-12 * diag.amax(dim=1, keepdim=True)
        step = torch.linalg.solve(jtj + torch.diag_embed(load), jtr)
        step[:, :2] = step[:, :2].clamp(-LM_MAX_STEP_KMS, LM_MAX_STEP_KMS)
        v_new = torch.minimum(torch.maximum(v + step[:, 0], v0[todo] - V_BOUND_KMS),
                              v0[todo] + V_BOUND_KMS)
        s_new = (s + step[:, 1]).clamp(*sigma_range)
        av_new = (av + step[:, 2]).clamp(*AV_RANGE) if dusty else av
        x, chi2, att_new, trial_w = evaluate(todo, v_new, s_new, av_new, fw > 0)
        old = chi2_best[todo]
        better = chi2 < old
        gain = (old - chi2) / old.clamp_min(1e-300)
        up = todo[better]
        vel[up], sig[up], a_v[up], att[up] = v_new[better], s_new[better], av_new[better], \
            att_new[better]
        weights[up], chi2_best[up] = x[better], chi2[better]
        design_w[up] = trial_w[better]
        bestfit_w[up] = _apply(x[better], trial_w[better])
        damping[todo] = torch.where(better, damping[todo] / 3, damping[todo] * 4)
        converged = (better & (gain < LM_FTOL)) | (damping[todo] > 1e6)
        todo = todo[~converged]
        if todo.numel() == 0:
            break
    # The model on every bin (the next stage reads it where this one had no weight).
    model = _apply(weights, convolve(tp, rfft, vel, sig))
    if dusty:
        model = model * torch.exp(a_v[:, None] * tp.ln_att1)
    fit = Linear(weights, model, chi2_best)
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
    a = design_w * active[:, :, None]
    gram = a @ a.mT + torch.diag_embed((~active).to(a.dtype))
    scale = torch.diagonal(gram, dim1=1, dim2=2).rsqrt()
    coef = torch.linalg.solve(gram * scale[:, :, None] * scale[:, None, :],
                              (a @ jac_w.mT) * scale[:, :, None]) * scale[:, :, None]
    return jac_w - coef.mT @ a


@dataclass
class Full:
    """Stage 3's state for a batch."""

    kin: Any  # (batch, 4): stellar V, σ, gas V, σ (km/s)
    a_v: Any  # (batch,)
    conv_gas: Any  # (batch, n_gas, n_pix), the gas templates at the gas kinematics
    fit: Linear


@dataclass
class _Convolved:
    """Every template convolved at one set of kinematics, with what every A_V shares."""

    stars: Any  # (batch, n_stars, n_pix), unattenuated
    gas: Any  # (batch, n_gas, n_pix)
    weight: Any  # (batch, n_pix) 1/noise on the fitted bins
    #: (batch, n_stars + n_gas + 1, n_pix): rows n_stars: hold gas × 1/noise and
    #: galaxy × 1/noise; rows :n_stars are refilled with the attenuated, noise-weighted
    #: stars of each A_V (a fresh tensor per fit costs as much as the normal equations in
    #: page faults, measured). One product of the stellar rows with the whole buffer gives
    #: the stellar Gram block, the gas cross terms and the stellar right-hand side.
    buffer: Any
    gram_gas: Any  # (batch, n_gas, n_gas), with the regularisation's gas block
    rhs_gas: Any  # (batch, n_gas)


def _full_conv(tp: Templates, kin: Any, galaxy: Any, weight: Any) -> _Convolved:
    """Convolve every template at ``kin`` (batch, 4) and the parts that do not depend on A_V."""
    stars = convolve(tp, tp.rfft_stars, kin[:, 0], kin[:, 1])
    gas = convolve(tp, tp.rfft_gas, kin[:, 2], kin[:, 3])
    n_stars, n_gas = stars.shape[1], gas.shape[1]
    buffer = torch.empty((stars.shape[0], n_stars + n_gas + 1, stars.shape[2]),
                         dtype=stars.dtype, device=stars.device)
    gas_w = torch.mul(gas, weight[:, None, :], out=buffer[:, n_stars:-1])
    galaxy_w = torch.mul(galaxy, weight, out=buffer[:, -1])
    return _Convolved(stars, gas, weight, buffer,
                      gas_w @ gas_w.mT + tp.reg_gram[n_stars:, n_stars:],
                      (gas_w @ galaxy_w[:, :, None])[:, :, 0])


def _full_fit(tp: Templates, conv: _Convolved, a_v: Any,
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
    n_stars = conv.stars.shape[1]
    s_w = torch.mul(conv.stars, (conv.weight * torch.exp(a_v[:, None] * tp.ln_att1))[:, None],
                    out=conv.buffer[:, :n_stars])
    products = s_w @ conv.buffer.mT  # (batch, n_stars, n_stars + n_gas + 1)
    cross = products[:, :, n_stars:-1]
    data = torch.cat([products[:, :, :-1], torch.cat([cross.mT, conv.gram_gas], dim=2)],
                     dim=1)
    rhs = torch.cat([products[:, :, -1], conv.rhs_gas], dim=1)
    x = nnls(data + tp.reg_gram, rhs, start)
    return x, _chi2(conv.buffer[:, -1], data, rhs, x)


def _model(tp: Templates, conv: _Convolved, a_v: Any, weights: Any) -> Any:
    """Return the best-fitting model on every bin, shape (batch, n_pix)."""
    n_stars = conv.stars.shape[1]
    att = torch.exp(a_v[:, None] * tp.ln_att1)
    return att * _apply(weights[:, :n_stars], conv.stars) + _apply(weights[:, n_stars:],
                                                                   conv.gas)


def _refine_av(tp: Templates, conv: _Convolved, a_v: Any, start: Any) -> tuple[Linear, Any]:
    """Best linear fit over A_V by data χ²: three fits around ``a_v`` and the parabola's vertex."""
    centre = a_v.clamp_min(tp.av_step)
    avs = [centre + d * tp.av_step for d in (-1, 0, 1)]
    fits = [_full_fit(tp, conv, av, start) for av in avs]
    obj = torch.stack([f[1] for f in fits], dim=1)
    curvature = obj[:, 0] - 2 * obj[:, 1] + obj[:, 2]
    shift = (0.5 * (obj[:, 0] - obj[:, 2]) / torch.where(curvature > 0, curvature, 1.0)
             ).clamp(-3.0, 3.0)
    avs.append(torch.where(curvature > 0, (centre + shift * tp.av_step).clamp_min(0.0), centre))
    fits.append(_full_fit(tp, conv, avs[3], start))
    chi2 = torch.stack([f[1] for f in fits], dim=1)
    chi2[:, 3] = torch.where(curvature > 0, chi2[:, 3], torch.inf)
    pick = chi2.argmin(dim=1)
    rows = torch.arange(pick.numel(), device=pick.device)
    weights = torch.stack([f[0] for f in fits], dim=1)[rows, pick]
    a_v_best = torch.stack(avs, dim=1)[rows, pick]
    return (Linear(weights, _model(tp, conv, a_v_best, weights), chi2[rows, pick]),
            a_v_best)


def _gauss_newton_step(tp: Templates, galaxy: Any, weight: Any, state: Full) -> tuple[Any, Any]:
    """One Gauss-Newton step in all five nonlinear parameters at fixed weights (per spectrum).

    As :func:`desomdb.science.fastfit._gauss_newton_step`: gas kinematics held where the
    fitted lines have S/N below :data:`tp.gas_min_snr`; every V, σ step at most 50 km/s,
    σ_* ≥ 10 km/s, σ_gas ≥ 1 km/s, A_V in [0, 4].
    """
    n_stars = tp.rfft_stars.shape[0]
    kin, a_v, fit = state.kin, state.a_v, state.fit
    att = torch.exp(a_v[:, None] * tp.ln_att1)
    stars = _jacobian_columns(tp, tp.rfft_stars, fit.weights[:, :n_stars], kin[:, 0], kin[:, 1])
    gas = _jacobian_columns(tp, tp.rfft_gas, fit.weights[:, n_stars:], kin[:, 2], kin[:, 3])
    jac = torch.stack([stars[:, 1] * att, stars[:, 2] * att, stars[:, 0] * att * tp.ln_att1,
                       gas[:, 1], gas[:, 2]], dim=1)
    gas_snr = ((gas[:, 0] * weight) ** 2).sum(dim=1).sqrt()
    free = torch.ones((kin.shape[0], 5), dtype=torch.bool, device=kin.device)
    free[:, 3:] = (gas_snr >= tp.gas_min_snr)[:, None]
    jw = jac * weight[:, None, :] * free[:, :, None]
    jtj = jw @ jw.mT + torch.diag_embed((~free).to(jw.dtype))
    jtr = (jw @ ((galaxy - fit.bestfit) * weight)[:, :, None])[:, :, 0]
    step = torch.linalg.lstsq(jtj, jtr[:, :, None]).solution[:, :, 0]
    step = torch.where(free, step, torch.zeros_like(step))
    new = kin + step[:, [0, 1, 3, 4]].clamp(-50.0, 50.0)
    new[:, 1] = new[:, 1].clamp_min(10.0)
    new[:, 3] = new[:, 3].clamp_min(1.0)
    return new, (a_v + step[:, 2]).clamp(*AV_RANGE)


def solve(tp: Templates, galaxy: Any, weight: Any) -> Full:
    """Fit a batch of spectra: the three stages of :mod:`desomdb.science.batchfit`.

    Parameters
    ----------
    tp : Templates
    galaxy : Tensor, shape (batch, n_pix)
        Normalised spectra.
    weight : Tensor, shape (batch, n_pix)
        1/noise on the bins to fit, 0 elsewhere.

    Returns
    -------
    Full
        Kinematics, A_V, the gas templates as fitted and the final linear fit, per spectrum.
    """
    n = galaxy.shape[0]
    device = galaxy.device
    gal = galaxy
    zeros = torch.zeros(n, dtype=torch.float64, device=device)
    # Stage 1: stars on the line-free bins, coarse templates, dust.
    vel, sig, a_v, stars = _damped_kinematics(
        tp, tp.rfft_coarse, gal, weight * ~tp.line_bins, zeros.clone(), zeros + 100.0,
        zeros + 0.3, SIGMA_RANGE_KMS, pixels=torch.nonzero(~tp.line_bins)[:, 0])
    assert a_v is not None
    # Stage 2: gas on the continuum-subtracted line windows.
    vel_gas, sig_gas, _, _ = _damped_kinematics(
        tp, tp.rfft_gas, gal - stars.bestfit, weight * tp.line_bins, vel.clone(),
        zeros + 60.0, None, SIGMA_GAS_RANGE_KMS, pixels=torch.nonzero(tp.line_bins)[:, 0])
    # Stage 3: every template, Gauss-Newton in all five parameters, A_V on a parabola.
    kin = torch.stack([vel, sig, vel_gas, sig_gas], dim=1)
    conv = _full_conv(tp, kin, gal, weight)
    weights, chi2 = _full_fit(tp, conv, a_v)
    best = Full(kin, a_v, conv.gas, Linear(weights, _model(tp, conv, a_v, weights), chi2))
    alive = torch.ones(n, dtype=torch.bool, device=device)
    for _ in range(tp.gn_iterations):
        new_kin, new_av = _gauss_newton_step(tp, gal, weight, best)
        conv = _full_conv(tp, new_kin, gal, weight)
        fit, av_fit = _refine_av(tp, conv, new_av, best.fit.weights > 0)
        better = alive & (fit.chi2 < best.fit.chi2)
        alive &= better
        b1, b2 = better[:, None], better[:, None, None]
        best = Full(torch.where(b1, new_kin, best.kin), torch.where(better, av_fit, best.a_v),
                     torch.where(b2, conv.gas, best.conv_gas),
                     Linear(torch.where(b1, fit.weights, best.fit.weights),
                             torch.where(b1, fit.bestfit, best.fit.bestfit),
                             torch.where(better, fit.chi2, best.fit.chi2)))
        if not bool(alive.any()):
            break
    return best
