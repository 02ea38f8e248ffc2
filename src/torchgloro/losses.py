"""Training losses for GloRo nets, on ``(B, C+1)`` logits whose last column is ⊥."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torchgloro._errors import GloroInputError

__all__ = [
    "GloroCrossEntropy",
    "GloroTrades",
    "GloroEMMA",
    "GloroHinge",
    "LOSSES",
    "live_lipschitz",
    "check_labels",
]


def _host_checks(t: torch.Tensor) -> bool:
    """Whether value checks on ``t`` run: on CPU tensors (free of syncs), not while
    ``torch.compile`` traces (data-dependent control flow breaks the graph)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_labels(y: torch.Tensor, num_classes: int, batch: int | None = None) -> None:
    """Raises a clear error for labels outside ``[0, num_classes)`` (CPU tensors only), and,
    given the ``batch`` size of the logits, unless ``y`` is one label per row of a non-empty
    batch.

    On accelerators, and under ``torch.compile`` (where it would break the graph), the range
    check is skipped to avoid a host sync; the data pipeline validates labels once when a
    dataset is loaded.
    """
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise GloroInputError(f"labels must be an integer tensor, got {y.dtype}.")
    if batch is not None:
        if tuple(y.shape) != (batch,):
            fix = " Use y.flatten()." if y.numel() == batch else ""
            raise GloroInputError(
                f"The logits have {batch} rows but the labels have shape {tuple(y.shape)}: "
                f"one label per row, shape ({batch},).{fix}"
            )
        if batch == 0:
            raise GloroInputError("A loss over an empty batch is undefined: skip empty batches.")
    if not _host_checks(y):
        return
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise GloroInputError(
            f"labels must lie in [0, {num_classes}), got values in [{int(y.min())}, "
            f"{int(y.max())}]; check the dataset's num_classes. A GloRo loss takes the "
            f"(B, C+1) logits of net(x), ⊥ last, not the (B, C) of net.backbone(x)."
        )


def _check_gloro_logits(logits: torch.Tensor, y: torch.Tensor) -> None:
    """Labels checked against ``(B, C+1)`` GloRo logits, which are recognized (CPU tensors):
    ⊥ = max_{i≠j} (y_i + ε·K_ji) is never below the second-largest class logit, while the
    last class logit of ``net.backbone(x)`` usually is."""
    if logits.dim() != 2 or logits.shape[1] < 3:
        raise GloroInputError(
            f"A GloRo loss takes the (B, C+1) logits of net(x) (C >= 2 classes, ⊥ last), got "
            f"shape {tuple(logits.shape)}."
        )
    check_labels(y, logits.shape[1] - 1, logits.shape[0])
    if _host_checks(logits):
        with torch.no_grad():
            second = logits[:, :-1].topk(2, dim=1).values[:, 1]
            if bool((logits[:, -1] < second).any()):
                raise GloroInputError(
                    "These logits have no ⊥ column (its value is below the second-largest "
                    "class logit, which ⊥ never is): they look like the (B, C) logits of "
                    "net.backbone(x). A GloRo loss takes net(x)'s (B, C+1) logits, ⊥ last."
                )


class GloroCrossEntropy(nn.Module):
    """Cross-entropy over the C+1 outputs, with ⊥ a class that is never correct."""

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_gloro_logits(logits, y)
        return F.cross_entropy(logits, y)


class GloroTrades(nn.Module):
    """The TRADES loss for GloRo nets (Leino et al., 2021, Definition 3).

    ``CE(f(x), y) + λ · L(softmax(f(x)), f̄ε(x))``, where ``softmax(f(x))`` is extended with
    probability 0 on ⊥: the GloRo net is asked to agree with the clean prediction while
    assuming the clean prediction is right. The robust term ``L`` is, with ``p`` the clean
    and ``q`` the GloRo softmax:

    * ``"ce"`` (Definition 3, and the authors' code): ``−Σ p log q``;
    * ``"kl"``: ``Σ p (log p − log q)`` = the cross-entropy minus the entropy H(p). Its
      gradient lacks ``λ·∇H(p)``, which sharpens the clean prediction. torchgloro used
      this form before the option existed; runs saved then resume with it.

    Gradients flow through ``p`` in both forms.

    Args:
        lam: The weight λ (settable; schedules update it).
        robust: ``"ce"`` or ``"kl"``.
    """

    FORMS = ("ce", "kl")

    def __init__(self, lam: float = 1.0, robust: str = "ce") -> None:
        super().__init__()
        if robust not in self.FORMS:
            raise ValueError(f"robust must be one of {self.FORMS}, got {robust!r}.")
        # λ as a 0-dim tensor too: a compiled step reads it without recompiling per value.
        self.register_buffer("_lam_tensor", torch.zeros(()), persistent=False)
        self.lam = lam
        self.robust = robust

    @property
    def lam(self) -> float:
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        value = float(value)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"lam must be finite and >= 0, got {value}.")
        self._lam = value
        self._lam_tensor.fill_(value)  # a kernel launch on a GPU, no host sync

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_gloro_logits(logits, y)
        num_classes = logits.shape[1] - 1
        clean = logits[:, :num_classes]  # (B, C)
        clean_loss = F.cross_entropy(clean, y)
        log_p = F.log_softmax(clean, dim=1)  # (B, C)
        log_q = F.log_softmax(logits, dim=1)[:, :num_classes]  # (B, C): ⊥ has p = 0
        p = log_p.exp()
        if self.robust == "ce":
            robust = -(p * log_q).sum(dim=1).mean()
        else:
            robust = (p * (log_p - log_q)).sum(dim=1).mean()
        return clean_loss + self._lam_tensor * robust

    def extra_repr(self) -> str:
        return f"lam={self.lam:g}, robust={self.robust}"


def live_lipschitz(net: nn.Module) -> torch.Tensor:
    """The class-pair bounds K that ``net``'s forward pass is using right now.

    This is the K of the last forward pass: in training mode the live, *differentiable*
    power-iteration estimate, so a loss built on it sends gradients into the Lipschitz
    constants; in eval mode the frozen constant.

    Returns:
        ``(C, C)`` (margin variant, K[j, i] bounds f_j − f_i) or ``(C,)`` (basic variant).
    """
    if net.last_class_bounds is not None:
        return net.last_class_bounds
    return net.lipschitz_constant("fast")


class _LipschitzLoss(nn.Module):
    """A loss that needs the class-pair bounds K and the radius ε, not only the ⊥ logit.

    K and ε come, in this order, from the ``K=``/``epsilon=`` keywords of ``forward``, the
    ``epsilon`` given at construction, and the bound net (``net=`` at construction or
    :meth:`bind`): K is then :func:`live_lipschitz` (differentiable in training) and ε is
    ``net.epsilon`` at call time, so ε schedules that set ``net.epsilon`` apply.
    """

    def __init__(self, net: nn.Module | None = None, epsilon: float | None = None) -> None:
        super().__init__()
        self._net = None
        self.epsilon = None if epsilon is None else float(epsilon)
        if net is not None:
            self.bind(net)

    def bind(self, net: nn.Module) -> _LipschitzLoss:
        """Uses ``net`` (a :class:`~torchgloro.GloroNet`) for K and ε; returns ``self``."""
        object.__setattr__(self, "_net", net)  # not a submodule: its parameters stay the net's
        return self

    def _resolve(
        self, logits: torch.Tensor, K: torch.Tensor | None, epsilon: float | None
    ) -> tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]:
        net = self._net
        if K is None:
            if net is None:
                raise GloroInputError(
                    f"{self.__class__.__name__} needs the net's Lipschitz bounds: build it with "
                    f"{self.__class__.__name__}(net=gloro_net), call .bind(gloro_net), or pass "
                    f"K= to the call."
                )
            K = live_lipschitz(net)
        if epsilon is None:
            # The net's ε as its 0-dim buffer where it has one: no host sync, and a compiled
            # step reads the value of each step instead of recompiling for it.
            epsilon = self.epsilon if self.epsilon is not None else _net_epsilon(net)
        if epsilon is None:
            raise GloroInputError(f"{self.__class__.__name__} needs epsilon (or a bound net).")
        num_classes = K.shape[0]
        if logits.shape[1] not in (num_classes, num_classes + 1):
            raise GloroInputError(
                f"logits have {logits.shape[1]} columns but K is for {num_classes} classes; "
                f"expected (B, {num_classes}) or (B, {num_classes + 1}) with ⊥ last."
            )
        eps = epsilon if isinstance(epsilon, torch.Tensor) else float(epsilon)
        return logits[:, :num_classes], K, eps


def _net_epsilon(net: nn.Module | None) -> float | torch.Tensor | None:
    if hasattr(net, "epsilon_buffer"):
        return net.epsilon_buffer
    return getattr(net, "epsilon", None)


def _target_row(K: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` K_{y,i}: row y of the (C, C) bounds, or K_y + K_i for the basic (C,) form."""
    if K.dim() == 2:
        return K[y]
    return K[y].unsqueeze(1) + K.unsqueeze(0)


class GloroEMMA(_LipschitzLoss):
    """EMMA, Efficient Margin MAximization (Hu et al., NeurIPS 2023).

    Instead of the single ⊥ logit, every non-target class i gets its own adaptive radius:
    with f the class logits, y the label and K_yi the bound on the Lipschitz constant of
    f_y − f_i,

        ε_i = clip((f_y − f_i) / K_yi, min_fraction·ε, ε)        (no gradient through ε_i)
        f̃_i = f_i + ε_i·K_yi  for i ≠ y,   f̃_y = f_y,
        loss = CE(f̃, y).

    ε_i is the distance to the i-th decision boundary as far as the bound can see, capped at ε:
    a class that is already certifiably beaten at radius ε is pushed with the full ε, while a
    class that is close (or wins) is pushed only as far as the boundary, so its gradient is not
    drowned by an unreachable ε. The gradient still flows through K (and the logits), so the
    loss shrinks the Lipschitz bounds as well as widening margins. The ⊥ column of the GloRo
    logits is not used.

    Args:
        net: The :class:`~torchgloro.GloroNet` whose K and ε to use (or :meth:`bind` later, or
            pass ``K=``/``epsilon=`` to each call).
        epsilon: A fixed ε overriding ``net.epsilon``.
        min_fraction: Lower clip of ε_i as a fraction of ε. 0 (the default) lets a class that
            currently wins over the label be treated with plain cross-entropy; the authors'
            reference code uses 0.01.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        epsilon: float | None = None,
        min_fraction: float = 0.0,
    ) -> None:
        super().__init__(net, epsilon)
        if not 0.0 <= min_fraction <= 1.0:
            raise GloroInputError(f"min_fraction must lie in [0, 1], got {min_fraction!r}.")
        self.min_fraction = float(min_fraction)

    def robust_logits(
        self,
        logits: torch.Tensor,
        y: torch.Tensor,
        K: torch.Tensor | None = None,
        epsilon: float | None = None,
    ) -> torch.Tensor:
        """``(B, C)`` the logits f̃ that the loss applies cross-entropy to."""
        f, K, eps = self._resolve(logits, K, epsilon)
        check_labels(y, f.shape[1], f.shape[0])
        ky = _target_row(K, y)  # (B, C)
        margin = f.gather(1, y[:, None]) - f  # (B, C)
        with torch.no_grad():
            reach = eps * ky
            frac = torch.where(reach > 0, margin / reach.clamp_min(1e-30), torch.ones_like(f))
            frac = frac.clamp(self.min_fraction, 1.0)
            eps_i = eps * frac  # (B, C)
        robust = f + eps_i * ky
        is_target = F.one_hot(y, f.shape[1]).bool()
        return torch.where(is_target, f, robust)

    def forward(
        self,
        logits: torch.Tensor,
        y: torch.Tensor,
        *,
        K: torch.Tensor | None = None,
        epsilon: float | None = None,
    ) -> torch.Tensor:
        """The EMMA loss on GloRo logits ``(B, C+1)`` (or class logits ``(B, C)``)."""
        return F.cross_entropy(self.robust_logits(logits, y, K, epsilon), y)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, min_fraction={self.min_fraction:g}"


class GloroHinge(_LipschitzLoss):
    """Multi-class hinge on the GloRo logits: ``mean(max(0, m − (z_y − max_{j≠y} z_j)))``.

    With ``certified=False`` (default), z are the ``(B, C+1)`` GloRo logits, ⊥ included, so
    the loss asks the label to beat every class *and* ⊥ by ``m``; no net is needed.
    With ``certified=True``, z_j = f_j + ε·K_yj for j ≠ y (the target's own Lipschitz row,
    as in GloRo's ⊥ when the prediction is right): the hinge on the certified margin
    ``min_j (f_y − f_j − ε·K_yj)``; this needs K and ε like :class:`GloroEMMA`.

    Args:
        margin: The hinge margin m ≥ 0.
        certified: Use the certified margin (see above).
        net: The :class:`~torchgloro.GloroNet` for K and ε (``certified=True`` only).
        epsilon: A fixed ε overriding ``net.epsilon`` (``certified=True`` only).
    """

    def __init__(
        self,
        margin: float = 1.0,
        certified: bool = False,
        net: nn.Module | None = None,
        epsilon: float | None = None,
    ) -> None:
        super().__init__(net, epsilon)
        if not margin >= 0:
            raise GloroInputError(f"hinge margin must be >= 0, got {margin!r}.")
        self.margin = float(margin)
        self.certified = bool(certified)

    def forward(
        self,
        logits: torch.Tensor,
        y: torch.Tensor,
        *,
        K: torch.Tensor | None = None,
        epsilon: float | None = None,
    ) -> torch.Tensor:
        if self.certified:
            z, K, eps = self._resolve(logits, K, epsilon)
            check_labels(y, z.shape[1], z.shape[0])
            ky = _target_row(K, y)  # (B, C); the target's own entry is not added
            z = z + eps * torch.where(F.one_hot(y, z.shape[1]).bool(), 0.0, ky)
        else:
            z = logits
            _check_gloro_logits(z, y)
        is_target = F.one_hot(y, z.shape[1]).bool()
        z_y = z.gather(1, y[:, None]).squeeze(1)  # (B,)
        z_other = z.masked_fill(is_target, float("-inf")).amax(dim=1)  # (B,)
        return F.relu(self.margin - (z_y - z_other)).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin:g}, certified={self.certified}"


#: Loss classes by name (for configs and the CLI). GloroEMMA and certified GloroHinge need
#: the net: construct with ``net=`` or call ``.bind(net)``.
LOSSES: dict[str, type[nn.Module]] = {
    "ce": GloroCrossEntropy,
    "trades": GloroTrades,
    "emma": GloroEMMA,
    "hinge": GloroHinge,
}
