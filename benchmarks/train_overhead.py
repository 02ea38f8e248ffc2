"""GloRo training vs standard training: seconds per epoch and peak memory per instance.

For each model, two identical backbones (same seed) are trained side by side in one
process, in interleaved blocks of ``steps`` steps (standard, GloRo, power-iteration-only,
rotated every round), each step by the trainer's own ``TrainStep`` (what ``Run.train_epoch``
calls): the split lives as one tensor on the device and is shuffled by index
(``DeviceBatches``), Adam with eps=1e-7, the trainer's on-device metric sums, no host syncs.
Standard = plain cross-entropy on the backbone's logits (what the trainer does with
``gloro.robust = false``); GloRo = ``GloroCrossEntropy`` on the net's C+1 logits with the
recipes' power iterations per step. Seconds per epoch are extrapolated from the median
seconds per step (x steps per epoch), because full CPU epochs are too slow.

``--compile`` times both sides with the whole step compiled (``run.compile``; backend and
mode as ``run.compile_backend`` / ``run.compile_mode``), written to
``train_overhead-compiled-<backend>-<mode>-<device>.json``; the first (warm-up) block of each
side includes its compilation. ``--power-iterations N`` replaces the recipes' counts (the
file name then ends in ``-pi<N>``); ``--arch`` picks models (the name then lists them).

    python -m benchmarks.train_overhead [--quick] [--device cpu|cuda] [--threads N]
        [--compile [--compile-backend inductor] [--compile-mode default|reduce-overhead]]
        [--power-iterations N] [--arch 2c2f|4c3f|6c2f ...]
"""

from __future__ import annotations

import argparse
import functools
import math

import torch

from benchmarks import _common as C
from torchgloro import GloroNet
from torchgloro.data import DeviceBatches
from torchgloro.losses import GloroCrossEntropy
from torchgloro.nn.models import create_model
from torchgloro.train._step import TrainStep
from torchgloro.train.build import TrainModule

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
    """One model + optimizer + batch stream, stepping by the trainer's ``TrainStep``."""

    def __init__(
        self, arch, in_shape, n_iter, eps, robust, split, batch, device, seed, compile_options=None
    ):
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
        self.acc = torch.zeros(4, dtype=torch.float64, device=device)
        self.train_step = TrainStep(
            TrainModule(self.net, amp=False), self.net, self.opt, GloroCrossEntropy(),
            self.acc, 10, 0.0, compile_options,
        )  # fmt: skip

    def forward(self, x):
        return self.net(x) if self.robust else self.net.backbone(x)

    def step(self) -> None:
        x, y = next(self._it)
        self.net.epsilon = self.eps  # the trainer sets ε and lr every batch
        self.train_step.set_lr(self.lr)
        self.train_step(x, y, self.robust)

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.step()

    @torch.no_grad()
    def power_iterations(self, n: int) -> None:
        """Only the per-step power iterations of ``n`` steps, by the step's own path (no
        forward/backward): eager on CPU, one CUDA-graph replay per step on a GPU."""
        for _ in range(n):
            self.net._advance(self.net.power_iterations)


def run_model(arch, data, in_shape, n_iter, eps, args, device, compile_options, iterations):
    n_iter = n_iter if iterations is None else iterations
    batch = 32 if args.quick else 256
    if data == "mnist":
        split, source = C.load_mnist("train", 2048 if args.quick else None)
        n_epoch = 60_000
    else:
        split = C.synthetic_split(1024 if args.quick else 4096, in_shape, seed=args.seed)
        source, n_epoch = "synthetic 3x32x32 (CIFAR-10 shaped; epoch = 50,000 samples)", 50_000
    steps_per_epoch = math.ceil(n_epoch / 256)
    kw = dict(split=split, batch=batch, device=device, seed=args.seed,
              compile_options=compile_options)  # fmt: skip
    std = Runner(arch, in_shape, n_iter, eps, False, **kw)
    glo = Runner(arch, in_shape, n_iter, eps, True, **kw)
    steps, reps = (QUICK if args.quick else FULL)[arch]
    how = "eager" if compile_options is None else f"compiled {compile_options}"
    print(f"{arch}: {steps} steps x {reps} rounds, batch {batch}, {n_iter} power iterations, {how}")
    blocks = {"standard": lambda: std.steps(steps), "gloro": lambda: glo.steps(steps)}
    if compile_options is None:  # compiled, the iterations are part of the step's graph
        blocks["power_iteration_only"] = lambda: glo.power_iterations(steps)
    t = C.interleave(blocks, reps, device)
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
        "compile": compile_options,
    }
    for k in blocks:
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
    if "power_iteration_only" in med:
        out["power_iteration_share_of_gloro_step"] = med["power_iteration_only"] / med["gloro"]
    out["ratio_peak_memory"] = mem_med["gloro"] / max(mem_med["standard"], 1.0)
    out["ratio_saved_for_backward"] = saved["gloro"] / max(saved["standard"], 1.0)
    pi = med.get("power_iteration_only", math.nan) * 1e3
    print(
        f"  standard {med['standard'] * 1e3:.1f} ms/step, gloro {med['gloro'] * 1e3:.1f} "
        f"ms/step (power iteration {pi:.1f}), "
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
        "compile: null = eager steps; else the whole step under torch.compile with these "
        "options (the trainer's run.compile), power_iteration_only then not measured.",
    ]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--compile", action="store_true", help="the whole step compiled")
    pre.add_argument("--compile-backend", default="inductor")
    pre.add_argument("--compile-mode", default="default",
                     choices=["default", "reduce-overhead", "max-autotune"])  # fmt: skip
    pre.add_argument("--power-iterations", type=int, default=None, help="instead of the recipes'")
    pre.add_argument("--arch", action="append", choices=[m[0] for m in MODELS],
                     help="only these models (repeatable; default all)")  # fmt: skip
    known, rest = pre.parse_known_args(argv)
    models = [m for m in MODELS if known.arch is None or m[0] in known.arch]
    name, options = "train_overhead", None
    if known.compile:
        options = {"backend": known.compile_backend, "mode": known.compile_mode}
        name += f"-compiled-{known.compile_backend}-{known.compile_mode}"
    if known.power_iterations is not None:
        name += f"-pi{known.power_iterations}"
    if known.arch is not None:
        name += "-" + "-".join(m[0] for m in models)
    measure = functools.partial(
        run_model, compile_options=options, iterations=known.power_iterations
    )
    return C.run_per_model(name, __doc__, models, measure, notes, TARGETS, rest)


if __name__ == "__main__":
    main()
