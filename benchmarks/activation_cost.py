"""What MinMax costs in a GloRo training step: torchgloro's MinMax against plain autograd.

For the ``-plus`` recipes' models (MinMax, orthogonal init; LLN on 4C3F) on real MNIST, times
one GloRo training step (TRADES, NAdam, batch 256, 10 power iterations), interleaved, with
three activations in the same architecture:

* ``minmax``: :class:`torchgloro.MinMax` (a custom backward: two ``lerp`` passes on a saved
  weight);
* ``minmax_autograd``: the same layers computing ``stack(minimum(a, b), maximum(a, b))`` with
  plain autograd, the implementation before 2026-11-27 (its backward is several masked
  passes, and ``where``/``masked_fill`` run unvectorized on some CPU builds);
* ``relu``: ReLU, for scale.

Also records autograd's saved-for-backward bytes per instance of each variant.

    python -m benchmarks.activation_cost [--quick] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import types

import torch

from benchmarks import _common as C
from torchgloro import GloroNet, MinMax
from torchgloro.data import DeviceBatches
from torchgloro.losses import GloroTrades
from torchgloro.nn.models import create_model

# arch, model options of the -plus recipe, eps_train
MODELS = [("2c2f", {}, 0.45), ("4c3f", {"lln": True}, 1.75)]
VARIANTS = ("minmax", "minmax_autograd", "relu")


def _autograd_minmax(self: MinMax, x: torch.Tensor) -> torch.Tensor:
    """MinMax through plain autograd (the pre-2026-11-27 implementation)."""
    shape = x.shape[:1] + (x.shape[1] // 2, 2) + x.shape[2:]
    a, b = x.reshape(shape).unbind(2)
    return torch.stack((torch.minimum(a, b), torch.maximum(a, b)), 2).reshape(x.shape)


class Stepper:
    """One GloRo net + NAdam + batch stream, stepping like the trainer (TRADES, λ = 2)."""

    def __init__(self, arch, options, eps, variant, split, batch, device, seed):
        torch.manual_seed(seed)
        act = "relu" if variant == "relu" else "minmax"
        with torch.device(device):
            f = create_model(arch, (1, 28, 28), 10, act, "orthogonal", **options)
            self.net = GloroNet(f, eps, power_iterations=10)
        if variant == "minmax_autograd":
            for m in f.modules():
                if isinstance(m, MinMax):
                    m.forward = types.MethodType(_autograd_minmax, m)
        self.net.train()
        self.opt = torch.optim.NAdam(self.net.parameters(), lr=1e-3, eps=1e-7)
        self.loss_fn = GloroTrades(2.0)
        gen = torch.Generator().manual_seed(seed)
        self.batches = DeviceBatches(split, batch, True, gen, drop_last=True, device=device)
        self._it = C.endless(self.batches)

    def steps(self, n: int) -> None:
        C.train_steps(self.net, self.opt, self.loss_fn, self._it, n)


def run_model(arch, options, eps, args, device) -> dict:
    batch = 32 if args.quick else 256
    split, source = C.load_mnist("train", 2048 if args.quick else None)
    kw = dict(split=split, batch=batch, device=device, seed=args.seed)
    runners = {v: Stepper(arch, options, eps, v, **kw) for v in VARIANTS}
    steps, reps = (2, 3) if args.quick else ((10, 7) if arch == "2c2f" else (3, 7))
    print(f"{arch}: {steps} steps x {reps} rounds, batch {batch}")
    t = C.interleave({v: (lambda r=r: r.steps(steps)) for v, r in runners.items()}, reps, device)
    med = {v: C.median(ts) / steps for v, ts in t.items()}
    x, _ = next(iter(runners["minmax"].batches))
    saved = {}
    for v, r in runners.items():
        params = list(r.net.parameters()) + list(r.net.buffers())
        saved[v] = C.saved_activation_bytes(lambda r=r: r.net(x), params) / batch
    out = {
        "arch": arch,
        "options": options,
        "data": source,
        "batch_size": batch,
        "steps_per_block": steps,
        "rounds": reps,
        "sec_per_step_median": med,
        "sec_per_step_all": {v: [s / steps for s in ts] for v, ts in t.items()},
        "saved_for_backward_per_instance_bytes": saved,
        "speedup_over_autograd_minmax": med["minmax_autograd"] / med["minmax"],
        "minmax_over_relu": med["minmax"] / med["relu"],
    }
    print(
        "  " + ", ".join(f"{v} {med[v] * 1e3:.1f} ms" for v in VARIANTS) + f"; MinMax "
        f"{out['speedup_over_autograd_minmax']:.2f}x faster than plain autograd, "
        f"{out['minmax_over_relu']:.2f}x ReLU"
    )
    return out


def main(argv=None) -> dict:
    notes = [
        "One GloRo training step (forward, TRADES loss, backward, NAdam) per variant, "
        "interleaved in blocks; medians of sec/step. Same architecture and seed in each "
        "variant, only the activation's implementation (or ReLU) differs.",
        "saved_for_backward = exact bytes autograd keeps for backward in one forward "
        "(parameters and buffers excluded), per instance.",
    ]
    return C.run_per_model("activation_cost", __doc__, MODELS, run_model, notes, {}, argv)


if __name__ == "__main__":
    main()
