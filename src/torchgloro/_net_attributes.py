"""Attribute plumbing of GloroNet: dtype-keeping casts, fixed settings, eval mode for a block."""

from __future__ import annotations

import contextlib

from torch import nn

__all__ = ["apply_keeping_dtypes", "eval_mode", "fixed_setting"]


def apply_keeping_dtypes(module: nn.Module, names, fn, *args, **kwargs) -> nn.Module:
    """``nn.Module._apply`` (what ``.to()``/``.half()`` call) that moves the buffers
    ``names`` to the new device but keeps their dtype."""
    keep = {k: module._buffers[k].detach().clone() for k in names}
    out = nn.Module._apply(module, fn, *args, **kwargs)
    for k, v in keep.items():
        module._buffers[k] = v.to(module._buffers[k].device)
    return out


def fixed_setting(name: str, what: str) -> property:
    """A read-only attribute kept as ``_<name>``; assigning it names the fix."""

    def get(self):
        return getattr(self, "_" + name)

    def refuse(self, value) -> None:
        raise AttributeError(
            f"GloroNet.{name} is fixed at construction ({what}). Build a new "
            f"GloroNet(backbone, epsilon, {name}=...) around the backbone."
        )

    return property(get, refuse, doc=f"{what[0].upper()}{what[1:]} (fixed at construction).")


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """``module`` in eval mode for the enclosed block, then every submodule's flag restored.

    A module tree already wholly in eval mode is left alone: ``Module.train`` walks it and
    costs about 0.1 ms per call, a percent of a batch's inference on the MNIST nets.
    """
    training = [m for m in module.modules() if m.training]
    if training:
        module.eval()
    try:
        yield
    finally:
        for m in training:
            m.training = True
