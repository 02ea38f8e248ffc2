"""Certificates, and sound-mode logits: float32 first with a proven allowance, then float64.

Sound certification needs logits whose round-off is bounded by a proof. The float64 copy of
the backbone gives a tiny allowance (≈1e-10 of the logits) but costs 4–9× float32 inference on
a CPU. The float32 backbone itself obeys the same per-layer round-off model with float32's
unit round-off ``u = 2^-24``, provided every affine output is a plain sum of products: no TF32
or bfloat16 arithmetic and no Winograd/FFT convolutions (:func:`strict_fp32`). A margin
y_j − y_i of the float32 logits is off by at most ‖w_j − w_i‖·‖e‖ + 2r, with e the
error of the penultimate features and r the head's own round-off per logit
(``SoundState.head32``), about 1% of the ε·K a certificate needs on the MNIST nets. Each
point is decided in up to three steps:

1. float32 logits with the a-priori feature allowance ``‖e‖ ≤ p‖x‖ + q`` (``SoundState.pen32``);
2. for the points step 1 leaves open, the per-point allowance from the norms of the
   activations the float32 pass computed (``SoundState.layerwise32``: about 2× tighter);
3. the points still open — not certified, but float64 might certify them — are recomputed
   on the float64 copy, exactly as ``precision="float64"`` does.

A traced graph's backbone follows the same three steps with its graph's round-off model
(docs/soundness.md §14b): step 1's allowance composes through adds and concatenations
(:meth:`GraphBound.roundoff`), step 2's reads the norms its float32 pass measured at each
value that rounds (:meth:`GraphBound.measured_error`).

Step 3 catches every point float64 would certify (docs/soundness.md, §7b), so the certified
set is the float64 one, at the cost of float32 inference plus float64 on the few open points.
Radii from steps 1–2 are proven but smaller than float64's by about the allowance over K.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from torchgloro import margins
from torchgloro._errors import GloroInputError
from torchgloro._fp_env import (  # noqa: F401 - re-exported: the names callers import from here
    autocast_off,
    gradual_underflow,
    ieee_arithmetic,
    ieee_precision,
    no_autocast,
    own_gelu_kernel,
)
from torchgloro._net_attributes import eval_mode
from torchgloro.bounds.registry import backend_off, flatten_layers
from torchgloro.bounds.weight_cache import HeadRoundoff, SoundState


@dataclass
class Certificate:
    """The result of certifying a batch.

    Attributes:
        pred: (B,) the class predicted by the backbone f (argmax, ties to the lower index).
        certified: (B,) True where f provably keeps ``pred`` on the whole ε-ball.
        radius: (B,) the largest radius the certificate holds for (strictly below it); 0 when
            none, e.g. on ties.
        logits: (B, C) the logits the decision was made on (float64 values in ``sound``
            mode).
        epsilon: The radius that ``certified`` refers to.
        mode: ``"sound"`` or ``"fast"``.
        precision: The precision the logits were computed in: ``"float64"`` when every row
            came from the float64 copy, ``"float32"`` when some are float32 values (sound
            mode, ``precision="auto"``), or the backbone's dtype in fast mode.
    """

    pred: torch.Tensor
    certified: torch.Tensor
    radius: torch.Tensor
    logits: torch.Tensor
    epsilon: float
    mode: str
    precision: str = "float64"


# float32 values below this cannot have overflowed (largest float32: 3.4e38).
_F32_SAFE = 1e36
# The same for float64 (largest float64: 1.8e308).
F64_SAFE = 1e300


@contextlib.contextmanager
def strict_fp32():
    """Plain IEEE float32 arithmetic for the enclosed forward pass.

    Autocast is off (:func:`no_autocast`). cuDNN and NNPACK are switched off (they pick
    TF32, FFT and Winograd algorithms, whose errors the per-layer model does not cover); CUDA
    falls back to im2col and cuBLAS GEMMs. Matrix products on CUDA and oneDNN run in full
    float32 precision (:func:`~torchgloro._fp_env.ieee_precision`: no TF32 or bfloat16, the
    caller's settings restored exactly afterwards). On the CPU, PyTorch's oneDNN convolutions
    use the direct algorithm (ideep's default), which computes each output as a sum of
    products. GELU runs on PyTorch's own kernel, not oneDNN's (:func:`own_gelu_kernel`).
    """
    with ieee_precision(), cudnn_off(), _no_nnpack(), no_autocast(), own_gelu_kernel():
        yield


def cudnn_off() -> contextlib.AbstractContextManager:
    """cuDNN off for the enclosed block (see :func:`torchgloro.bounds.registry.backend_off`)."""
    return backend_off(torch.backends.cudnn)


def _no_nnpack() -> contextlib.AbstractContextManager:
    """NNPACK (a CPU convolution backend) may pick Winograd or FFT algorithms: off."""
    nnpack = getattr(torch.backends, "nnpack", None)
    return nnpack.flags(enabled=False) if nnpack is not None else contextlib.nullcontext()


@autocast_off
@torch.no_grad()
def sound_logits(
    backbone: nn.Module,
    st: SoundState,
    x: torch.Tensor,
    K: torch.Tensor,
    epsilon: float,
    lipschitz: str,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Prediction, proven radius and logits of a batch in sound mode.

    Args:
        backbone: The live (float32) backbone.
        st: The proven state of the current weights.
        x: ``(B, *in_shape)`` inputs; NaN or Inf raises :class:`GloroInputError`.
        K: Proven float64 class-pair bounds (``(C, C)``, or ``(C,)`` for the basic variant).
        epsilon: The radius the decision is for.
        lipschitz: ``"margin"`` or ``"basic"``.
        precision: ``"auto"`` (float32 first) or ``"float64"`` (every point in float64).

    Returns:
        ``(pred, radius, logits, precision)``: logits are float64 values; ``precision`` is
        ``"float64"`` when every row of them came from the float64 copy, else ``"float32"``.
    """
    exact_in_f32 = x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if precision == "float64" or st.err32 is None or not exact_in_f32:
        x64 = x.to(torch.float64)
        x_norm = norm_upper64(x64)  # (B,)
        _require_finite(x, x_norm)
        return (*_float64(st, x64, x_norm, K, lipschitz), "float64")
    x_norm = _norm_upper(x.to(torch.float32))  # (B,) float64
    _require_finite(x, x_norm)
    with eval_mode(backbone), strict_fp32():
        if st.graph32 is None:
            y, feats, acts = _float32_pass(flatten_layers(backbone), st.layerwise32[0], x)
            feat_norm = _norm_upper(feats)
        else:
            y, norms = _graph_float32_pass(backbone, st.graph32, x)
            feat_norm = norms.get(st.graph32.out, x_norm)  # (the head may read x itself)
    peak = st.peak32[0] * x_norm + st.peak32[1]  # (B,)
    unsafe = ~torch.isfinite(y).all(dim=1) | ~(peak < _F32_SAFE)
    j = y.argmax(dim=1)  # (B,) the class certified_radius decides on
    r = _head_error(st.head32, feat_norm)  # (B,)
    # 1. The a-priori feature allowance ‖e‖ ≤ p‖x‖ + q: free, decides most points.
    slack = _pair_slack(st.head32, j, st.pen32[0] * x_norm + st.pen32[1], r)  # (B, C)
    pred, radius = margins.certified_radius(y, K, slack, lipschitz=lipschitz)
    radius = radius.masked_fill(unsafe, 0.0)
    open_ = ~unsafe & ~(radius > epsilon) & _may_certify(y, pred, K, slack, epsilon, lipschitz)
    # 2. The per-point allowance from the measured activation norms, on the open points only.
    idx = open_.nonzero().flatten()
    redo = unsafe.clone()
    if idx.numel():
        if st.graph32 is None:
            err = _layerwise_error(acts, st.layerwise32[1], idx, x_norm[idx])  # (n,)
        else:
            at = {k: n[idx] for k, n in norms.items()}
            err = st.graph32.measured_error(at, x_norm[idx], margins.UNIT_ROUNDOFF_F32)
        s2 = _pair_slack(st.head32, j[idx], err, r[idx])  # (n, C)
        p2, r2 = margins.certified_radius(y[idx], K, s2, lipschitz=lipschitz)
        radius = radius.index_put((idx,), r2)
        redo[idx] = ~(r2 > epsilon) & _may_certify(y[idx], p2, K, s2, epsilon, lipschitz)
    # 3. float64 for what float32 leaves open.
    idx = redo.nonzero().flatten()
    if idx.numel():  # (their own float64 norms: a float32 norm may overflow on finite rows)
        x64 = x[idx].to(torch.float64)
        p64, r64, y64 = _float64(st, x64, norm_upper64(x64), K, lipschitz)
        pred, radius, y = pred.index_put((idx,), p64), radius.index_put((idx,), r64), y.clone()
        y[idx] = y64
    return pred, radius, y, "float32"


NON_FINITE_INPUT = "Input contains NaN or Inf values; clean or clip the input before certifying."


def _require_finite(x: torch.Tensor, x_norm: torch.Tensor) -> None:
    """Raises on NaN/Inf input. A finite norm proves a finite row, so the elementwise test
    runs only when some norm is not finite (NaN/Inf input, or a huge finite one)."""
    if not bool(torch.isfinite(x_norm).all()) and not bool(x.isfinite().all()):
        raise GloroInputError(NON_FINITE_INPUT)


def _float32_pass(layers, coefs: list[float], x: torch.Tensor):
    """The backbone's float32 logits, layer by layer.

    ``layers`` are the backbone's leaves (it is a chain of them, ``flatten_layers``), the
    last one the head; ``coefs`` the round-off coefficients of the others.

    Returns:
        ``(logits (B, C) float64, the head's input h̃ (B, ...) float32, [(c_l, h̃_l), ...])``
        with the input of each leaf before the head whose coefficient is not 0.
    """
    h = x.to(torch.float32)
    acts = []
    for i, (layer, c) in enumerate(zip(layers[:-1], coefs, strict=True)):
        if c:
            acts.append((c, None if i == 0 else h))  # None: the input, whose norm is known
        h = layer(h)
    return layers[-1](h).to(torch.float64), h, acts


class _NormRecorder(fx.Interpreter):
    """Runs a graph, recording an upper bound on the norm of each value in ``want`` (node
    name -> value index) as it is computed, before a later op may overwrite it in place."""

    def __init__(self, gm: fx.GraphModule, want: dict[str, int]) -> None:
        super().__init__(gm)
        self.want, self.norms = want, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        k = self.want.get(n.name)
        if k is not None:
            self.norms[k] = _norm_upper(out)
        return out


def _graph_float32_pass(gm: fx.GraphModule, graph, x: torch.Tensor):
    """A traced backbone's float32 logits (B, C) float64, and ``{value index: (B,) norm}``
    of the values :meth:`GraphBound.measured_values` names (not the input)."""
    rec = _NormRecorder(gm, graph.measured_values(margins.UNIT_ROUNDOFF_F32))
    y = rec.run(x.to(torch.float32))
    return y.to(torch.float64), rec.norms


def _layerwise_error(acts, const: float, idx: torch.Tensor, x_norm: torch.Tensor):
    """(n,) proven ‖h̃ − h‖₂ of the features of rows ``idx``: const + Σ_l c_l‖h̃_l‖ (a posteriori).

    ``x_norm`` bounds the rows' input norms. The other norms are taken in float32 as sqrt of
    a plain sum of squares (PyTorch's 2-norm; it overflows to inf rather than rescaling):
    D squares and any-order sums of non-negative terms stay within a relative γ_{D+1}
    (Higham §3.1), the square root within u, and squares in the subnormal range lose at most
    sqrt(D·2^-149) absolutely; :func:`_norm_upper` covers all three.
    """
    err = torch.full_like(x_norm, const)
    few = 4 * idx.numel() < next((h.shape[0] for _, h in acts if h is not None), 0)
    for c, h in acts:
        if h is None:
            norm = x_norm
        else:  # copying a few rows out is cheaper than all norms; for many it is not
            norm = _norm_upper(h[idx]) if few else _norm_upper(h)[idx]
        err = err + c * norm
    # float64 sums of non-negative terms: a relative (L + 1)·2^-53 at most; 1e-9 covers it.
    return err * (1 + 1e-9)


def _head_error(hd: HeadRoundoff, feat_norm: torch.Tensor) -> torch.Tensor:
    """(B,) proven bounds on the float32 round-off of every logit, given upper bounds on the
    norm of the head's input h̃ (:func:`_norm_upper`).

    γ_n(max_k ‖w_k‖·‖h̃‖ + max_k |b_k|) + underflow; 1 + 1e-9 covers the rounding of these
    few float64 operations.
    """
    return (hd.gamma * (hd.row_norm * feat_norm + hd.bias) + hd.underflow) * (1 + 1e-9)


def _pair_slack(hd: HeadRoundoff, j: torch.Tensor, err: torch.Tensor, r: torch.Tensor):
    """(B, C) proven bounds on the float32 round-off of each margin y_j − y_i.

    y_j − y_i = (w_j − w_i)·h̃ + b_j − b_i, rounded per logit: off from the exact margin by at
    most ‖w_j − w_i‖·‖h̃ − h‖ + 2r, with ``err`` (B,) ≥ ‖h̃ − h‖ and ``r`` (B,) the logits' own
    round-off. 1 + 1e-9 covers the rounding of these few float64 operations.
    """
    return (hd.pair[j] * err[:, None] + 2 * r[:, None]) * (1 + 1e-9)


def _norm_upper(h: torch.Tensor) -> torch.Tensor:
    """(B,) float64 upper bounds on the exact ℓ2 norm of each float32 row of ``h``.

    Inflating PyTorch's float32 2-norm by 1 + 2(D + 2)·u and adding 1e-18 covers its
    round-off and squares in the subnormal range (D < 10^6; see :func:`_layerwise_error`).
    Rows of 2^22 entries or more get +inf (the points go to float64).
    """
    flat = h.flatten(1)
    if (flat.shape[1] + 2) * margins.UNIT_ROUNDOFF_F32 >= 0.25:  # past the model's validity
        return torch.full(flat.shape[:1], math.inf, dtype=torch.float64, device=h.device)
    grow = 1 + 2 * (flat.shape[1] + 2) * margins.UNIT_ROUNDOFF_F32
    return torch.linalg.vector_norm(flat, dim=1).to(torch.float64) * grow + 1e-18


def norm_upper64(x64: torch.Tensor) -> torch.Tensor:
    """(B,) upper bounds on the exact ℓ2 norm of each float64 row of ``x64``.

    PyTorch's 2-norm is a plain sum of squares: inflating it by 1 + 2(D + 2)·2^-53 covers its
    round-off, and 1e-150 the squares lost in the subnormal range (each off by at most
    2^-1075, so in all at most sqrt(D·2^-1075) < 1e-150 for D < 10^10), which made tiny
    inputs' norms 0.
    """
    flat = x64.flatten(1)
    grow = 1 + 2 * (flat.shape[1] + 2) * margins.UNIT_ROUNDOFF_F64
    return torch.linalg.vector_norm(flat, dim=1) * grow + 1e-150


def _float64(st: SoundState, x64, x_norm, K, lipschitz):
    with cudnn_off():  # plain dot-product kernels only
        y = st.backbone64(x64)  # (B, C)
    # |e_j − e_i| ≤ 2‖e‖₂, and ‖e‖₂ ≤ coef·‖x‖ + const; 1.01 absorbs this line's rounding.
    slack = 2.02 * (st.err_coef * x_norm + st.err_const)  # (B,)
    pred, radius = margins.certified_radius(y, K, slack, lipschitz=lipschitz)
    # A row whose values may have overflowed on the way (an inf clipped by a ReLU leaves
    # finite logits) is outside the round-off model: never certified.
    return pred, radius.masked_fill_(~float64_safe(st, x_norm), 0.0), y


def float64_safe(st: SoundState, x_norm: torch.Tensor) -> torch.Tensor:
    """(B,) True where no value of the float64 pass can have overflowed (``SoundState.peak64``)."""
    return st.peak64[0] * x_norm + st.peak64[1] < F64_SAFE


def _may_certify(y, pred, K, slack, epsilon: float, lipschitz: str) -> torch.Tensor:
    """(B,) True where float64 might certify a point that float32 did not (a superset).

    ``slack`` is ``(B,)`` or ``(B, C)`` as in :func:`margins.certified_radius`: it bounds
    |(y_j − y_i) − (f_j − f_i)| for j = ``pred``. Any class j' that float64 certifies has exact
    margins f_j' − f_i > ε·K_j'i, so float32 margins y_j' − y_i > ε·K_j'i − slack. If j' is
    float32's argmax j, the first test below holds; otherwise, for i = j,
    y_j' − y_j + slack_jj' > ε·K_j'j (slack bounds the pair's error in either order), which
    the second test catches. Both are loosened by a relative 1e-9 so that their own rounding
    can only add points.
    """
    Kp = K if lipschitz == "margin" else K[:, None] + K[None, :]  # (C, C)
    s = (slack if slack.dim() == 2 else slack[:, None]) * (1 + 1e-9)  # (B, C) or (B, 1)
    yj = y.gather(1, pred[:, None])  # (B, 1)
    d = yj - y  # (B, C): y_j − y_i
    s = s.add(y.abs().add_(yj.abs()), alpha=1e-9)  # (B, C): the slack, 1e-9·(|y_j| + |y_i|)
    need = Kp[pred].mul_(epsilon)  # (B, C): ε·K_ji
    ok = (d + s).add_(need, alpha=1e-9) >= need  # (B, C)
    all_pass = ok.scatter_(1, pred[:, None], True).all(dim=1)  # (B,): i = j passes
    need_t = Kp.t()[pred].mul_(epsilon)  # (B, C): ε·K_ij, class i over the argmax j
    other = (s - d).add_(need_t, alpha=1e-9) >= need_t  # (B, C)
    return all_pass | other.scatter_(1, pred[:, None], False).any(dim=1)
