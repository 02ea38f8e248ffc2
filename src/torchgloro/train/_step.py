"""One training step: forward (the ⊥ logit, the bound and its power iterations included),
loss, gradients, optimizer update and the epoch's on-device metric sums.

Eager, or (``run.compile``) all of it traced by ``torch.compile`` into **one graph**, with no
graph break and no host sync: the compiler then sees the ~150 small ops of ⊥, K, the
differentiable bound and the loss together with the batch's work (CPU: fused loops;
``mode="reduce-overhead"``: the whole step replays as one CUDA graph). What differs from
the eager step, none of it in the math:

* Gradients come from ``torch.autograd.grad`` traced into the graph (dynamo's
  ``trace_autograd_ops``) and are copied into ``.grad`` buffers that live as long as the
  step, instead of ``loss.backward()`` (a graph break).
* The optimizer's update runs without ``Optimizer.step``'s wrapper, which breaks the graph on
  purpose (pytorch#104053), under ``no_grad`` as that wrapper would; the learning rate is a
  0-dim tensor on the device, refilled every step, so that a schedule does not recompile.
  The optimizer and its ``state_dict`` are torch's own: checkpoints are unchanged. (Traced,
  torch computes Adam's bias corrections in float32: step sizes differ by ~1e-5 relative.)
* On a CPU the step's power iterations run eagerly just before the graph (see ``__call__``);
  on a GPU they are in it.

Shapes are static (``dynamic=False``): a last partial batch gets its own graph, compiled once,
so a compiled run sees exactly the batches of an eager one.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from torchgloro.gloro import GloroNet

__all__: list[str] = []  # internal to the trainer


class TrainStep:
    """Runs training steps of ``model`` (a ``TrainModule``) and adds to ``acc``.

    Args:
        model: ``model(x, robust)`` gives the GloRo logits (robust) or f's.
        net: The GloroNet inside ``model``.
        optimizer: A torch optimizer over ``model``'s trainable parameters.
        loss_fn: The robust loss on ``(B, C+1)`` logits.
        acc: ``(4,)`` float64 sums on the device: loss·n, clean correct, VRA correct, n.
        num_classes: C.
        grad_clip: Clip the gradients' global norm to this (0: no clipping).
        compile_options: ``torch.compile`` keyword arguments (mode, backend) to compile the
            whole step, or None for eager steps.
    """

    def __init__(
        self,
        model: nn.Module,
        net: GloroNet,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        acc: torch.Tensor,
        num_classes: int,
        grad_clip: float,
        compile_options: dict | None = None,
    ) -> None:
        self.model, self.net, self.optimizer = model, net, optimizer
        self.loss_fn, self.acc = loss_fn, acc
        self.num_classes, self.grad_clip = num_classes, float(grad_clip)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.compiled = compile_options is not None
        self._prepared = False
        if self.compiled:
            self._update = inspect.unwrap(type(optimizer).step)  # see the module docstring
            self._fn = torch.compile(self._graph, fullgraph=True, dynamic=False,
                                     **compile_options)  # fmt: skip

    def _prepare(self) -> None:
        """Before the first compiled step (after a checkpoint was restored): gradient buffers,
        the optimizer's step counts on the device (``capturable``: no CPU scalar in a CUDA
        graph), and the tensors the graph writes marked static, as CUDA graphs need."""
        device = self.params[0].device
        for p in self.params:  # buffers the graph writes the gradients into
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for group in self.optimizer.param_groups:  # a tensor: no recompile per value
            group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32, device=device)
            group["capturable"] = device.type == "cuda"
        for state in self.optimizer.state.values():  # a restored eager run's CPU counts
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = value.to(device)
        static = [self.acc, *self.net.buffers(), *self.loss_fn.buffers()]
        static += [p.grad for p in self.params] + [g["lr"] for g in self.optimizer.param_groups]
        for t in static:
            torch._dynamo.mark_static_address(t, guard=False)
        self._prepared = True

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next step (compiled: a fill of a tensor on the device)."""
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def __call__(self, x: torch.Tensor, y: torch.Tensor, robust: bool) -> None:
        """One step on the batch ``(x, y)``: GloRo loss if ``robust``, else cross-entropy."""
        if not self.compiled:
            out, loss = self._forward(x, y, robust)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.optimizer.step()
            self._record(out, loss, y, robust)
            return
        if not self._prepared:
            self._prepare()
        n_iter = self.net.power_iterations
        if robust and n_iter and x.device.type == "cpu":
            # On a CPU the iterations run eagerly first: inside a graph their single-instance
            # convolutions lose the native kernels that small_conv picks (oneDNN is 2-7x
            # slower there). The same math in the same order: they read only the weights
            # and the iterates, which the step's forward then reads; its graph iterates 0.
            self.net._advance(n_iter)
            self.net.power_iterations = 0
        try:
            with torch._dynamo.config.patch(trace_autograd_ops=True):
                self._fn(x, y, robust)
        finally:
            self.net.power_iterations = n_iter

    def _forward(self, x, y, robust: bool) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x, robust)  # (B, C+1) GloRo logits, or (B, C) from f
        return out, self.loss_fn(out, y) if robust else F.cross_entropy(out, y)

    def _graph(self, x: torch.Tensor, y: torch.Tensor, robust: bool) -> None:
        out, loss = self._forward(x, y, robust)
        if self.net.last_class_bounds is not None:  # K's graph goes to autograd.grad below
            self.net.last_class_bounds = self.net.last_class_bounds.detach()
        grads = torch.autograd.grad(loss, self.params)
        with torch.no_grad():
            self._record(out.detach(), loss.detach(), y, robust)
            torch._foreach_copy_([p.grad for p in self.params], list(grads))
            if self.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
            self._update(self.optimizer)

    @torch.no_grad()
    def _record(self, out: torch.Tensor, loss: torch.Tensor, y: torch.Tensor, robust: bool):
        n = y.new_tensor(len(y), dtype=torch.float64)
        clean = (out[:, : self.num_classes].argmax(1) == y).sum()
        vra = (out.argmax(1) == y).sum() if robust else n * float("nan")
        self.acc += torch.stack([loss.detach().double() * n, clean.double(), vra.double(), n])
