"""A GloroNet frozen into plain PyTorch, for ``torch.export`` and ``torch.jit``.

A :class:`~torchgloro.GloroNet` checks its input, refreshes its bound when the weights change
and refuses a backbone edited after it was built: data-dependent Python that tracers cannot
follow. :func:`deploy` copies the backbone and fixes the bound matrix ``K`` as a buffer, so the
forward pass is the GloRo formula alone::

    y = f(x)                                  # (B, C)
    ⊥ = max_{i≠j} (y_i + ε·K[j, i]),  j = argmax y

With ``mode="sound"`` (the default) ``K`` is the proven upper bound, rounded up to float32.
The deployed net's answers are GloRo predictions: its float round-off of ``y`` is not
accounted for, so a *certificate* (a promise that holds in floating point) still comes from
:meth:`GloroNet.certify`.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from torchgloro import margins
from torchgloro._errors import GloroInputError
from torchgloro._inputs import check_epsilon, epsilon_tensor, round_up_to_float32
from torchgloro._net_attributes import apply_keeping_dtypes, eval_mode
from torchgloro.gloro import GloroNet

__all__ = ["DeployedGloroNet", "deploy"]


class DeployedGloroNet(nn.Module):
    """A backbone plus a fixed ⊥: ``(B, *in_shape)`` → ``(B, C+1)`` logits, with no checks.

    Build it with :func:`deploy`. Buffers: ``class_bounds`` (``(C, C)`` margin bounds, or
    ``(C,)`` per-class bounds for the basic variant) and ``epsilon`` (0-dim). Both keep their
    dtype through ``.to()``/``.half()`` (a bound rounded to float16 could shrink), and ⊥ is
    computed in the wider of their dtype and the logits'.
    """

    def __init__(
        self, backbone: nn.Module, class_bounds: torch.Tensor, epsilon: torch.Tensor
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("class_bounds", class_bounds)
        self.register_buffer("epsilon", epsilon)

    def _apply(self, fn, *args, **kwargs):
        """Moves the bound and ε with the net, keeping their dtypes."""
        return apply_keeping_dtypes(self, ("class_bounds", "epsilon"), fn, *args, **kwargs)

    @property
    def ABSTAIN(self) -> int:  # noqa: N802 - the same public name as GloroNet's
        """The index of ⊥ (= C): the deployed net abstains when it wins."""
        return int(self.class_bounds.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``(B, C+1)`` logits: f(x), then ⊥ (in the wider dtype, see above)."""
        y = self.backbone(x)  # (B, C)
        bot = margins.bottom_logit(y, self.class_bounds, self.epsilon)  # (B,)
        return torch.cat([y, bot.unsqueeze(1)], dim=1)  # (B, C+1)


def _unwrap(net: nn.Module) -> GloroNet:
    """The GloroNet inside ``torch.compile``, DDP or ``nn.DataParallel`` wrappers."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while not isinstance(net, GloroNet):
        if isinstance(net, wrappers):
            net = net.module
        elif isinstance(getattr(net, "_orig_mod", None), nn.Module):  # torch.compile
            net = net._orig_mod
        else:
            raise GloroInputError(
                f"deploy needs a GloroNet, got {type(net).__name__}; wrap the backbone first: "
                f"torchgloro.GloroNet(backbone, epsilon)."
            )
    return net


def deploy(
    net: GloroNet, mode: Literal["sound", "fast"] = "sound", epsilon: float | None = None
) -> DeployedGloroNet:
    """Freezes ``net`` into a :class:`DeployedGloroNet` that ``torch.export`` can trace.

    Args:
        net: The GloroNet to freeze (also inside ``torch.compile``, DDP or DataParallel). It
            is not changed (the bound is computed on a copy, power iterations included);
            later changes to it do not reach the deployed copy.
        mode: ``"sound"``: the proven bound K and ε, both rounded up to float32 (kept in
            float64 for a float64 net). ``"fast"``: the converged power-iteration estimate
            that ``net.eval()(x)`` uses (a lower estimate); the deployed net's float32 and
            float64 outputs then equal the eval-mode GloroNet's.
        epsilon: The radius of ⊥; defaults to ``net.epsilon``.

    Returns:
        The deployed net, in eval mode, on ``net``'s device, with no parameter requiring grad.

    Raises:
        GloroInputError: For a mode other than ``"sound"`` or ``"fast"``, or ε ≤ 0.
    """
    net = _unwrap(net)
    if mode not in ("sound", "fast"):
        raise GloroInputError(f"mode must be 'sound' or 'fast', got {mode!r}.")
    value = check_epsilon(net.epsilon if epsilon is None else epsilon)
    eps = epsilon_tensor(value)  # float32 rounded up, as GloroNet keeps it
    frozen = copy.deepcopy(net)  # a refresh of stale iterates must not change ``net``
    with eval_mode(frozen):  # fast: the converged estimate, not the live training one
        K = frozen.lipschitz_constant(mode).detach()  # sound: the proven float64 bound
    if mode == "sound":  # stored rounded up, unless the net itself runs in float64
        if frozen._head_weight().dtype != torch.float64:
            K = round_up_to_float32(K)
    backbone = frozen.backbone.eval().requires_grad_(False)
    device = frozen._head_weight().device
    return DeployedGloroNet(backbone, K.to(device), eps.to(device)).eval()
