"""The GloRo net: a backbone f plus one extra logit ⊥ that certifies ℓ2 robustness."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from torchgloro import margins
from torchgloro._certify import (
    Certificate,
    autocast_off,
    eval_mode,
    ieee_arithmetic,
    sound_logits,
)
from torchgloro._cuda_graph import GraphedIterations, graphs_usable
from torchgloro._errors import GloroError, GloroInputError
from torchgloro._inputs import check_epsilon, check_input, epsilon_tensor, unshared
from torchgloro._net_attributes import apply_keeping_dtypes, fixed_setting
from torchgloro.bounds.capture import PendingBound, build_bounds, capture, resolve_in_shape
from torchgloro.bounds.generation import WeightsGeneration
from torchgloro.bounds.registry import ConstantBound
from torchgloro.bounds.structure import check_structure, refuse_hooks, state_tensors, structure_of
from torchgloro.bounds.weight_cache import SoundState, build_sound_state

__all__ = ["GloroNet", "Certificate"]

Mode = Literal["sound", "fast"]
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.5
Precision = Literal["auto", "float64"]
Variant = Literal["margin", "basic"]


class GloroNet(nn.Module):
    """Instruments a backbone ``f`` with the ⊥ logit of Leino et al. (2021).

    ``forward`` returns ``(B, C+1)`` logits: the C class logits of ``f``, then
    ⊥ = max_{i≠j} (y_i + ε·K_ji) with j = argmax y. In training mode the bound comes from
    power iteration (persistent iterates, ``power_iterations`` steps per call, then one
    differentiable step). In eval mode it comes from converged, frozen constants.
    Certification (``certify``/``predict``/``certified_radius``) defaults to ``mode="sound"``:
    proven per-layer upper bounds and float64 logits with a proven round-off allowance.

    Args:
        backbone: Any model whose forward is a static graph ending in an ``nn.Linear`` (the
            class logits). An ``nn.Sequential`` of supported layers runs as it is; any other
            model is traced with ``torch.fx`` and its graph runs (sharing its parameters).
        epsilon: The ℓ2 radius ε > 0.
        in_shape: Per-sample input shape, e.g. ``(1, 28, 28)`` (an int for 1-D inputs);
            defaults to ``backbone.in_shape``, a first ``nn.Linear``'s ``in_features``,
            ``example_input``'s, or else the first batch's, as lazy modules do.
        power_iterations: Power iterations per training step (the paper used 1–10).
        lipschitz: ``"margin"`` (Appendix A.2, default) or ``"basic"`` (K_i + K_j).
        cuda_graphs: On CUDA, replay each training step's power iterations from one
            captured CUDA graph (checked against eager on first capture; eager on failure).
        example_input: A batch ``(B, *in_shape)`` that fixes the input shape.
    """

    def __init__(
        self,
        backbone: nn.Module,
        epsilon: float,
        in_shape: tuple[int, ...] | int | None = None,
        power_iterations: int = 10,
        lipschitz: Variant = "margin",
        cuda_graphs: bool = True,
        example_input: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if lipschitz not in ("margin", "basic"):
            raise GloroInputError(f"lipschitz must be 'margin' or 'basic', got {lipschitz!r}.")
        if power_iterations < 0:
            raise GloroInputError(f"power_iterations must be >= 0, got {power_iterations}.")
        self.backbone, head = capture(backbone)  # the Sequential, or its traced graph
        self.power_iterations = int(power_iterations)
        self._lipschitz = lipschitz
        self.cuda_graphs = bool(cuda_graphs)
        self._graphed = GraphedIterations()

        object.__setattr__(self, "_head", head)
        self._in_shape = resolve_in_shape(in_shape, example_input, backbone, self.backbone)
        shaped = self._in_shape is not None
        self.bounds = nn.ModuleList(
            build_bounds(self.backbone, self._in_shape) if shaped else [PendingBound()]
        )
        self._structure = structure_of(self.backbone)  # what the bounds describe (bounds.structure)
        self.num_classes = int(self._head_weight().shape[0])
        self.register_buffer("_epsilon", epsilon_tensor(epsilon))
        # Converged power-iteration value of the penultimate bound, for eval-mode forward.
        self.register_buffer("_frozen_k_pen", torch.tensor(float("nan")))
        self._weights = WeightsGeneration()
        self._frozen_at: int | None = None
        self._sound_cache: SoundState | None = None
        self.last_class_bounds: torch.Tensor | None = None
        self._frozen_K: tuple[int, torch.Tensor] | None = None

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.half()``, ``.double()`` ... move ε and the frozen bound with the
        net but keep them float32: ``.half()`` turned ε = 0.1 into 0.09998, a smaller radius
        than the one asked for, then saved as the model's ε."""
        return apply_keeping_dtypes(self, ("_epsilon", "_frozen_k_pen"), fn, *args, **kwargs)

    def __getstate__(self) -> dict:
        """Copies and pickles drop ``last_class_bounds``: a tensor of the last training graph
        (``copy.deepcopy`` refuses non-leaf tensors), not state."""
        state = self.__dict__.copy()
        state["last_class_bounds"] = None
        return state

    # ---- configuration ---------------------------------------------------------------------

    @property
    def ABSTAIN(self) -> int:  # noqa: N802 - the public name the API promises
        """The index of ⊥ in predictions: ``num_classes``."""
        return self.num_classes

    in_shape = fixed_setting(
        "in_shape", "the per-sample input shape; the layer bounds were proven for it"
    )
    lipschitz = fixed_setting(
        "lipschitz", '"margin" or "basic"; the proven bounds are cached for it'
    )

    @property
    def epsilon(self) -> float:
        """The ℓ2 radius ε; settable at any time (schedules set it per batch)."""
        return float(self._epsilon)

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._epsilon.copy_(epsilon_tensor(value))

    @property
    def epsilon_buffer(self) -> torch.Tensor:
        """ε as the 0-dim float32 buffer the forward pass reads: for code that must not sync
        with the host or that ``torch.compile`` traces (a float would be a constant)."""
        return self._epsilon

    def _head_weight(self) -> torch.Tensor:
        head = self._head
        return head.effective_weight() if hasattr(head, "effective_weight") else head.weight

    def _fingerprint(self, proof: bool = False) -> int:
        """The weights generation: it changes whenever a value of a backbone tensor does.

        Raises if the backbone's structure changed since the bounds were built, and, for a
        ``proof`` (sound bounds and certificates), if a forward hook could change an output.
        """
        modules = check_structure(self.backbone, self._structure)
        if proof:
            refuse_hooks(modules)
        return self._weights.update(state_tensors(modules, self._structure))

    def __setstate__(self, state: dict) -> None:
        """Nets pickled before the structure check get one; cached proofs are rebuilt."""
        super().__setstate__(state)
        for name in ("in_shape", "lipschitz"):  # plain attributes before they were fixed
            if name in self.__dict__:
                self.__dict__["_" + name] = self.__dict__.pop(name)
        if "_structure" not in self.__dict__:
            self._structure = structure_of(self.backbone)
        self._sound_cache = None

    # ---- Lipschitz constants ---------------------------------------------------------------

    def _iterate_all(self, n_iter: int) -> None:
        for b in self.bounds:
            b.iterate(n_iter)

    def _graph_operands(self) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """(iterates, parameters) when power iteration can replay from a CUDA graph, else None."""
        if not (self.cuda_graphs and self._epsilon.is_cuda):  # the common CPU case: no lists
            return None
        state = [t for b in self.bounds for t in b.buffers() if t.is_floating_point()]
        inputs = list(self.backbone.parameters())
        return (state, inputs) if graphs_usable(state + inputs) else None

    def _advance(self, n_iter: int) -> None:
        """``n_iter`` power iterations on every layer: one CUDA-graph replay on a GPU, or,
        under ``torch.compile``, traced into the caller's graph (in-place buffer updates)."""
        if n_iter <= 0:
            return
        operands = self._graph_operands()
        if operands is None:
            self._iterate_all(n_iter)
        else:
            self._graphed(self._iterate_all, n_iter, *operands)

    def _penultimate_fast(self, n_iter: int, differentiable: bool) -> torch.Tensor:
        self._advance(n_iter)
        k = None
        for b in self.bounds:
            if isinstance(b, ConstantBound) and b.value == 1.0:
                continue  # ReLU, Flatten, ...: k * 1 == k exactly; skip the op (and its grad)
            e = b.estimate(differentiable=differentiable)
            k = e if k is None else k * e
        return self._epsilon.new_ones(()) if k is None else k

    @torch.compiler.disable  # a data-dependent convergence loop: nothing for a compiler
    @ieee_arithmetic  # the frozen K: the same whatever precision the caller set
    @torch.no_grad()
    def refresh(self, converge: bool = True, tol: float = 1e-5) -> torch.Tensor:
        """Runs power iteration (to convergence by default) and freezes the fast constants.

        Each layer iterates until its estimate changes by at most ``tol`` (relative) over 10
        iterations (``LayerBound.converge``). With CUDA graphs (on a GPU) all layers iterate
        together, 10 iterations per graph replay, until every one has converged (at most
        10,000 iterations). Called automatically before eval-mode use when the weights
        changed since the last refresh.

        Returns:
            The frozen penultimate bound (a 0-dim tensor).
        """
        k = self._epsilon.new_ones(())
        if converge and self.bounds and self._graph_operands() is not None:
            dev = self._epsilon.device

            def estimates() -> torch.Tensor:  # (L,)
                return torch.stack([b.estimate().to(dev).reshape(()) for b in self.bounds])

            sigma = estimates()
            for _ in range(1_000):
                self._advance(10)
                new = estimates()
                done = bool(((new - sigma).abs() <= tol * new.clamp_min(1e-30)).all())
                sigma = new
                if done:
                    break
            for e in sigma:
                k = k * e
        else:
            for b in self.bounds:
                k = k * (b.converge(tol=tol) if converge else b.estimate(self.power_iterations))
        self._frozen_k_pen.copy_(k)
        self._frozen_at = self._fingerprint()
        return self._frozen_k_pen

    @property
    def is_stale(self) -> bool:
        """Whether the frozen constants predate the current weights."""
        return self._frozen_at != self._fingerprint() or bool(self._frozen_k_pen.isnan())

    @ieee_arithmetic  # proven bounds: no autocast, IEEE subnormals (whatever the caller set)
    def _sound_state(self) -> SoundState:
        """Proven constants and a float64 copy of the backbone, cached per weights."""
        fp = self._fingerprint(proof=True)
        if self._sound_cache is None or self._sound_cache.fingerprint != fp:
            bias = getattr(self._head, "bias", None)
            self._sound_cache = build_sound_state(
                fp, self.backbone, list(self.bounds), self._head_weight(), bias
            )
        return self._sound_cache

    @ieee_arithmetic  # certified quantities do not depend on the caller's precision settings
    def lipschitz_constant(self, mode: Mode = "sound") -> torch.Tensor:
        """The Lipschitz bounds used to build ⊥.

        Args:
            mode: ``"sound"`` (proven upper bounds, float64) or ``"fast"`` (converged power
                iteration, or the live training estimate in training mode).

        Returns:
            ``(C, C)`` tensor K with K[j, i] bounding the Lipschitz constant of f_j − f_i
            (margin variant), or ``(C,)`` with K_i bounding f_i (basic variant).
        """
        if mode == "sound":
            return self._sound_class_bounds(self._sound_state()).clone()
        if mode != "fast":
            raise GloroInputError(f"mode must be 'sound' or 'fast', got {mode!r}.")
        with torch.no_grad():
            if self.training:  # the live estimate, without advancing the iterates
                return self._class_bounds(self._head_weight(), self._penultimate_fast(0, False))
            return self._current_class_bounds().clone()

    def _sound_class_bounds(self, st: SoundState) -> torch.Tensor:
        """Proven float64 K of the state's weights (computed once per weights generation)."""
        if st.class_bounds is None:
            k_pen = torch.tensor(st.k_pen, dtype=torch.float64)
            w = self._head_weight().detach().to(torch.float64)
            st.class_bounds = self._class_bounds(w, k_pen, upper=True)
        return st.class_bounds

    def _class_bounds(self, w: torch.Tensor, k_pen: torch.Tensor, upper: bool = False):
        if self.lipschitz == "margin":
            rows = margins.pairwise_row_distances(w, upper=upper)  # (C, C)
        else:
            rows = margins.row_norms(w, upper=upper)  # (C,)
        return margins.times_upper(rows, k_pen) if upper else rows * k_pen

    @autocast_off  # the bound stays float32 under a caller's autocast (as in the trainer's AMP)
    def _current_class_bounds(self) -> torch.Tensor:
        """K for the forward pass: live and differentiable in training, else frozen (cached)."""
        if self.training:
            k_pen = self._penultimate_fast(self.power_iterations, differentiable=True)
            return self._class_bounds(self._head_weight(), k_pen)
        if self.is_stale:
            self.refresh()
        if self._frozen_K is None or self._frozen_K[0] != self._frozen_at:
            with torch.no_grad():
                K = self._class_bounds(self._head_weight(), self._frozen_k_pen)
            self._frozen_K = (self._frozen_at, K)
        return self._frozen_K[1]

    # ---- forward -----------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor, check_finite: bool) -> None:
        if self._in_shape is None and isinstance(x, torch.Tensor) and x.dim() > 0:
            self.bounds = nn.ModuleList(build_bounds(self.backbone, tuple(x.shape[1:])))
            self._in_shape = tuple(x.shape[1:])  # fixed by the first batch, as lazy modules do
        check_input(x, self.in_shape, check_finite)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``(B, C+1)`` logits: f(x), then ⊥. ``x`` is cast to the weights' dtype;
        NaN/Inf raise (in training only on the CPU and not under torch.compile: elsewhere the
        check would sync or break the graph)."""
        if torch.jit.is_tracing() or _is_exporting():
            raise GloroError(
                "torch.jit and torch.export cannot trace a GloroNet (its checks depend on the "
                "data). Trace torchgloro.deploy(net) instead: the backbone with K fixed."
            )
        cpu = x.device.type == "cpu" and not torch.compiler.is_compiling()
        self._check_input(x, check_finite=not self.training or cpu)
        return self._with_bottom(self.backbone(x.to(self._head.weight.dtype)))

    def _with_bottom(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, C+1)``: the class logits ``y = f(x)`` (B, C), then ⊥ built from them."""
        K = self._current_class_bounds()  # (C, C) or (C,)
        self.last_class_bounds = K  # reused by margin-aware losses (EMMA, certified hinge)
        bot = margins.bottom_logit(y, K, self._epsilon.to(y.dtype))  # (B,)
        return torch.cat([y, bot.unsqueeze(1)], dim=1)  # (B, C+1)

    # ---- certification ---------------------------------------------------------------------

    @ieee_arithmetic  # certificates need plain IEEE float32/float64 (docs/soundness.md)
    @torch.no_grad()
    def certify(
        self,
        x: torch.Tensor,
        epsilon: float | None = None,
        mode: Mode = "sound",
        fallback: Literal["local"] | None = None,
        precision: Precision = "auto",
    ) -> Certificate:
        """Certifies each point of a batch at radius ``epsilon`` (default: ``self.epsilon``).

        A point is certified only when its top logit beats every other by strictly more than
        ε·K (plus, in ``sound`` mode, a proven bound on the logits' round-off). Ties are never
        certified.

        Args:
            x: ``(B, *in_shape)`` inputs.
            epsilon: The radius; defaults to the net's ε.
            mode: ``"sound"`` (proven bounds) or ``"fast"`` (power-iteration estimate).
            fallback: ``"local"`` gives points the global bound leaves as ⊥ a second, costlier
                but still sound chance with a Lipschitz bound local to their ε-ball
                (:mod:`torchgloro.local`; sound mode only). ``radius`` stays the global one.
            precision: Sound mode's logits. ``"auto"``: float32 with a proven float32
                round-off allowance, and float64 for the points that leaves open (the same
                certified points as ``"float64"``, at about the cost of inference; radii
                slightly smaller). ``"float64"``: every point on a float64 copy (the
                tightest radii; used by ``certified_radius`` and ``fallback="local"``).
        """
        if fallback not in (None, "local"):
            raise GloroInputError(f"fallback must be None or 'local', got {fallback!r}.")
        if fallback == "local" and mode != "sound":
            raise GloroInputError("fallback='local' needs mode='sound' (it is a proven bound).")
        if mode not in ("sound", "fast"):
            raise GloroInputError(f"mode must be 'sound' or 'fast', got {mode!r}.")
        if precision not in ("auto", "float64"):
            raise GloroInputError(f"precision must be 'auto' or 'float64', got {precision!r}.")
        # The net's own ε too: load_state_dict may have put any value in its buffer.
        eps = check_epsilon(self.epsilon if epsilon is None else epsilon)
        self._check_input(x, check_finite=mode != "sound")  # sound mode: on the input norms
        x = unshared(x, self.backbone)  # an in-place layer must not overwrite the caller's x
        if mode == "sound":
            st = self._sound_state()
            K = self._sound_class_bounds(st)
            prec = "float64" if fallback == "local" else precision
            pred, radius, y, used = sound_logits(self.backbone, st, x, K, eps, self.lipschitz, prec)
            cert = Certificate(pred, radius > eps, radius, y, eps, mode, used)
            if fallback == "local":
                from torchgloro.local import certify_local

                cert.certified = certify_local(self, x, eps, cert)
            return cert
        with eval_mode(self):  # fast mode: the frozen power-iteration constants
            y = self.backbone(x.to(self._head_weight().dtype))  # e.g. float16 input
            K = self._current_class_bounds()
        slack = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
        pred, radius = margins.certified_radius(y, K, slack, lipschitz=self.lipschitz)
        return Certificate(pred, radius > eps, radius, y, eps, mode, str(y.dtype)[6:])

    def predict(
        self,
        x: torch.Tensor,
        epsilon: float | None = None,
        mode: Mode = "sound",
        fallback: Literal["local"] | None = None,
    ) -> torch.Tensor:
        """(B,) predicted class where certified, else ``ABSTAIN`` (= C)."""
        c = self.certify(x, epsilon, mode, fallback)
        return torch.where(c.certified, c.pred, torch.full_like(c.pred, self.ABSTAIN))

    def certified_radius(self, x: torch.Tensor, mode: Mode = "sound") -> torch.Tensor:
        """(B,) the largest ε at which each prediction is certified (0 if none)."""
        return self.certify(x, mode=mode, precision="float64").radius

    # ---- persistence -----------------------------------------------------------------------

    def save(self, path) -> None:
        """Saves weights, power-iteration state and ε (safetensors + JSON metadata)."""
        from torchgloro.io import save_gloro

        save_gloro(self, path)

    def extra_repr(self) -> str:
        return (
            f"epsilon={self.epsilon:g}, in_shape={self.in_shape}, "
            f"lipschitz={self.lipschitz!r}, power_iterations={self.power_iterations}"
        )
