"""What graph capture costs on the paper's nets: the Sequential fast path against the same
backbone behind a custom forward (traced with torch.fx).

For the ``-plus`` recipes' models on MNIST, times one GloRo training step (TRADES, NAdam,
batch 256, 10 power iterations) and the sound certification of 512 test points, interleaved,
for:

* ``sequential``: ``GloroNet(create_model(...))`` (the chain of layer bounds, float32 sound
  path first);
* ``graph``: ``GloroNet(Wrapped(...))``, the same modules behind ``forward(x) = seq(x)``:
  traced, one :class:`~torchgloro.bounds.GraphBound`, float64 sound path.

Both share the weights, so they certify the same points (checked and recorded).

    python -m benchmarks.graph_overhead [--quick] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks import _common as C
from torchgloro import GloroNet
from torchgloro.bounds import GraphBound
from torchgloro.data import DeviceBatches
from torchgloro.losses import GloroTrades
from torchgloro.nn.models import create_model

MODELS = [("2c2f", {}, 0.45), ("4c3f", {"lln": True}, 1.75)]
VARIANTS = ("sequential", "graph")


class Wrapped(nn.Module):
    """A user's model: the same layers, its own forward."""

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        self.seq = seq

    def forward(self, x):
        return self.seq(x)


class Stepper:
    """One GloRo net + NAdam + batch stream, stepping like the trainer (TRADES, λ = 2)."""

    def __init__(self, arch, options, eps, variant, split, batch, device, seed):
        torch.manual_seed(seed)
        with torch.device(device):
            f = create_model(arch, (1, 28, 28), 10, "minmax", "orthogonal", **options)
            model = f if variant == "sequential" else Wrapped(f)
            self.net = GloroNet(model, eps, in_shape=(1, 28, 28), power_iterations=10)
        self.net.train()
        self.opt = torch.optim.NAdam(self.net.parameters(), lr=1e-3, eps=1e-7)
        self.loss_fn = GloroTrades(2.0)
        gen = torch.Generator().manual_seed(seed)
        self.batches = DeviceBatches(split, batch, True, gen, drop_last=True, device=device)
        self._it = C.endless(self.batches)

    def steps(self, n: int) -> None:
        self.net.train()
        C.train_steps(self.net, self.opt, self.loss_fn, self._it, n)


def run_model(arch, options, eps, args, device) -> dict:
    batch = 32 if args.quick else 256
    split, source = C.load_mnist("train", 2048 if args.quick else None)
    test, _ = C.load_mnist("test", 64 if args.quick else 512)
    kw = dict(split=split, batch=batch, device=device, seed=args.seed)
    runners = {v: Stepper(arch, options, eps, v, **kw) for v in VARIANTS}
    steps, reps = (2, 3) if args.quick else ((10, 5) if arch == "2c2f" else (3, 5))
    print(f"{arch}: {steps} steps x {reps} rounds, batch {batch}")
    t = C.interleave({v: (lambda r=r: r.steps(steps)) for v, r in runners.items()}, reps, device)
    med = {v: C.median(ts) / steps for v, ts in t.items()}
    x = test.x.to(device)
    # Same weights in both nets (the graph shares the Sequential's modules), then certify.
    runners["graph"].net.load_state_dict(runners["sequential"].net.state_dict(), strict=False)
    runners["graph"].net.backbone.seq.load_state_dict(
        runners["sequential"].net.backbone.state_dict()
    )
    certs = {}

    def certify(v):
        net = runners[v].net.eval()
        net._sound_cache = None  # time the proofs too, as after each epoch
        for b in net.bounds:
            if isinstance(b, GraphBound):
                b._cache = {}
        certs[v] = net.certify(x, epsilon=0.3)

    tc = C.interleave({v: (lambda v=v: certify(v)) for v in VARIANTS}, 3, device)
    cmed = {v: C.median(ts) for v, ts in tc.items()}
    same = bool(torch.equal(certs["sequential"].certified, certs["graph"].certified))
    out = {
        "arch": arch,
        "options": options,
        "data": source,
        "batch_size": batch,
        "steps_per_block": steps,
        "rounds": reps,
        "sec_per_step_median": med,
        "sec_per_step_all": {v: [s / steps for s in ts] for v, ts in t.items()},
        "graph_over_sequential_train": med["graph"] / med["sequential"],
        "certify_sec_median": cmed,
        "certify_points": int(x.shape[0]),
        "graph_over_sequential_certify": cmed["graph"] / cmed["sequential"],
        "same_certified_points": same,
    }
    print(
        f"  train {med['sequential'] * 1e3:.1f} vs {med['graph'] * 1e3:.1f} ms/step "
        f"({out['graph_over_sequential_train']:.2f}x); certify {cmed['sequential']:.2f} vs "
        f"{cmed['graph']:.2f} s ({out['graph_over_sequential_certify']:.2f}x); same points: {same}"
    )
    return out


def main(argv=None) -> dict:
    notes = [
        "One GloRo training step (forward, TRADES loss, backward, NAdam) per variant, "
        "interleaved in blocks; medians of sec/step. Same architecture and seed.",
        "certify: sound certification of the test points at eps 0.3 with the proofs "
        "recomputed (cache dropped), same weights in both variants.",
    ]
    return C.run_per_model("graph_overhead", __doc__, MODELS, run_model, notes, {}, argv)


if __name__ == "__main__":
    main()
