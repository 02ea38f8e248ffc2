"""What GloroNet caches per weights generation (:mod:`torchgloro.bounds.generation`): the
proven bounds, the round-off models of float64 and float32 evaluation, a float64 copy."""

from __future__ import annotations

import copy
import platform
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from torchgloro import margins
from torchgloro._errors import UnsupportedLayerError
from torchgloro.bounds import roundoff, sound
from torchgloro.bounds.graph import GraphBound
from torchgloro.bounds.registry import LayerBound, linear_fp_terms


@dataclass
class SoundState:
    """Proven constants of one weights generation, and a float64 copy of the backbone."""

    fingerprint: int
    k_pen: float  # proven bound on the Lipschitz constant of everything before the head
    backbone64: nn.Module
    err_coef: float  # ‖float64 logits − exact logits‖₂ ≤ err_coef·‖x‖₂ + err_const
    err_const: float
    # Every value the float64 pass computes is at most a·‖x‖₂ + b (overflow check: the
    # round-off model above assumes nothing overflowed).
    peak64: tuple[float, float]
    # The same for float32 logits of the live backbone, a priori (p, q); and a bound
    # a·‖x‖ + b on every value computed on the way (overflow check). None where the float32
    # path does not apply, as are the fields below.
    err32: tuple[float, float] | None = None
    peak32: tuple[float, float] | None = None
    # The float32 error of the penultimate features h̃ (the head's input): a priori (p, q),
    # and per layer (c, d), ‖h̃ − h‖ ≤ Σ_l c_l‖h̃_l‖ + d over the leaves before the head, with
    # h̃_l the computed input of leaf l. With the head's own round-off they bound each margin.
    pen32: tuple[float, float] | None = None
    layerwise32: tuple[list[float], float] | None = None
    head32: HeadRoundoff | None = None
    # A traced graph's backbone instead has its per-value model (GraphBound.measured_error)
    # in place of layerwise32.
    graph32: GraphBound | None = None
    class_bounds: torch.Tensor | None = None  # proven float64 K, filled by GloroNet on use


@dataclass
class HeadRoundoff:
    """What bounds the float32 round-off of a margin y_j − y_i beyond the features' error.

    Each float32 logit is a sum of ``n`` products (bias included), so
    |fl(w_k·h̃ + b_k) − (w_k·h̃ + b_k)| ≤ ``gamma``·(‖w_k‖‖h̃‖ + |b_k|) + ``underflow``
    (Higham §3.1 and Cauchy–Schwarz), and an error e in the features moves the margin by at
    most ‖w_j − w_i‖·‖e‖.
    """

    gamma: float  # γ_n for float32, rounded up with a 0.1% margin
    underflow: float  # absolute error of products in the subnormal range
    row_norm: float  # proven upper bound on max_k ‖w_k‖₂
    bias: float  # max_k |b_k| (0 without a bias)
    pair: torch.Tensor  # (C, C) float64 proven upper bounds on ‖w_j − w_i‖₂


@torch.no_grad()
def build_sound_state(
    fp: int,
    backbone: nn.Module,
    bounds: Sequence[LayerBound],
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
) -> SoundState:
    """Proven per-layer norms, their product and the float64 round-off model of the backbone.

    Args:
        fp: The weights generation (fingerprint) the state belongs to.
        backbone: The backbone, copied to float64 for sound-mode logits.
        bounds: The bounds of every layer before the head, in order.
        head_weight: ``(C, d)`` the head's effective weight.
        head_bias: The head's bias, if any.
    """
    _refuse_narrow_derived_weights(backbone)
    backbone64 = copy.deepcopy(backbone).to(torch.float64).eval()
    for p in backbone64.parameters():
        p.requires_grad_(False)
    norms = [b.sound() for b in bounds]
    w = head_weight.detach()
    abs_w = sound.dense_norm_upper(w.abs())
    head = (sound.dense_norm_upper(w), linear_fp_terms(w, head_bias, abs_norm_upper=abs_w))
    layers = [(n, b.fp_terms(), b.peak_terms) for n, b in zip(norms, bounds)]
    chain = [*layers, head]
    err_coef, err_const = margins.forward_error_coefficients(chain, underflow=margins.UNDERFLOW_F64)
    peak64 = margins.peak_magnitude_coefficients(
        chain, margins.UNIT_ROUNDOFF_F64, underflow=margins.UNDERFLOW_F64
    )
    k_pen = margins.product_upper(norms)
    state = SoundState(fp, k_pen, backbone64, err_coef, err_const, peak64)
    u32, low = margins.UNIT_ROUNDOFF_F32, margins.UNDERFLOW_F32
    graph = bounds[0] if len(bounds) == 1 and isinstance(bounds[0], GraphBound) else None
    if not _float32_weights(backbone) or not _terms_fit_float32([head]):
        return state
    if graph is not None:
        if graph.float32_applies():  # docs/soundness.md §14b
            pen = graph.roundoff(u32)  # the head's input, then the head itself
            out = roundoff.through_layer(pen, head[0], head[1], None, u32, low)
            state.err32, state.peak32, state.pen32 = out.err, out.peak, pen.err
            state.head32, state.graph32 = _head_roundoff(w, head_bias, u32, low), graph
    elif all(b.fp_terms_precision_free for b in bounds) and _terms_fit_float32(layers):
        state.err32 = margins.forward_error_coefficients(chain, u32, underflow=low)
        state.peak32 = margins.peak_magnitude_coefficients(chain, u32, underflow=low)
        state.pen32 = margins.forward_error_coefficients(layers, u32, underflow=low)
        state.layerwise32 = margins.layerwise_error_coefficients(layers, u32, underflow=low)
        state.head32 = _head_roundoff(w, head_bias, u32, low)
    return state


def _refuse_narrow_derived_weights(backbone: nn.Module) -> None:
    """Layers that derive their weights (``LLNLinear``'s normalized rows, ``LiResBlock``'s
    folded kernel) round them to a bfloat16/float16 backbone's dtype, while the float64 copy
    keeps them at float32 precision: the bounds and the certified function would differ."""
    narrow = {
        t.dtype
        for t in [*backbone.parameters(), *backbone.buffers()]
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64)
    }
    derived = [
        m
        for m in backbone.modules()
        if hasattr(m, "effective_weight") or hasattr(m, "folded_kernel")
    ]
    if narrow and derived:
        raise UnsupportedLayerError(
            f"Sound certification of {derived[0].__class__.__name__} needs float32 or float64 "
            f"weights, got {', '.join(sorted(str(d) for d in narrow))}: its derived weights "
            f"would be rounded differently in the net and in its proof. Call net.float() "
            f"before certifying (mixed precision belongs in autocast, not in the weights)."
        )


def _terms_fit_float32(chain) -> bool:
    """Whether every layer's dot products are short enough for float32's γ_n (n·u < 1/2)."""
    u32 = margins.UNIT_ROUNDOFF_F32
    return all(t is None or margins.gamma(t[0], u32) < 1 for _, t, *_ in chain)


def _head_roundoff(w: torch.Tensor, bias: torch.Tensor | None, u: float, low: float):
    w64 = w.to(torch.float64)
    n = w64.shape[1] + (bias is not None)
    gamma = margins.round_up(margins.gamma(n, u) * 1.001, 4)
    b = 0.0 if bias is None else bias.detach().to(torch.float64).abs().max().item()
    row = margins.row_norms(w64, upper=True).max().item()
    return HeadRoundoff(gamma, low, row, b, margins.pairwise_row_distances(w64, upper=True))


# CPUs on which PyTorch may run 3x3 convolutions with in_channels == groups by Winograd,
# whose round-off the per-product model does not cover.
_WINOGRAD_CPU = platform.machine().lower() in ("aarch64", "arm64", "armv7l", "riscv64")


def _float32_weights(backbone: nn.Module) -> bool:
    """Whether float32 logits of ``backbone`` may follow the per-layer round-off model (its
    layers' ``fp_terms`` must also hold in float32: checked by the caller).

    Every parameter and buffer must be float32 (the float32 pass then computes with the very
    weights the bounds were proven for), and no convolution may run by Winograd.
    """
    tensors = [*backbone.parameters(), *backbone.buffers()]
    if not tensors or any(t.dtype != torch.float32 for t in tensors if t.is_floating_point()):
        return False
    for m in backbone.modules():  # PyTorch on ARM runs depthwise 3x3 convs with Winograd
        if isinstance(m, nn.Conv2d) and m.groups == m.in_channels and m.kernel_size == (3, 3):
            # (use_cpu_depthwise3x3_winograd: in_channels == groups, which a one-channel
            # plain conv also meets; only on ARM/RISC-V builds, but depthwise everywhere)
            if m.groups > 1 or _WINOGRAD_CPU:
                return False
    return True
