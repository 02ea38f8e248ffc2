"""GloRo training vs standard training: seconds per epoch and peak memory per instance.

For each model, two identical backbones (same seed) are trained side by side in one
process, in interleaved blocks of ``steps`` steps (standard, GloRo, power-iteration-only,
rotated every round), with a loop that mirrors the trainer's ``Run.train_epoch`` exactly: the split
lives as one tensor on the device and is shuffled by index (``DeviceBatches``), Adam with
eps=1e-7, ``zero_grad(set_to_none=True)``, the trainer's on-device metric sums, no host
syncs. Standard = plain cross-entropy on the backbone's logits (what the trainer does with
``gloro.robust = false``); GloRo = ``GloroCrossEntropy`` on the net's C+1 logits with the
recipes' power iterations per step. Seconds per epoch are extrapolated from the median
seconds per step (x steps per epoch), because full CPU epochs are too slow.

    python -m benchmarks.train_overhead [--quick] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from benchmarks import _common as C
from torchgloro import GloroNet
from torchgloro.data import DeviceBatches
from torchgloro.losses import GloroCrossEntropy
from torchgloro.nn.models import create_model

# arch, data, per-sample shape, power iterations per step (the recipes in configs/), eps_train
MODELS = [
    ("2c2f", "mnist", (1, 28, 28), 10, 0.45),
    ("4c3f", "mnist", (1, 28, 28), 10, 0.45),
    ("6c2f", "cifar-shaped synthetic", (3, 32, 32), 5, 36 / 255),
]
FULL = {"2c2f": (40, 7), "4c3f": (8, 7), "6c2f": (3, 5)}  # steps per block, rounds
QUICK = {"2c2f": (4, 3), "4c3f": (2, 3), "6c2f": (2, 3)}
TARGETS = {"train_time_ratio": 1.10, "peak_memory_ratio": 1.10}


class Runner:
    """One model + optimizer + batch stream, stepping like the trainer."""

    def __init__(self, arch, in_shape, n_iter, eps, robust, split, batch, device, seed):
        torch.manual_seed(seed)
        with torch.device(device):
            backbone = create_model(arch, in_shape, 10)
            self.net = GloroNet(backbone, eps, power_iterations=n_iter)
        self.net.train()
        self.robust = robust
        self.eps, self.lr = eps, 1e-3
        # build_optimizer: Adam, Keras eps; weight decay 0 in both groups = one plain group.
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-7)
        gen = torch.Generator().manual_seed(seed)
        self.batches = DeviceBatches(split, batch, True, gen, drop_last=True, device=device)
        self._it = C.endless(self.batches)
        self.loss_fn = GloroCrossEntropy()
        self.acc = torch.zeros(4, dtype=torch.float64, device=device)

    def forward(self, x):
        return self.net(x) if self.robust else self.net.backbone(x)

    def step(self) -> None:
        x, y = next(self._it)
        net, opt = self.net, self.opt
        net.epsilon = self.eps  # the trainer sets ε and lr every batch
        for group in opt.param_groups:
            group["lr"] = self.lr
        out = self.forward(x)
        loss = self.loss_fn(out, y) if self.robust else F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # the trainer's on-device metric sums
            n = y.new_tensor(len(y), dtype=torch.float64)
            clean = (out[:, :10].argmax(1) == y).sum()
            vra = (out.argmax(1) == y).sum() if self.robust else n * float("nan")
            self.acc += torch.stack([loss.detach().double() * n, clean.double(), vra.double(), n])

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.step()

    @torch.no_grad()
    def power_iterations(self, n: int) -> None:
        """Only the per-step power iterations of ``n`` steps, by the step's own path (no
        forward/backward): eager on CPU, one CUDA-graph replay per step on a GPU."""
        for _ in range(n):
            self.net._advance(self.net.power_iterations)


def run_model(arch, data, in_shape, n_iter, eps, args, device) -> dict:
    batch = 32 if args.quick else 256
    if data == "mnist":
        split, source = C.load_mnist("train", 2048 if args.quick else None)
        n_epoch = 60_000
    else:
        split = C.synthetic_split(1024 if args.quick else 4096, in_shape, seed=args.seed)
        source, n_epoch = "synthetic 3x32x32 (CIFAR-10 shaped; epoch = 50,000 samples)", 50_000
    steps_per_epoch = math.ceil(n_epoch / 256)
    kw = dict(split=split, batch=batch, device=device, seed=args.seed)
    std = Runner(arch, in_shape, n_iter, eps, False, **kw)
    glo = Runner(arch, in_shape, n_iter, eps, True, **kw)
    steps, reps = (QUICK if args.quick else FULL)[arch]
    print(f"{arch}: {steps} steps x {reps} rounds, batch {batch}, {n_iter} power iterations")
    t = C.interleave(
        {
            "standard": lambda: std.steps(steps),
            "gloro": lambda: glo.steps(steps),
            "power_iteration_only": lambda: glo.power_iterations(steps),
        },
        reps, device,
    )  # fmt: skip
    per_step = {k: [v / steps for v in vs] for k, vs in t.items()}
    med = {k: C.median(v) for k, v in per_step.items()}

    # memory: peak growth over live memory during 2 steps, interleaved, median of 3
    mem_steps = 2
    mem = {"standard": [], "gloro": []}
    for _ in range(3):
        for name, r in (("standard", std), ("gloro", glo)):
            mem[name].append(C.peak_bytes_block(lambda r=r: r.steps(mem_steps), device) / batch)
    x, y = next(iter(std.batches))
    saved = {}
    for name, r in (("standard", std), ("gloro", glo)):
        params = list(r.net.parameters()) + list(r.net.buffers())
        saved[name] = C.saved_activation_bytes(lambda r=r: r.forward(x), params) / batch
    mem_med = {k: C.median(v) for k, v in mem.items()}

    out = {
        "arch": arch,
        "data": source,
        "in_shape": list(in_shape),
        "batch_size": batch,
        "power_iterations": n_iter,
        "steps_per_epoch": steps_per_epoch,
        "steps_per_block": steps,
        "rounds": reps,
        "epoch_seconds_extrapolated": True,
    }
    for k in ("standard", "gloro", "power_iteration_only"):
        out[k] = {
            "sec_per_step_median": med[k],
            "sec_per_step_all": per_step[k],
            "sec_per_epoch": med[k] * steps_per_epoch,
        }
    for k in ("standard", "gloro"):
        out[k]["peak_mem_growth_per_instance_bytes"] = mem_med[k]
        out[k]["peak_mem_growth_per_instance_all"] = mem[k]
        out[k]["saved_for_backward_per_instance_bytes"] = saved[k]
    out["ratio_time"] = med["gloro"] / med["standard"]
    out["power_iteration_share_of_gloro_step"] = med["power_iteration_only"] / med["gloro"]
    out["ratio_peak_memory"] = mem_med["gloro"] / max(mem_med["standard"], 1.0)
    out["ratio_saved_for_backward"] = saved["gloro"] / max(saved["standard"], 1.0)
    print(
        f"  standard {med['standard'] * 1e3:.1f} ms/step, gloro {med['gloro'] * 1e3:.1f} "
        f"ms/step (power iteration {med['power_iteration_only'] * 1e3:.1f}), "
        f"ratio {out['ratio_time']:.3f}; peak mem ratio {out['ratio_peak_memory']:.3f}, "
        f"saved-for-backward ratio {out['ratio_saved_for_backward']:.3f}"
    )
    return out


def main(argv=None) -> dict:
    notes = [
        "sec_per_epoch = median sec/step x ceil(N/256) steps (extrapolated, not a timed "
        "full epoch); --quick uses batch 32 and a 2k/1k subset.",
        "CPU peak memory = peak sampled RSS minus RSS after gc + malloc_trim, over 2 steps "
        "(process level, approximate); saved_for_backward = exact bytes autograd keeps "
        "for backward in one forward (parameters and buffers excluded). CUDA: "
        "max_memory_allocated growth.",
        "6C2F runs on uniform random CIFAR-shaped data: timing depends on shapes only.",
    ]
    return C.run_per_model("train_overhead", __doc__, MODELS, run_model, notes, TARGETS, argv)


if __name__ == "__main__":
    main()
