"""Verified float64 upper bounds on the largest eigenvalue of PSD (Hermitian) matrices.

The candidate comes from ``eigvalsh``; it is then *proven* an upper bound by a Cholesky
factorization of ``t·I − H`` (Rump-style verification; see docs/soundness.md):

If floating-point Cholesky (any summation order, unit round-off ``u``) succeeds on a symmetric
``A`` of order ``n``, then ``A + ΔA`` is positive semidefinite with
``|ΔA_ij| ≤ γ'·sqrt(a_ii·a_jj)``, ``γ' = γ_{n+1}/(1 − γ_{n+1})`` (Demmel 1989; Higham,
*Accuracy and Stability of Numerical Algorithms*, 2nd ed., Thm 10.5 and §10.1.1), so
``λ_min(A) ≥ −‖ΔA‖_F ≥ −γ'·trace(A)``. Complex Hermitian matrices use the same bound with
``u`` replaced by ``4u`` (Higham §3.6: complex ``+`` costs ``u``, ``×`` at most ``√2·γ_2``).
"""

from __future__ import annotations

import math

import torch

from torchgloro import margins

U64 = 2.0**-53  # unit round-off of IEEE binary64, round to nearest
TINY = 2.0**-1000  # absolute allowance for underflow (subnormals), far above n·2^-1074


def gamma(n: int, u: float = U64) -> float:
    """Higham's ``γ_n = n·u / (1 − n·u)``, rounded up generously."""
    g = margins.gamma(n, u)
    if math.isinf(g):
        raise ValueError(f"gamma({n}) undefined: n·u = {n * u} is not small")
    return math.nextafter(g * (1.0 + 4 * U64), math.inf)


def _hermitian_from_lower(g: torch.Tensor) -> torch.Tensor:
    """The Hermitian matrix LAPACK actually reads (lower triangle, real diagonal)."""
    low = torch.tril(g, -1)
    diag = torch.diagonal(g, dim1=-2, dim2=-1).real.to(g.dtype)
    return low + low.mH + torch.diag_embed(diag)


def lmax_upper(
    h: torch.Tensor, err: torch.Tensor | float = 0.0, candidate: torch.Tensor | None = None
) -> torch.Tensor:
    """Verified upper bounds on ``λ_max(H_exact)`` for a batch of Hermitian matrices.

    Args:
        h: ``(..., n, n)`` float64 or complex128 matrices as computed.
        err: Upper bound(s) on ``‖H_exact − H‖₂`` (broadcast over the batch), where ``H`` is
            the Hermitian matrix formed from the lower triangle of ``h``.
        candidate: Optional estimates of ``λ_max(H)`` (e.g. from Lanczos); by default
            ``eigvalsh`` is used. Only the tightness, never the soundness, depends on it.

    Returns:
        float64 tensor of shape ``h.shape[:-2]``: proven upper bounds on ``λ_max(H_exact)``.
    """
    h = _hermitian_from_lower(h)
    n = h.shape[-1]
    cplx = h.is_complex()
    u = 4 * U64 if cplx else U64
    gp = gamma(n + 1, u)
    gp = gp / (1.0 - gp) * (1.0 + 4 * U64)
    err_t = torch.as_tensor(err, dtype=torch.float64).expand(h.shape[:-2])
    if candidate is None:
        lam = torch.linalg.eigvalsh(h)[..., -1].clamp_min(0.0)
    else:
        lam = candidate.to(torch.float64).clamp_min(0.0) * (1.0 + 1e-5)
    fro = torch.linalg.matrix_norm(h, "fro")
    eye = torch.eye(n, dtype=h.dtype)
    # The Cholesky backward error is ~γ'·trace(A) ≈ n·γ'·t; start the shift above it.
    margin = (2.0 * n * gp + 1e-12) * lam + 2.0 * n * gp * fro + TINY
    out = torch.full_like(lam, math.inf)
    todo = torch.ones_like(lam, dtype=torch.bool)
    for _ in range(10):
        t = lam + margin
        a = t[..., None, None] * eye - h
        _, info = torch.linalg.cholesky_ex(a)
        ok = (info == 0) & todo
        if ok.any():
            diag = torch.diagonal(a, dim1=-2, dim2=-1).real
            # λ_max(H_exact) ≤ t + γ'·tr(A) + (diag rounding 2u·max a_ii) + err + underflow.
            bound = t + gp * diag.sum(-1) + 2 * u * diag.abs().amax(-1) + err_t + n * TINY
            out = torch.where(ok, bound * (1.0 + 16 * U64), out)
            todo = todo & ~ok
        if not todo.any():
            break
        margin = margin * 8.0
    if todo.any():  # never observed; fall back to ‖H‖_F ≥ λ_max (inflated for its round-off)
        fb = fro * (1.0 + gamma(n * n + 2)) + err_t
        out = torch.where(todo, fb, out)
    return out


def sigma_max_upper(a: torch.Tensor, err_fro: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Verified upper bounds on ``σ_max`` of exact matrices near the computed ``a``.

    Args:
        a: ``(..., m, n)`` float64 / complex128 matrices as computed.
        err_fro: Bound(s) on ``‖A_exact − a‖_F`` (Weyl: ``σ(A_exact) ≤ σ(a) + err``).

    Returns:
        float64 tensor of shape ``a.shape[:-2]``.
    """
    m, n = a.shape[-2:]
    if m <= n:
        g, inner = a @ a.mH, n
    else:
        g, inner = a.mH @ a, m
    u = 4 * U64 if a.is_complex() else U64
    # |fl(A^H A) − A^H A| ≤ γ_inner·|A|^H|A| entrywise, so ‖·‖₂ ≤ γ_inner·‖A‖_F².
    fro2 = torch.linalg.matrix_norm(a, "fro") ** 2 * (1.0 + gamma(m * n + 2))
    lam = lmax_upper(g, gamma(inner + 2, u) * fro2)
    err_t = torch.as_tensor(err_fro, dtype=torch.float64)
    return (lam.sqrt() * (1.0 + 4 * U64) + err_t) * (1.0 + 4 * U64)


def lanczos_top(g: torch.Tensor, iters: int = 400, rtol: float = 1e-11) -> torch.Tensor:
    """Estimate of ``λ_max`` of a symmetric float64 matrix (Lanczos, full reorthogonalization).

    Stops when the top Ritz value changes by at most ``rtol`` (relative) over 10 iterations,
    or after ``iters``. Trained Lipschitz layers have flat spectra, where 60 iterations left
    the estimate ~0.1% low and :func:`lmax_upper` then had to widen its shift (a looser
    bound). A heuristic estimate only (used as a candidate for :func:`lmax_upper`).
    """
    n = g.shape[-1]
    m = min(iters, n)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(n, dtype=g.dtype, generator=gen)
    q = q / q.norm()
    basis = torch.zeros(m, n, dtype=g.dtype)
    alphas: list[float] = []
    betas: list[float] = []
    top = -math.inf
    for j in range(m):
        basis[j] = q
        w = g @ q
        alphas.append(float(q @ w))
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        b = float(w.norm())
        if j == m - 1 or b <= 1e-13 * max(abs(alphas[-1]), 1e-300):
            break
        betas.append(b)
        q = w / b
        if (j + 1) % 10 == 0:
            ritz = _ritz_top(alphas, betas)
            if abs(float(ritz) - top) <= rtol * abs(float(ritz)):
                return ritz  # the same tridiagonal matrix the loop's end would solve
            top = float(ritz)
    return _ritz_top(alphas, betas)


def _ritz_top(alphas: list[float], betas: list[float]) -> torch.Tensor:
    """Largest eigenvalue of the Lanczos tridiagonal matrix."""
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(t)[-1]
