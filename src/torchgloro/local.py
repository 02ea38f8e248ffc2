"""Local-bound fallback: a costlier, still sound second chance for points the global bound
leaves as ⊥ (Leino et al. 2021, §6 suggests it; the restriction is BCP's, Lee et al. 2020).

On the ε-ball B around x, the network's Lipschitz constant can be bounded by the product of
*restricted* layer norms: a ReLU unit whose pre-activation is ≤ 0 on all of B is the constant
0 there, so its row (as an output) and its column (as the next layer's input) can be removed
from the operators. Stability is decided from proven per-unit deviation bounds (ℓ2 tracking
intersected with interval arithmetic) plus the proven float64 forward error. Every number is
an upper bound computed with outward rounding; see docs/soundness.md, "Local fallback".

Example:
    >>> cert = net.certify(x, eps)                      # doctest: +SKIP
    >>> ok = certify_local(net, x, eps, cert)           # doctest: +SKIP
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchgloro import margins
from torchgloro._certify import cudnn_off, float64_safe, ieee_arithmetic, norm_upper64
from torchgloro._errors import GloroInputError, UnsupportedLayerError
from torchgloro._inputs import check_epsilon, unshared
from torchgloro.bounds import sound
from torchgloro.bounds.registry import flatten_layers
from torchgloro.bounds.sound_conv import explicit_matrix
from torchgloro.bounds.sound_linalg import gamma, sigma_max_upper
from torchgloro.nn.activations import GroupSort

__all__ = ["certify_local", "local_margin_lipschitz", "EXPLICIT_CONV_LIMIT"]

# A conv layer whose explicit (out, in) matrix has at most this many entries is masked
# exactly (rows and columns); larger ones keep their global sound bound (masking can only
# lower a norm, so the global bound stays valid).
EXPLICIT_CONV_LIMIT = 2_000_000
_TINY = 2.0**-1000  # absolute underflow allowance per term (subnormals are far below)
_INF = math.inf


def _up(t: torch.Tensor) -> torch.Tensor:
    """One ulp toward +inf: turns a round-to-nearest result of one operation into an upper
    bound of the exact value."""
    return torch.nextafter(t, torch.full_like(t, _INF))


def _sum_up(t: torch.Tensor, n: int) -> torch.Tensor:
    """Upper bound on an exact sum of ``n`` non-negative products computed as ``t``.

    A float64 sum of n non-negative products (any order) has ``|t − s| ≤ γ_n·s``, so
    ``s ≤ t/(1 − γ_n) ≤ t(1 + 2γ_n)``; ``γ_{n+3}`` and the final ulp absorb the rounding of
    this very multiplication, and ``(n+3)·2^-1000`` any underflow.
    """
    return _up(t * (1.0 + 2.0 * gamma(n + 3)) + (n + 3) * _TINY)


@dataclass
class _Step:
    kind: str  # "affine", "relu", "reshape", "pool", "group", "other"
    module: nn.Module
    norm: float  # global proven bound on the layer's operator norm
    err: tuple[float, float]  # ‖fl(out) − out‖₂ ≤ err[0]·‖x‖ + err[1] for this prefix
    fan_in: int = 0
    explicit: torch.Tensor | None = None  # (out, in) float64 CPU matrix (dense, small conv)
    relu_next: bool = False


@dataclass
class _Plan:
    fingerprint: int
    steps: list[_Step]
    head: nn.Module  # the float64 head, evaluated exactly as certify evaluates it
    head_w: torch.Tensor  # (C, D) float64
    k_pen: float
    pair_glob: torch.Tensor  # (C, C) global class-pair factor (without k_pen), upper
    K_glob: torch.Tensor  # (C, C) the global K as certify uses it (pair form for "basic")
    err_coef: float
    err_const: float


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(net) -> _Plan:
    st = net._sound_state()
    fp = net._fingerprint(proof=True)
    cached = _PLANS.get(net)
    if cached is not None and cached.fingerprint == fp:
        return cached
    all_layers = flatten_layers(st.backbone64)
    layers = all_layers[:-1]
    norms = [b.sound() for b in net.bounds]
    fps = [b.fp_terms() for b in net.bounds]
    steps = []
    for i, (m, b) in enumerate(zip(layers, net.bounds)):
        prefix = list(zip(norms[: i + 1], fps[: i + 1]))
        err = margins.forward_error_coefficients(prefix, underflow=margins.UNDERFLOW_F64)
        relu_next = i + 1 < len(layers) and type(layers[i + 1]) is nn.ReLU
        t = type(m)
        if t in (nn.Linear, nn.Conv2d):
            fan_in = m.weight[0].numel() + 1
            ex = m.weight.detach().cpu() if t is nn.Linear else None
            if t is nn.Conv2d:
                shp = b.u.shape  # (1, Cin, H, W): the conv's input shape
                n_out = m(torch.zeros(shp, dtype=torch.float64)).numel()
                if n_out * shp.numel() <= EXPLICIT_CONV_LIMIT:
                    ex = explicit_matrix(
                        m.weight.detach().cpu(),
                        tuple(shp[2:]),
                        m.stride,
                        b.padding,
                        m.dilation,
                        m.groups,
                    )
            steps.append(_Step("affine", m, norms[i], err, fan_in, ex, relu_next))
        elif t is nn.ReLU:
            steps.append(_Step("relu", m, norms[i], err))
        elif t in (nn.Flatten, nn.Unflatten, nn.Identity, nn.ZeroPad2d):
            steps.append(_Step("reshape", m, norms[i], err))
        elif t in (nn.MaxPool2d, nn.AvgPool2d):
            steps.append(_Step("pool", m, norms[i], err))
        elif isinstance(m, GroupSort) and type(m).forward is GroupSort.forward:
            steps.append(_Step("group", m, norms[i], err))
        else:  # e.g. LiResBlock, LLNLinear: global bound, no per-unit information
            steps.append(_Step("other", m, norms[i], err))
    w = net._head_weight().detach().to(torch.float64)
    k_pen = st.k_pen
    pair_glob = margins.pairwise_row_distances(w, upper=True)
    Kg = net._class_bounds(w, torch.tensor(k_pen, dtype=torch.float64), upper=True)
    if Kg.dim() == 1:  # "basic": certified_radius uses K_j + K_i
        Kg = Kg[:, None] + Kg[None, :]
    plan = _Plan(fp, steps, all_layers[-1], w, k_pen, pair_glob, Kg, st.err_coef, st.err_const)
    _PLANS[net] = plan
    return plan


def _row_dev(step: _Step, mask: torch.Tensor, dev: torch.Tensor, r: torch.Tensor):
    """Per-output upper bounds on |z_k(x') − z_k(x)| for the affine layer of ``step``.

    Two sound bounds, intersected: ℓ2 tracking ‖row_k restricted to varying inputs‖₂ · r,
    and interval arithmetic Σ_j |A_kj|·dev_j.
    """
    m = step.module
    w = m.weight
    mf = mask.to(torch.float64)
    if isinstance(m, nn.Linear):
        s2 = F.linear(mf, w * w)
        ibp = F.linear(dev, w.abs())
    else:
        args = (None, m.stride, m.padding, m.dilation, m.groups)
        s2 = F.conv2d(mf, w * w, *args)  # zero padding: border positions read nothing
        ibp = F.conv2d(dev, w.abs(), *args)
    rho = _up(torch.sqrt(_sum_up(s2, step.fan_in)))
    return torch.minimum(_up(rho * r), _sum_up(ibp, step.fan_in))


def _masked_norm(step: _Step, rows: torch.Tensor, cols: torch.Tensor) -> float:
    """Proven upper bound on ‖diag(rows)·A·diag(cols)‖₂, never above the global bound."""
    if not bool(rows.any()) or not bool(cols.any()):
        return 0.0
    if rows.all() and cols.all():
        return step.norm
    a = step.explicit
    if a is None:  # a large conv: masking cannot raise the norm, keep the global bound
        return step.norm
    sub = a[rows.flatten().cpu()][:, cols.flatten().cpu()]
    val = sound.round_up(float(sigma_max_upper(sub)), 4)
    return min(val, step.norm)


def _one(plan: _Plan, x: torch.Tensor, eps: float):
    """Penultimate float64 features (1, D), local factor L and varying-unit mask (1, D)."""
    h = x.to(torch.float64)
    x_norm = float(_up(torch.sqrt(_sum_up((h * h).sum(), h.numel()))))
    mask = torch.ones_like(h, dtype=torch.bool)  # coordinates that may vary on the ball
    dev = torch.full_like(h, eps)  # |h_k(x') − h_k(x)| ≤ dev_k; here |x'_k − x_k| ≤ ε
    L = 1.0  # ‖h(x') − h(x)‖₂ ≤ ε·L; the same round-up product as the global k_pen
    pending_relu = False
    for step in plan.steps:
        m = step.module
        if step.kind == "relu" and pending_relu:  # its stability was decided with the affine
            h, pending_relu = torch.relu(h), False
            L = margins.round_up(L * step.norm, 1)
            continue
        r = torch.tensor(margins.round_up(eps * L, 1), dtype=torch.float64)
        factor = step.norm
        if step.kind == "affine":
            z = m(h)
            dz = _row_dev(step, mask, dev, r)
            rows = torch.ones_like(z, dtype=torch.bool)
            if step.relu_next:
                # exact z_k(x') ≤ z̃_k + |z_k(x) − z̃_k| + dz_k ≤ z̃_k + w_k; rounding is
                # monotone, so fl(z̃_k + w_k) < 0 proves the unit is 0 on the whole ball.
                rows = (z + _up(dz + _err(step, x_norm))) >= 0
                pending_relu = True
            factor = _masked_norm(step, rows, mask)
            h, mask, dev = z, rows, torch.where(rows, dz, torch.zeros_like(dz))
        elif step.kind == "relu":  # a ReLU after a non-affine layer: its input error is the
            # error of this prefix (ReLU is exact)
            alive = (h + _up(dev + _err(step, x_norm))) >= 0
            h, mask = torch.relu(h), mask & alive
            dev = torch.where(alive, dev, torch.zeros_like(dev))
        elif step.kind == "reshape":  # zero padding adds constant (masked) coordinates
            h, dev = m(h), m(dev)
            mask = m(mask.to(torch.float64)) > 0
        elif step.kind == "pool":
            h = m(h)
            mask = m(mask.to(torch.float64)) > 0  # constant iff its whole window is
            k, s, p, d = m.kernel_size, m.stride, m.padding, getattr(m, "dilation", 1)
            dev = F.max_pool2d(dev, k, s, p, d)  # |Δ max| and |Δ avg| ≤ max over window |Δ|
        elif step.kind == "group":
            h = m(h)
            g = m.group_size
            shp = (h.shape[0], h.shape[1] // g, g, *h.shape[2:])

            def grp(t: torch.Tensor, shp=shp, full=h.shape) -> torch.Tensor:
                return t.reshape(shp).amax(2, keepdim=True).expand(shp).reshape(full)

            mask = grp(mask.to(torch.float64)) > 0
            dev = grp(dev)  # order statistics of a group are 1-Lipschitz in ℓ∞
        else:
            h = m(h)
            mask = torch.ones_like(h, dtype=torch.bool)
            dev = torch.full_like(h, _INF)
        L = margins.round_up(L * factor, 1)
        r_new = torch.tensor(margins.round_up(eps * L, 1), dtype=torch.float64)
        dev = torch.minimum(dev, r_new)  # one coordinate never moves more than the vector
    return h, L, mask


def _err(step: _Step, x_norm: float) -> torch.Tensor:
    """Upper bound on ‖fl(h) − h‖₂ (hence on each coordinate) after this prefix: float64,
    rounded up (a float32 tensor would round it to nearest, below the bound or to 0)."""
    p, q = step.err
    bound = margins.round_up(margins.round_up(p * x_norm, 1) + q, 1)
    return torch.tensor(bound, dtype=torch.float64)


@torch.no_grad()
def _local_one(plan: _Plan, x1: torch.Tensor, eps: float):
    with cudnn_off():
        feats, L, mask = _one(plan, x1, eps)
        y = plan.head(feats)
    w = plan.head_w[:, mask.flatten()]
    pair = torch.minimum(margins.pairwise_row_distances(w, upper=True), plan.pair_glob)
    k = torch.tensor(min(L, plan.k_pen), dtype=torch.float64)
    K = torch.minimum(margins.times_upper(pair, k), plan.K_glob)
    return y, K


def _check(net, x: torch.Tensor, epsilon: float) -> tuple[float, torch.Tensor]:
    """ε and ``x`` checked; ``x`` copied where a layer writes its input in place."""
    eps = check_epsilon(epsilon)
    if not isinstance(net.backbone, nn.Sequential):
        raise UnsupportedLayerError(
            "The local fallback handles nn.Sequential backbones only: it follows one chain of "
            "layers, deciding each ReLU's stability on the ball from the deviation bounds of "
            "the layer before it and masking that layer's matrix, and has no rule yet for a "
            "value read by two branches, an add or a concatenation. This GloroNet runs a "
            f"traced {type(net.backbone).__name__} graph: certify without fallback='local' "
            "(the global sound bound), or write the model as an nn.Sequential (residual "
            "blocks as torchgloro.nn.layers.Residual, which the fallback bounds globally)."
        )
    net._check_input(x, check_finite=True)
    return eps, unshared(x, net.backbone)


@ieee_arithmetic
@torch.no_grad()
def local_margin_lipschitz(net, x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Proven local margin bounds on the ε-balls around each point of ``x``.

    Returns:
        ``(B, C, C)`` float64: ``K[b, j, i]`` ≥ the Lipschitz constant of ``f_j − f_i`` on
        ``{x' : ‖x' − x_b‖₂ ≤ ε}``, and ≤ the global sound ``K`` entrywise.
    """
    eps, x = _check(net, x, epsilon)
    plan = _plan(net)
    out = [_local_one(plan, x[b : b + 1], eps)[1] for b in range(x.shape[0])]
    c = plan.head_w.shape[0]
    return torch.stack(out) if out else torch.zeros(0, c, c, dtype=torch.float64)


@ieee_arithmetic
@torch.no_grad()
def certify_local(net, x: torch.Tensor, epsilon: float, cert) -> torch.Tensor:
    """``(B,)`` bool: certified by the global sound bound (``cert``) or by the local bound.

    Only points not already certified are examined, one at a time (so the result does not
    depend on the batch composition). A point is certified locally iff, on float64 logits y
    with the sound-mode round-off ``slack``, ``y_j − y_i − slack > ε·K_loc[j, i]`` for all
    ``i ≠ j`` (strict; ties never) and j equals ``cert.pred``.

    Args:
        net: The :class:`~torchgloro.GloroNet`.
        x: ``(B, *in_shape)`` inputs, the ones ``cert`` was computed on.
        epsilon: The radius; must equal ``cert.epsilon``.
        cert: A ``mode="sound"`` :class:`~torchgloro.Certificate` for ``x``.
    """
    eps, x = _check(net, x, epsilon)
    if cert.mode != "sound":
        raise GloroInputError("the local fallback extends sound certificates only (mode='sound').")
    if cert.epsilon != eps:
        raise GloroInputError(f"cert is for epsilon={cert.epsilon}, not {eps}.")
    out = cert.certified.clone()
    plan = _plan(net)
    x64 = x.to(torch.float64)
    x_norm = norm_upper64(x64)
    slack = 2.02 * (plan.err_coef * x_norm + plan.err_const)  # exactly as certify computes it
    # The pre-filter below reads cert.logits. A float32 gap (precision="auto") is off from the
    # float64 one by at most both allowances, so it is widened by them: g64 ≤ g32 + widen.
    widen = torch.zeros_like(slack)
    if cert.precision != "float64":
        p32, q32 = net._sound_state().err32
        widen = 2.02 * (p32 * x_norm + q32) + slack
    # Rows whose float64 values may overflow are outside the round-off model (never certified).
    candidates = ~cert.certified & float64_safe(net._sound_state(), x_norm)
    for b in torch.nonzero(candidates).flatten().tolist():
        yb = cert.logits[b].to(torch.float64)
        gap = (yb[cert.pred[b]] - yb).masked_fill(
            torch.arange(yb.numel(), device=yb.device) == cert.pred[b], _INF
        )
        # No bound K ≥ 0 can certify it (the float64 gap is at most the slack): skip the
        # costly part. The decision below recomputes float64 logits either way.
        if bool((gap + widen[b] <= slack[b]).any()):
            continue
        y, K = _local_one(plan, x[b : b + 1], eps)
        pred, radius = margins.certified_radius(y, K, slack[b : b + 1], lipschitz="margin")
        out[b] = bool(radius[0] > eps) and int(pred[0]) == int(cert.pred[b])
    return out
