"""Per-layer ℓ2 Lipschitz bounds, and the registry that maps layer types to them.

Each supported layer gets a :class:`LayerBound` that can give

* ``estimate()``: the *fast* power-iteration estimate used in training (a lower estimate of
  the layer's operator norm that becomes tight as the iterates converge), optionally
  differentiable with respect to the layer's weights;
* ``sound()``: a *proven* upper bound on the operator norm, used for certification.

Layers are looked up by exact type in a registry, so a subclass that changes ``forward``
is never silently accepted. Unknown layers raise :class:`UnsupportedLayerError`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from torchgloro._errors import UnsupportedLayerError
from torchgloro._net_attributes import eval_mode
from torchgloro.margins import NORM_UNDERFLOW_F64, UNIT_ROUNDOFF_F64, gamma, round_up

__all__ = [
    "LayerBound",
    "ConstantBound",
    "PowerIterationBound",
    "DenseBound",
    "Conv2dBound",
    "register_bound",
    "supported_layers",
    "bound_for",
    "flatten_layers",
    "trace_input_shapes",
    "backend_off",
    "small_conv",
    "float32_relative",
]

BoundFactory = Callable[[nn.Module, tuple[int, ...]], "LayerBound"]
_REGISTRY: dict[type[nn.Module], BoundFactory] = {}


def register_bound(*layer_types: type[nn.Module]) -> Callable[[BoundFactory], BoundFactory]:
    """Registers a factory ``(module, in_shape) -> LayerBound`` for exact layer types."""

    def deco(factory: BoundFactory) -> BoundFactory:
        for t in layer_types:
            _REGISTRY[t] = factory
        return factory

    return deco


def supported_layers() -> list[str]:
    """Names of every layer type with a registered Lipschitz bound."""
    return sorted(t.__name__ for t in _REGISTRY)


def bound_for(module: nn.Module, in_shape: tuple[int, ...]) -> LayerBound:
    """Builds the :class:`LayerBound` of ``module`` for inputs of shape ``in_shape`` (no batch).

    Raises:
        UnsupportedLayerError: if no bound is registered for ``type(module)``.
    """
    factory = _REGISTRY.get(type(module))
    if factory is None:
        raise UnsupportedLayerError(
            f"No Lipschitz bound is known for layer {module.__class__.__name__} ({module!r}), so "
            f"nothing computed through it could be certified. Supported layers: "
            f"{', '.join(supported_layers())}. Replace the layer, or register a proven bound "
            f"with torchgloro.bounds.registry.register_bound({module.__class__.__name__})."
        )
    return factory(module, tuple(in_shape))


def flatten_layers(backbone: nn.Module) -> list[nn.Module]:
    """The leaf layers of a (possibly nested) ``nn.Sequential``, in execution order.

    A module type with a registered bound counts as a leaf, even if it has children.
    """
    if type(backbone) in _REGISTRY:
        return [backbone]
    if type(backbone) is nn.Sequential:
        return [leaf for child in backbone for leaf in flatten_layers(child)]
    raise UnsupportedLayerError(
        f"Cannot bound the Lipschitz constant through {backbone.__class__.__name__}: a backbone "
        f"must be an nn.Sequential of supported layers ({', '.join(supported_layers())}), "
        f"or a module type registered with torchgloro.bounds.registry.register_bound."
    )


@torch.no_grad()
def trace_input_shapes(layers: Sequence[nn.Module], in_shape: tuple[int, ...]) -> list[tuple]:
    """The per-sample input shape of each layer, found by one dummy forward pass in eval
    mode (in training mode a BatchNorm would fold the dummy batch into its running
    statistics, changing the user's trained model).

    Raises:
        UnsupportedLayerError: a layer changes the batch dimension (a padding or reshape
            across samples): its outputs would no longer be one per input.
    """
    p = next((p for layer in layers for p in layer.parameters()), None)
    x = torch.zeros(
        (2, *in_shape),  # two samples: a layer that mixes or pads the batch shows
        device=p.device if p is not None else None,
        dtype=p.dtype if p is not None else None,
    )
    shapes = []
    for layer in layers:
        shapes.append(tuple(x.shape[1:]))
        with eval_mode(layer):
            x = layer(x)
        if x.ndim == 0 or x.shape[0] != 2:
            raise UnsupportedLayerError(
                f"{layer.__class__.__name__} turns a batch of 2 inputs into {tuple(x.shape)}: "
                f"every layer must keep one output per input along dimension 0 (padding or "
                f"reshaping across the batch is not supported). Check its dims or padding."
            )
    return shapes


class LayerBound(nn.Module):
    """Lipschitz-bound state of one layer. Subclasses implement ``estimate`` and ``sound``."""

    # Whether ``fp_terms`` is a model of the layer alone (n, ‖|A|‖, ‖b‖), valid for any
    # evaluation precision; False where it folds in float64's unit round-off.
    fp_terms_precision_free: bool = True

    def estimate(self, n_iter: int = 0, differentiable: bool = False) -> torch.Tensor:
        """Fast estimate of the operator norm as a 0-dim tensor.

        Args:
            n_iter: Power iterations to run first (updating persistent state, no grad).
            differentiable: Whether the returned value carries gradients to the weights.
        """
        raise NotImplementedError

    def iterate(self, n_iter: int) -> None:
        """Runs ``n_iter`` power iterations on the persistent state (no grad, in place).

        Must not sync with the host: a training step replays it from a CUDA graph. The
        default advances through ``estimate`` and drops the value.
        """
        if n_iter > 0:
            with torch.no_grad():
                self.estimate(n_iter=n_iter)

    def converge(self, tol: float = 1e-5, max_iter: int = 1_000) -> torch.Tensor:
        """Runs the estimate to convergence (relative change below ``tol``)."""
        return self.estimate()

    def sound(self) -> float:
        """A proven upper bound on the operator norm."""
        raise NotImplementedError

    def fp_terms(self) -> tuple[int, float, float] | None:
        """Round-off model of the layer when evaluated in floating point.

        Returns:
            ``None`` when the layer is computed exactly (ReLU, MinMax, max, reshapes, zero
            padding) and maps 0 to 0; otherwise ``(n, abs_norm, bias_norm)``: each output is a
            sum of at most ``n`` products (bias included), ``abs_norm`` bounds ‖|A|‖₂ for the
            entrywise-absolute operator, and ``bias_norm`` bounds ‖b‖₂ of the layer's output
            bias. See docs/soundness.md (floating point).
        """
        raise NotImplementedError

    def peak_terms(self, unit_roundoff: float) -> tuple[float, float] | None:
        """Values computed inside the layer that :meth:`fp_terms` does not bound.

        The overflow guards assume every value of a pass stays below the evaluation
        precision's largest float. For ``fp_terms = (n, A, b)`` they bound an affine layer's
        partial sums by (1 + γ_n)(A‖h̃‖ + ‖b‖); a layer whose evaluation passes through larger
        values (a pool that sums its window before dividing, a block of several layers)
        returns ``(a, c)`` here: every such value is at most ``a·‖h̃‖₂ + c`` in absolute
        value, for the computed input h̃ and evaluation at ``unit_roundoff``. None: nothing
        beyond the model.
        """
        return None


def float32_relative(*constants: float) -> bool:
    """Whether each constant rounds to float32 within a relative u (0, or a normal float32
    magnitude). PyTorch rounds a Python number to float32 before a float32 op (a scale, a
    shift, a LeakyReLU slope, clamp limits); a subnormal one is off by up to 2^-150
    absolutely (1e-40: 1.4e-5 relative), one past float32's range becomes inf."""
    tiny, big = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    return all(c == 0 or tiny <= abs(c) <= big for c in constants)


class ConstantBound(LayerBound):
    """A layer whose norm is a known constant (exact, hence also sound).

    ``peak_gain`` bounds the layer's internal values relative to its input's norm, before
    rounding (see :meth:`LayerBound.peak_terms`); the rounding of a sum of ``n`` terms adds
    the factor 1 + γ_n. ``precision_free`` is :attr:`LayerBound.fp_terms_precision_free`.
    """

    def __init__(
        self,
        value: float,
        name: str,
        fp_terms: tuple[int, float, float] | None = None,
        peak_gain: float | None = None,
        precision_free: bool = True,
    ) -> None:
        super().__init__()
        self.fp_terms_precision_free = precision_free
        self.value = float(value)
        self.name = name
        self._fp_terms = fp_terms
        self._peak_gain = peak_gain
        self.register_buffer("_value", torch.tensor(self.value), persistent=False)

    def estimate(self, n_iter: int = 0, differentiable: bool = False) -> torch.Tensor:
        return self._value

    def iterate(self, n_iter: int) -> None:
        pass  # nothing to iterate

    def sound(self) -> float:
        return self.value

    def fp_terms(self) -> tuple[int, float, float] | None:
        return self._fp_terms

    def peak_terms(self, unit_roundoff: float) -> tuple[float, float] | None:
        if self._peak_gain is None:
            return None
        n = self._fp_terms[0] if self._fp_terms is not None else 1
        return round_up((1 + gamma(n, unit_roundoff)) * self._peak_gain * 1.001, 4), 0.0

    def extra_repr(self) -> str:
        return f"{self.name}: {self.value:g}"


class PowerIterationBound(LayerBound):
    """Power iteration on a linear operator ``A`` with a persistent iterate ``u``.

    Subclasses provide ``_op(u, weight)`` (A u, linear in ``weight``) and
    ``_op_adjoint(v, weight)`` (Aᵀ v), and override ``_weight()`` when the operator's matrix
    is derived from the layer's parameters (a folded kernel, normalized rows) rather than
    ``layer.weight`` itself. (Not ``_apply``: that name belongs to ``nn.Module`` and is what
    ``.to()`` calls.)
    """

    # Small convolutions run faster without oneDNN on CPU; set by subclasses (small_conv).
    _native_cpu: bool = False

    def __init__(self, layer: nn.Module, u_shape: tuple[int, ...]) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule: owned by the backbone
        ref = next(layer.parameters())
        u = torch.randn(u_shape, device=ref.device, dtype=ref.dtype)
        self.register_buffer("u", u / u.norm())

    def _weight(self) -> torch.Tensor:
        return self.layer.weight

    def _op(self, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _op_adjoint(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _on_native_cpu(self) -> bool:
        # Under torch.compile the compiler picks the kernels: no backend switch to trace.
        return (
            self._native_cpu and self.u.device.type == "cpu" and not torch.compiler.is_compiling()
        )

    def _backend(self) -> contextlib.AbstractContextManager:
        """Where the single-instance ops run: oneDNN off for small CPU convolutions."""
        return _without_onednn() if self._on_native_cpu() else contextlib.nullcontext()

    def iterate(self, n_iter: int) -> None:
        self._iterate(n_iter)

    @torch.no_grad()
    def _iterate(self, n_iter: int) -> None:
        if n_iter <= 0:
            return
        w = self._weight().detach()
        u = self.u
        norms = []
        with self._backend():
            for _ in range(n_iter):
                z = self._op_adjoint(self._op(u, w), w)
                norm = torch.linalg.vector_norm(z)
                u = z / norm  # a zero norm gives NaN, which the guard below rejects
                norms.append(norm)
        # A zero (or vanishing) weight gives z = 0: keep the old unit iterate instead of
        # collapsing it to 0 or NaN, which would freeze the bound at 0 forever (TF gloro #8).
        # One guard per call instead of one per iteration: with the weight fixed, ‖AᵀA u_k‖
        # is non-decreasing in k for unit iterates (log-convexity of uᵀ(AᵀA)ʲu), so a
        # vanishing norm shows up at the first iteration, where the per-iteration guard
        # would also have kept the old iterate for good. NaN norms (and the NaN iterates that
        # follow a zero norm) also keep it: amin propagates NaN, and NaN > 1e-30 is False.
        ok = torch.stack(norms).amin() > 1e-30
        self.u.copy_(torch.where(ok, u, self.u))

    def estimate(self, n_iter: int = 0, differentiable: bool = False) -> torch.Tensor:
        if n_iter:
            self._iterate(n_iter)
        if not (differentiable and torch.is_grad_enabled()):
            with torch.no_grad(), self._backend():
                return torch.linalg.vector_norm(self._op(self.u, self._weight().detach()))
        w = self._weight()  # (carries the graph to the parameters)
        if not self._on_native_cpu():
            # A copy of u: a later in-place update must not invalidate this graph.
            return torch.linalg.vector_norm(self._op(self.u.clone(), w))
        # The backward of a differentiable A(w) u would run when the training step's
        # backward does, with oneDNN on. Instead: ‖A(w) u‖ is positively homogeneous of
        # degree 1 in w (A is linear in w), so by Euler's identity it equals
        # ⟨w, ∇_w ‖A(w) u‖⟩, with the same gradient. The gradient is computed here, once,
        # without a graph and without oneDNN; the step's backward is one elementwise product.
        with torch.no_grad(), _without_onednn():
            wd = w.detach()
            z = self._op(self.u, wd)
            v = z / torch.linalg.vector_norm(z).clamp_min(1e-30)  # 0 where A u = 0
            grad = self._op_weight_grad(self.u, v, wd)  # ∇_w ‖A(w) u‖ = ∇_w ⟨v, A(w) u⟩
        return (w * grad).sum()

    def _op_weight_grad(self, u: torch.Tensor, v: torch.Tensor, weight: torch.Tensor):
        """∇_w ⟨v, A(w) u⟩ at ``weight``; needed by subclasses that set ``_native_cpu``."""
        raise NotImplementedError

    @torch.no_grad()
    def converge(self, tol: float = 1e-5, max_iter: int = 1_000) -> torch.Tensor:
        sigma = self.estimate()
        for _ in range(0, max_iter, 10):
            new = self.estimate(n_iter=10)
            if (new - sigma).abs() <= tol * new.clamp_min(1e-30):
                return new
            sigma = new
        return sigma


@torch.no_grad()
def linear_fp_terms(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    positions: int = 1,
    abs_norm_upper: float | None = None,
) -> tuple[int, float, float]:
    """Round-off terms ``(n, ‖|A|‖₂ bound, ‖b‖₂)`` of a dense or convolution layer.

    ``weight`` is ``(out, in, *kernel)``. By Schur's test ‖|A|‖₂ ≤ sqrt(R·C) with R the
    largest absolute row sum and C the largest absolute column sum of A. For a convolution,
    a row of A holds one output channel's kernel entries (at most), and a column holds, for
    one input channel, each (output channel, kernel offset) at most once, so R and C are
    bounded by sums of |weight| over (in, kernel) and over (out, kernel) respectively.
    ``abs_norm_upper``, a proven bound on ‖|A|‖₂ computed by the caller (the operator of
    |weight|: each entry of A is one weight or 0), replaces Schur's when smaller.
    """
    w = weight.detach().abs().to(torch.float64)
    w2 = w.reshape(w.shape[0], w.shape[1], -1)  # (out, in, k)
    # float64 sums of m non-negative terms are off by at most (m - 1)·u relative.
    row = w2.sum(dim=(1, 2)).max().item() * (1 + 2 * w2[0].numel() * UNIT_ROUNDOFF_F64)
    col = w2.sum(dim=(0, 2)).max().item() * (1 + 2 * w2[:, 0].numel() * UNIT_ROUNDOFF_F64)
    abs_norm = round_up(math.sqrt(round_up(row * col, 4)) * (1 + 1e-12), 4)
    if abs_norm_upper is not None:
        abs_norm = min(abs_norm, abs_norm_upper)
    n = w2.shape[1] * w2.shape[2] + (bias is not None)
    b = 0.0
    if bias is not None:
        bias64 = bias.detach().double()
        grow = 1 + 2 * (bias64.numel() + 2) * UNIT_ROUNDOFF_F64
        norm = bias64.norm().item() * grow + NORM_UNDERFLOW_F64  # tiny biases: see margins
        b = round_up(norm * math.sqrt(positions) * (1 + 1e-12))
    return n, abs_norm, b


def small_conv(weight_shape: Sequence[int], positions: int) -> bool:
    """Whether a single-instance convolution is faster on CPU without oneDNN.

    For one instance, oneDNN's per-call setup dominates: measured on a 2-core Xeon with one
    thread (benchmarks/results/conv_backend-cpu.json), PyTorch's native kernels run
    ``conv`` + ``conv_transpose`` 2-7× faster below about a million multiply-adds or with
    at most 4 input channels, and up to 1.8× slower above. The rule depends on shapes only,
    so a run and its resumption always pick the same kernels (bit-identical on CPU).

    Args:
        weight_shape: ``(out, in / groups, kh, kw)``.
        positions: Output positions (``H_out · W_out``); multiply-adds = weight size × this.
    """
    return weight_shape[1] <= 4 or math.prod(weight_shape) * positions <= 1_000_000


@contextlib.contextmanager
def backend_off(backend):
    """``backend.enabled = False`` for the enclosed block (``torch.backends.mkldnn``,
    ``torch.backends.cudnn``), restored after. Not ``backend.flags(enabled=False)``: cuDNN's
    also reads the legacy TF32 flag, which raises once the ``fp32_precision`` API was used."""
    prev = backend.enabled
    backend.enabled = False
    try:
        yield
    finally:
        backend.enabled = prev


def _without_onednn():
    return backend_off(torch.backends.mkldnn)


# The built-in layers' bounds live in bounds/builtin.py, which registers them on import (it
# needs the classes above, hence the import at the bottom).
from torchgloro.bounds.builtin import Conv2dBound, DenseBound  # noqa: E402
