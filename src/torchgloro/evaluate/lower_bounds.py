"""Empirical lower bounds on the (margin) Lipschitz constant, and the upper bounds they are
compared against (Figure 3c, Appendix E).

A lower bound is a ratio |m_i(x1) − m_i(x2)| / ‖x1 − x2‖ with m_i = f_j − f_i, found by
gradient ascent (Adam) on (x1, x2) for many pairs at once. The optimized objective guards the
denominator against 0, but the reported value is re-evaluated exactly (in float64, without
the guard) at the points found, so it is a true lower bound on the Lipschitz constant of
f_j − f_i, hence on K[j, i] and on max K.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from torchgloro._errors import UnsoundBoundError
from torchgloro.evaluate import progress
from torchgloro.evaluate.attacks import project_l2, random_in_ball

__all__ = [
    "LowerBound",
    "pairwise_bounds",
    "upper_bounds",
    "exact_margin_ratios",
    "global_lower_bound",
    "local_lower_bound",
    "check_against_upper",
]

# Pairs closer than this are not reported (float64 cancellation would dominate the ratio).
_MIN_DIST = 1e-6
# Relative allowance for float64 round-off when comparing a lower bound to an upper bound.
_REL_TOL = 1e-6


@dataclass
class LowerBound:
    """Per-pair lower bounds (CPU float64) and the class pair (j, i) each was found for."""

    values: torch.Tensor  # (P,)
    j: torch.Tensor  # (P,)
    i: torch.Tensor  # (P,)
    steps: int
    lr: float

    @property
    def max(self) -> float:
        return float(self.values.max()) if self.values.numel() else 0.0

    @property
    def mean(self) -> float:
        return float(self.values.mean()) if self.values.numel() else 0.0


def pairwise_bounds(K: torch.Tensor) -> torch.Tensor:
    """(C, C) bounds on Lip(f_j − f_i) from the margin matrix (returned as is) or the basic
    per-class vector (K_j + K_i); the diagonal is set to 0."""
    K = K.detach().to(torch.float64).cpu()
    P = K if K.dim() == 2 else K[:, None] + K[None, :]
    return P.masked_fill(torch.eye(P.shape[0], dtype=torch.bool), 0.0)


def upper_bounds(net) -> dict:
    """Global upper bounds max_{i≠j} K_ji used by ``net``: sound (proven) and fast (power
    iteration), and their gap."""
    sound = pairwise_bounds(net.lipschitz_constant("sound"))
    fast = pairwise_bounds(net.lipschitz_constant("fast"))
    s, f = float(sound.max()), float(fast.max())
    return {
        "global_ub_sound": s,
        "global_ub_fast": f,
        "ub_gap": s - f,
        "ub_gap_relative": (s - f) / s if s > 0 else 0.0,
        "_K_sound": sound,
    }


def _margins(y: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    return y.gather(1, j[:, None]) - y  # (B, C): m_i = f_j − f_i


@torch.no_grad()
def exact_margin_ratios(f64: torch.nn.Module, x1: torch.Tensor, x2: torch.Tensor, j=None):
    """Float64 max_i |m_i(x1) − m_i(x2)| / ‖x1 − x2‖ per pair, with j = argmax f(x1) unless
    given. Pairs closer than 1e-6 get 0.

    Returns:
        ``(values, j, i)``, each (B,) on CPU.
    """
    a, b = x1.detach().double(), x2.detach().double()
    y1, y2 = f64(a), f64(b)
    if j is None:
        j = y1.argmax(1)
    j = j.to(y1.device)
    diff = (_margins(y1, j) - _margins(y2, j)).abs()  # (B, C)
    dist = torch.linalg.vector_norm((a - b).flatten(1), dim=1)  # (B,)
    ratios = diff / dist.clamp_min(_MIN_DIST)[:, None]
    ratios = ratios.masked_fill((dist < _MIN_DIST)[:, None], 0.0)
    val, i = ratios.max(1)
    return val.cpu(), j.cpu(), i.cpu()


def _optimize(f, f64, x1, x2, steps, lr, guard, desc, project=None, fixed_j=None):
    """Adam ascent on the guarded ratio for all pairs at once; returns the exact per-pair
    best over the tracked best iterates and the final ones (``desc`` names its bar)."""
    x1 = x1.detach().clone().requires_grad_(True)
    x2 = x2.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x1, x2], lr=lr)
    best = torch.full((x1.shape[0],), -1.0, device=x1.device, dtype=x1.dtype)
    b1, b2 = x1.detach().clone(), x2.detach().clone()
    n = x1.shape[0]
    with progress.bar(desc, steps) as shown:
        shown.partial = lambda: {  # the best pairs so far, re-evaluated exactly
            "lower_bound_so_far": float(exact_margin_ratios(f64, b1, b2, fixed_j)[0].max())
        }
        for _ in range(steps):
            y = f(torch.cat([x1, x2]))
            y1, y2 = y[:n], y[n:]
            j = y1.argmax(1).detach() if fixed_j is None else fixed_j
            d2 = ((x1 - x2).flatten(1) ** 2).sum(1)
            obj = (_margins(y1, j) - _margins(y2, j)).abs().amax(1) / torch.sqrt(d2 + guard)
            with torch.no_grad():
                better = obj > best
                best = torch.where(better, obj.detach(), best)
                b1[better], b2[better] = x1.detach()[better], x2.detach()[better]
            opt.zero_grad(set_to_none=True)
            (-obj.sum()).backward()
            opt.step()
            if project is not None:
                with torch.no_grad():
                    x1.copy_(project(x1))
                    x2.copy_(project(x2))
            shown.update(1)
    cands = []
    for p, q in ((b1, b2), (x1.detach(), x2.detach())):
        cands.append(exact_margin_ratios(f64, p, q, fixed_j))
    (v0, j0, i0), (v1, j1, i1) = cands
    take = v1 > v0
    return torch.where(take, v1, v0), torch.where(take, j1, j0), torch.where(take, i1, i0)


def _frozen(f: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    f32 = copy.deepcopy(f).eval()
    for p in f32.parameters():
        p.requires_grad_(False)
    return f32, copy.deepcopy(f32).double()


def global_lower_bound(
    f: torch.nn.Module,
    x_pool: torch.Tensor,
    pairs: int = 100,
    steps: int = 7500,
    lr: float = 1e-3,
    seed: int = 0,
    guard: float = 1e-12,
) -> LowerBound:
    """Lower bound on the global margin Lipschitz constant of ``f`` (Appendix E).

    Both points of each of ``pairs`` pairs start at distinct points of ``x_pool`` (chosen with
    ``seed``) and are optimized jointly, unconstrained, for ``steps`` Adam steps.
    """
    n = x_pool.shape[0]
    if n < 2:
        raise ValueError("global_lower_bound needs at least 2 points")
    g = torch.Generator().manual_seed(int(seed))
    idx1 = torch.randint(0, n, (pairs,), generator=g)
    idx2 = (idx1 + torch.randint(1, n, (pairs,), generator=g)) % n
    dev = x_pool.device
    x1, x2 = x_pool[idx1.to(dev)].clone(), x_pool[idx2.to(dev)].clone()
    same = torch.linalg.vector_norm((x1 - x2).flatten(1), dim=1) < 1e-3
    if bool(same.any()):  # duplicate images: separate them slightly
        noise = 1e-2 * torch.randn(x2.shape, generator=g).to(dev, x2.dtype)
        x2 = torch.where(same.view(-1, *([1] * (x2.dim() - 1))), x2 + noise, x2)
    f32, f64 = _frozen(f)
    v, j, i = _optimize(f32, f64, x1, x2, steps, lr, guard, f"global lower bound ({pairs} pairs)")
    return LowerBound(v, j, i, steps, lr)


def local_lower_bound(
    f: torch.nn.Module,
    x0: torch.Tensor,
    epsilon: float,
    steps: int = 5000,
    lr: float = 1e-3,
    seed: int = 0,
    guard: float = 1e-12,
) -> LowerBound:
    """Per-point lower bounds on the local margin Lipschitz constant of ``f`` in the ε-ball
    around each row of ``x0`` (j = F(x0)); x1 and x2 start uniformly at random in the ball
    and are projected back onto it after every step."""
    f32, f64 = _frozen(f)
    g = torch.Generator(device=x0.device).manual_seed(int(seed))
    radius = float(epsilon) * (1 - 1e-6)
    with torch.no_grad():
        j = f32(x0).argmax(1)
    x1 = x0 + random_in_ball(tuple(x0.shape), radius, g, x0.device, x0.dtype)
    x2 = x0 + random_in_ball(tuple(x0.shape), radius, g, x0.device, x0.dtype)

    def project(z):
        return x0 + project_l2(z - x0, radius)

    desc = f"local lower bound ({len(x0)} points)"
    v, jj, i = _optimize(f32, f64, x1, x2, steps, lr, guard, desc, project=project, fixed_j=j)
    return LowerBound(v, jj, i, steps, lr)


def check_against_upper(lb: LowerBound, K_pairs: torch.Tensor, what: str) -> None:
    """Raises :class:`UnsoundBoundError` if any lower bound exceeds the proven upper bound
    K[j, i] of its class pair (or the global max): that would be a soundness bug."""
    if not lb.values.numel():
        return
    ub_pair = K_pairs[lb.j, lb.i]
    ub = float(K_pairs.max())
    bad = lb.values > ub_pair * (1 + _REL_TOL)
    if bool(bad.any()) or lb.max > ub * (1 + _REL_TOL):
        k = int(bad.nonzero()[0]) if bool(bad.any()) else int(lb.values.argmax())
        raise UnsoundBoundError(
            f"{what} lower bound {float(lb.values[k]):.6g} for class pair "
            f"(j={int(lb.j[k])}, i={int(lb.i[k])}) exceeds the sound upper bound "
            f"K[j, i] = {float(ub_pair[k]):.6g} (global max {ub:.6g}): the Lipschitz bound "
            f"is not sound. Please report this as a bug."
        )
