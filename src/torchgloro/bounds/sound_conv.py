"""Proven upper bounds on the ℓ2 operator norm of zero-padded 2-D convolutions.

Pipeline (each step proven in docs/soundness.md):

1. groups → block diagonal operator, norm = max over groups;
2. dilation → folded into a larger kernel with zeros;
3. stride ``s`` → polyphase (space-to-depth) rewrite into a stride-1 correlation with kernel
   ``(Cout, Cin·s_h·s_w, ceil(k_h/s_h), ceil(k_w/s_w))`` on a permutation of the padded input;
4. zero padding on a finite input → the operator is a compression (rows/columns subset) of a
   circular correlation on an ``N_h × N_w`` torus, whose norm is exactly
   ``max_{f,g} σ_max(K̂(f, g))`` over the DFT grid (Sedghi, Gupta & Long, ICLR 2019);
5. each ``σ_max`` is verified by Cholesky (``sound_linalg``); DFT round-off is bounded
   explicitly.

For operators small enough to materialize, the exact matrix is also built and its norm
verified the same way; the smaller of the two proven bounds is returned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from torchgloro._errors import GloroInputError
from torchgloro.bounds.sound_linalg import U64, gamma, lanczos_top, lmax_upper, sigma_max_upper

Pad4 = tuple[int, int, int, int]

#: The exact Gram matrix of the smaller side is built and verified when its order (per group)
#: is at most this: 6400 covers 4C3F's 64-channel 3×3 layer on 14×14 (order 6272, ~1 GB and
#: ~8 s on 2 cores, once per weights), where the circular bound was 0.75% loose after training.
EXACT_MAX_SIDE = 6400
#: ``auto`` skips the exact path when the circular bound is already within this factor of a
#: Lanczos estimate of the exact norm.
AUTO_SKIP_RATIO = 1.0005
#: Number of torus sizes ``N_min + j`` (``j < CIRCULAR_SIZES``) tried by the circular bound.
CIRCULAR_SIZES = 4


def pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    """Normalizes an int or a 2-sequence of ints to a pair of ints ``>= 0``."""
    if isinstance(v, int):
        out = (v, v)
    else:
        out = tuple(int(x) for x in v)
        if len(out) != 2:
            raise GloroInputError(f"{name} must be an int or a pair, got {v!r}.")
    if any(x < 0 for x in out):
        raise GloroInputError(f"{name} must be non-negative, got {v!r}.")
    return out  # type: ignore[return-value]


def resolve_padding(
    padding: str | int | Sequence[int],
    in_hw: tuple[int, int],
    kernel_hw: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> Pad4:
    """Padding as ``(left, right, top, bottom)`` (the order of ``F.pad``).

    ``"same"`` is TensorFlow's SAME: output ``ceil(n/s)``, total padding
    ``max((ceil(n/s) − 1)·s + d·(k − 1) + 1 − n, 0)``, ``left = total // 2`` (the extra one
    goes right/bottom). For stride 1 this equals PyTorch's ``padding="same"``.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise GloroInputError(f"padding must be 'same', 'valid' or ints, got {padding!r}.")
        pads: list[int] = []
        for n, k, s, d in zip(in_hw[::-1], kernel_hw[::-1], stride[::-1], dilation[::-1]):
            total = max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    if isinstance(padding, int):
        padding = (padding, padding)
    p = tuple(int(x) for x in padding)
    if any(x < 0 for x in p):
        raise GloroInputError(f"padding must be non-negative, got {padding!r}.")
    if len(p) == 2:
        return (p[1], p[1], p[0], p[0])
    if len(p) == 4:
        return p  # type: ignore[return-value]
    raise GloroInputError(
        f"padding must be 'same', 'valid', an int, (pad_h, pad_w) or (left, right, top, "
        f"bottom); got {padding!r}."
    )


def dilate_kernel(weight: torch.Tensor, dilation: tuple[int, int]) -> torch.Tensor:
    """The equivalent undilated kernel: taps spread out with zeros in between."""
    dh, dw = dilation
    if (dh, dw) == (1, 1):
        return weight
    co, ci, kh, kw = weight.shape
    out = weight.new_zeros(co, ci, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    out[:, :, ::dh, ::dw] = weight
    return out


def polyphase_kernel(weight: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """Kernel of the stride-1 correlation equivalent to a strided one (space-to-depth).

    ``K2[o, c·s_h·s_w + r·s_w + t, α, β] = K[o, c, s_h·α + r, s_w·β + t]`` (zero past the end).
    """
    sh, sw = stride
    co, ci, kh, kw = weight.shape
    kh2, kw2 = -(-kh // sh), -(-kw // sw)
    k = weight.new_zeros(co, ci, kh2 * sh, kw2 * sw)
    k[:, :, :kh, :kw] = weight
    k = k.reshape(co, ci, kh2, sh, kw2, sw).permute(0, 1, 3, 5, 2, 4)
    return k.reshape(co, ci * sh * sw, kh2, kw2)


def space_to_depth(x: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """``X[b, c·s_h·s_w + r·s_w + t, u, v] = x[b, c, s_h·u + r, s_w·v + t]`` (zero-extended)."""
    sh, sw = stride
    b, c, h, w = x.shape
    hh, ww = -(-h // sh), -(-w // sw)
    x = F.pad(x, (0, ww * sw - w, 0, hh * sh - h))
    x = x.reshape(b, c, hh, sh, ww, sw).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * sh * sw, hh, ww)


def _torus_size(n: int, lo: int, hi: int, s: int, kd: int) -> int:
    """Smallest torus on which the padded, phase-rewritten 1-D correlation is a compression.

    Phase coordinates: input support ``[u0, u1]``; rows ``i`` that see the support
    ``[r0, r1]`` read ``[i, i + k2 − 1]``. On ``Z_N`` the rows must stay distinct, the support
    must embed injectively and no window may reach a wrapped copy of the support:
    ``N ≥ r1 − r0 + 1``, ``N ≥ u1 − u0 + 1``, ``N > u1 − r0``, ``N > r1 + k2 − 1 − u0``.
    """
    p = n + lo + hi
    k2 = -(-kd // s)
    n_out = (p - kd) // s + 1
    if n_out < 1:
        raise GloroInputError(
            f"input size {n} with padding ({lo}, {hi}) is smaller than the kernel extent {kd}."
        )
    u0, u1 = lo // s, (lo + n - 1) // s
    r0, r1 = max(0, u0 - k2 + 1), min(n_out - 1, u1)
    return max(r1 - r0 + 1, u1 - u0 + 1, u1 - r0 + 1, r1 + k2 - u0)


def _twiddles(n_freq: int, taps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``2π·(a·f mod N)/N`` for ``f < N``, ``a < taps`` (float64, ``|err| ≤ 32u``)."""
    f = torch.arange(n_freq, dtype=torch.int64)[:, None]
    a = torch.arange(taps, dtype=torch.int64)[None, :]
    theta = ((f * a) % n_freq).to(torch.float64) * (2.0 * math.pi / n_freq)
    return torch.cos(theta), torch.sin(theta)


def circular_bound(k2: torch.Tensor, n_hw: tuple[int, int]) -> float:
    """Proven bound on the circular correlation norm on an ``N_h × N_w`` torus.

    Args:
        k2: ``(G, Cout, Cin, kh, kw)`` float64 stride-1 kernels (one per group).
        n_hw: Torus size ``(N_h, N_w)``, each at least the kernel size.

    Returns:
        An upper bound on ``max_{group, f, g} σ_max(K̂(f, g))``.
    """
    g_, co, ci, kh, kw = k2.shape
    nh, nw = n_hw
    ch, sh = _twiddles(nh, kh)
    cw, sw = _twiddles(nw, kw)
    # K̂(f,g) = Σ_ab K_ab e^{-iθ_a(f)} e^{-iφ_b(g)}: real and imaginary parts separately.
    cc = torch.einsum("fa,zocab,gb->zfgoc", ch, k2, cw)
    ss = torch.einsum("fa,zocab,gb->zfgoc", sh, k2, sw)
    sc = torch.einsum("fa,zocab,gb->zfgoc", sh, k2, cw)
    cs = torch.einsum("fa,zocab,gb->zfgoc", ch, k2, sw)
    khat = torch.complex(cc - ss, -(sc + cs))
    # Round-off of each part: ≤ 4·(kh·kw + kh + kw + 80)·u·Σ_ab|K_ab| per entry; the complex
    # entry is within √2 of that, and the matrix in Frobenius norm within √2·η·‖A‖_F where
    # A_oc = Σ_ab |K_ocab| (same for every frequency).
    eta = 4.0 * (kh * kw + kh + kw + 80) * U64
    a_abs = k2.abs().sum(dim=(-2, -1))
    a_fro = torch.linalg.matrix_norm(a_abs, "fro") * (1.0 + gamma(co * ci * kh * kw + 2))
    err = math.sqrt(2.0) * eta * a_fro * (1.0 + 8 * U64)
    # K is real, so K̂(−f, −g) = conj K̂(f, g): same singular values; keep half the rows f.
    half = nh // 2 + 1
    khat = khat[:, :half]
    sig = sigma_max_upper(khat.reshape(g_, half * nw, co, ci), err[:, None])
    return float(sig.max())


def explicit_matrix(
    weight: torch.Tensor,
    in_hw: tuple[int, int],
    stride: tuple[int, int],
    pad: Pad4,
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """The exact (out, in) matrix of ``x ↦ conv2d(F.pad(x, pad), weight, ...)`` in float64.

    Each output of ``conv(e_j)`` has at most one non-zero product term (distinct taps read
    distinct inputs), so every entry is an exact copy of a kernel weight or 0.
    """
    ci = weight.shape[1] * groups
    n_in = ci * in_hw[0] * in_hw[1]
    basis = torch.eye(n_in, dtype=torch.float64).reshape(n_in, ci, *in_hw)
    out = F.conv2d(F.pad(basis, pad), weight.to(torch.float64), None, stride, 0, dilation, groups)
    return out.reshape(n_in, -1).T


def _tap_map(
    in_hw: tuple[int, int],
    kshape: tuple[int, int],
    stride: tuple[int, int],
    pad: Pad4,
    dilation: tuple[int, int],
) -> tuple[torch.Tensor, int]:
    """``xmap[p, t]``: flat input position read by output position ``p`` through tap ``t``
    (``-1`` where it reads padding), and the number of output positions."""
    (h, w), (kh, kw) = in_hw, kshape
    left, right, top, bottom = pad
    oh = (h + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    r = torch.arange(oh)[:, None] * stride[0] + torch.arange(kh)[None, :] * dilation[0] - top
    c = torch.arange(ow)[:, None] * stride[1] + torch.arange(kw)[None, :] * dilation[1] - left
    rr = r[:, None, :, None].expand(oh, ow, kh, kw)
    cc = c[None, :, None, :].expand(oh, ow, kh, kw)
    ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    xmap = torch.where(ok, rr * w + cc, torch.full_like(rr, -1))
    return xmap.reshape(oh * ow, kh * kw), oh * ow


def exact_gram(
    wg: torch.Tensor,
    in_hw: tuple[int, int],
    stride: tuple[int, int],
    pad: Pad4,
    dilation: tuple[int, int],
) -> tuple[torch.Tensor, float]:
    """Gram matrix of the smaller side of one group's exact operator, and its round-off.

    Output side: ``G[(p,o),(p',o')] = Σ_x Σ_{t,t': x = x(p,t) = x(p',t')} (K_t K_t'^T)[o,o']``;
    input side: ``G[(x,c),(x',c')] = Σ_p (K_t^T K_t')[c,c']`` with ``x = x(p,t)``,
    ``x' = x(p,t')``. Every entry is a sum of at most ``n = max(Cin, Cout)·kh·kw`` products
    of weights, so ``|fl(G) − G| ≤ γ_n |T||T|^T`` and ``‖·‖₂ ≤ γ_n‖T‖_F² ≤
    γ_n·P_out·‖K‖_F²``.

    Args:
        wg: ``(Cout, Cin, kh, kw)`` float64 weights of one group.
        in_hw, stride, pad, dilation: The geometry.

    Returns:
        ``(G, err)`` with ``‖G_exact − G‖₂ ≤ err``.
    """
    co, ci, kh, kw = wg.shape
    xmap, n_out = _tap_map(in_hw, (kh, kw), stride, pad, dilation)
    n_in = in_hw[0] * in_hw[1]
    taps = wg.reshape(co, ci, kh * kw).permute(2, 0, 1)  # (T, Cout, Cin)
    if n_out * co <= n_in * ci:  # output side: group by input position x
        gmap = torch.full((n_in, kh * kw), -1, dtype=torch.int64)
        t_idx = torch.arange(kh * kw).expand_as(xmap)
        ok = xmap >= 0
        p_idx = torch.arange(n_out)[:, None].expand_as(xmap)
        gmap[xmap[ok], t_idx[ok]] = p_idx[ok]
        q = torch.einsum("toc,sdc->tsod", taps, taps)
        npos, ch = n_out, co
    else:  # input side: group by output position p
        gmap = xmap
        q = torch.einsum("toc,sod->tscd", taps, taps)
        npos, ch = n_in, ci
    g4 = torch.zeros(npos, npos, ch, ch, dtype=torch.float64)
    nt = kh * kw
    for t1 in range(nt):
        for t2 in range(nt):
            ok = (gmap[:, t1] >= 0) & (gmap[:, t2] >= 0)
            if ok.any():
                g4[gmap[ok, t1], gmap[ok, t2]] += q[t1, t2]
    g = g4.permute(0, 2, 1, 3).reshape(npos * ch, npos * ch)
    n = max(ci, co) * nt + 2
    fro2 = float((wg * wg).sum()) * (1.0 + gamma(wg.numel() + 2)) * n_out
    return g, gamma(n) * fro2 * (1.0 + 4 * U64)


def exact_bound(
    w: torch.Tensor,
    in_hw: tuple[int, int],
    stride: tuple[int, int],
    pad: Pad4,
    dilation: tuple[int, int],
    groups: int,
    skip_if_below: float | None = None,
) -> float:
    """Verified norm of the exact operator (max over groups), via :func:`exact_gram`.

    If ``skip_if_below`` is given and every group's Lanczos estimate times
    ``AUTO_SKIP_RATIO`` exceeds it, returns ``inf`` without the (costly) verification.
    """
    co = w.shape[0] // groups
    grams = [
        exact_gram(w[i * co : (i + 1) * co], in_hw, stride, pad, dilation) for i in range(groups)
    ]
    cands = [lanczos_top(g) for g, _ in grams]
    if skip_if_below is not None:
        est = max(math.sqrt(max(float(c), 0.0)) for c in cands)
        if est * AUTO_SKIP_RATIO >= skip_if_below:
            return math.inf
    out = 0.0
    for (g, err), cand in zip(grams, cands):
        # Small matrices: eigvalsh is cheap and accurate (verification margin ~1e-12);
        # larger ones use the Lanczos estimate (margin ~1e-5, one Cholesky).
        lam = lmax_upper(g, err, candidate=None if g.shape[0] <= 1024 else cand)
        out = max(out, float(lam.sqrt()) * (1.0 + 4 * U64))
    return out


def conv_bound(
    weight: torch.Tensor,
    in_hw: tuple[int, int],
    stride: tuple[int, int],
    pad: Pad4,
    dilation: tuple[int, int],
    groups: int,
    method: str = "auto",
) -> float:
    """Core of :func:`torchgloro.bounds.sound.conv2d_norm_upper` (arguments already normalized)."""
    w = weight.detach().to(torch.float64).cpu()
    co, cig, kh, kw = w.shape
    left, right, top, bottom = pad
    kd = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    nh = _torus_size(in_hw[0], top, bottom, stride[0], kd[0])
    nw = _torus_size(in_hw[1], left, right, stride[1], kd[1])
    best = math.inf
    _, n_pos = _tap_map(in_hw, (kh, kw), stride, pad, dilation)
    side = min(n_pos * co, in_hw[0] * in_hw[1] * cig * groups) // groups
    exact = method == "exact" or (method == "auto" and side <= EXACT_MAX_SIDE)
    if method in ("auto", "circular"):
        k = polyphase_kernel(dilate_kernel(w, dilation), stride)
        k = k.reshape(groups, co // groups, *k.shape[1:])
        nh = max(nh, k.shape[-2])
        nw = max(nw, k.shape[-1])
        # Any torus at least (nh, nw) works; the DFT grids differ, so try a few sizes (all of
        # them in ``auto`` too: its exact path may be skipped, and then this is the answer).
        for extra in range(CIRCULAR_SIZES):
            best = min(best, circular_bound(k, (nh + extra, nw + extra)))
    if exact:
        skip = best if method == "auto" else None
        best = min(best, exact_bound(w, in_hw, stride, pad, dilation, groups, skip))
    if not math.isfinite(best):
        raise GloroInputError(f"unknown method {method!r}: use 'auto', 'circular', 'exact'.")
    return best
