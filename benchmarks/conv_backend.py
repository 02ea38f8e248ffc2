"""Which CPU kernels the single-instance power iteration should use, per convolution layer.

For every convolution of every registered architecture (at its usual input shape), times
10 power iterations (``_iterate(10)``: conv + transposed conv + normalisation, one instance)
with oneDNN on and off, interleaved, and records which was faster next to the choice of
``torchgloro.bounds.registry.small_conv`` (the shape rule the library uses). Also reports, per
architecture, the power-iteration time per step with the rule against always-oneDNN, and
for the paper's MNIST/CIFAR models a whole GloRo training step (batch 256) both ways,
interleaved with standard training of the same backbone. CPU only: on CUDA the oneDNN switch
does nothing.

    python -m benchmarks.conv_backend [--quick] [--threads N]
"""

from __future__ import annotations

import torch

from benchmarks import _common as C
from benchmarks.train_overhead import MODELS, Runner
from torchgloro import GloroNet, create_model
from torchgloro.bounds.registry import PowerIterationBound

ARCHS = [
    ("minicnn", (1, 8, 8), {}),
    ("2c2f", (1, 28, 28), {}),
    ("4c3f", (1, 28, 28), {}),
    ("6c2f", (3, 32, 32), {}),
    ("7c1f", (3, 64, 64), {}),
    ("liresnet", (3, 32, 32), {"depth": 4, "width": 64}),
]
N_ITER = 10


def _conv_bounds(net: GloroNet) -> list[PowerIterationBound]:
    """The power-iteration bounds of convolutions (dense layers have no oneDNN choice)."""
    return [b for b in net.bounds if isinstance(b, PowerIterationBound) and b.u.dim() == 4]


def _iterate_with(b: PowerIterationBound, native: bool):
    def fn() -> None:
        b._native_cpu = native  # what _iterate's backend choice reads
        b._iterate(N_ITER)

    return fn


def run_arch(name, in_shape, kwargs, args, device) -> dict:
    net = GloroNet(create_model(name, in_shape, 10, **kwargs), 0.3)
    reps = 3 if args.quick else 15
    layers, t_rule, t_onednn = [], 0.0, 0.0
    for b in _conv_bounds(net):
        rule = b._native_cpu
        w = b._weight().detach()
        out_hw = b._op(b.u, w).shape[2:].numel()
        t = C.interleave(
            {"onednn": _iterate_with(b, False), "native": _iterate_with(b, True)}, reps, device
        )
        b._native_cpu = rule
        med = {k: C.median(v) / N_ITER for k, v in t.items()}
        faster_native = med["native"] < med["onednn"]
        layers.append(
            {
                "layer": type(b.layer).__name__,
                "weight_shape": list(w.shape),
                "in_shape": list(b.u.shape[1:]),
                "macs": int(w.numel() * out_hw),
                "sec_per_iteration_onednn": med["onednn"],
                "sec_per_iteration_native": med["native"],
                "measured_faster": "native" if faster_native else "onednn",
                "rule_picks": "native" if rule else "onednn",
                "speedup_native": med["onednn"] / med["native"],
            }
        )
        t_onednn += med["onednn"] * N_ITER
        t_rule += med["native" if rule else "onednn"] * N_ITER
    agree = sum(r["measured_faster"] == r["rule_picks"] for r in layers)
    print(
        f"{name}: rule agrees with the measurement on {agree}/{len(layers)} conv layers; "
        f"conv power iterations per step {t_onednn * 1e3:.2f} ms (oneDNN) -> "
        f"{t_rule * 1e3:.2f} ms (rule)"
    )
    return {
        "arch": name,
        "in_shape": list(in_shape),
        "options": kwargs,
        "layers": layers,
        "rule_agrees": agree,
        "conv_power_iteration_sec_per_step_onednn": t_onednn,
        "conv_power_iteration_sec_per_step_rule": t_rule,
    }


def _set_rule(convs: list[PowerIterationBound], use_rule: bool, rule: list[bool]) -> None:
    for b, r in zip(convs, rule):
        b._native_cpu = r and use_rule


def run_step(arch, data, in_shape, n_iter, eps, args, device) -> dict:
    """Whole training steps: standard, GloRo with the rule, GloRo with oneDNN everywhere."""
    batch = 32 if args.quick else 256
    steps, reps = (1, 2) if args.quick else ((20, 7) if arch == "2c2f" else (3, 7))
    split = C.synthetic_split(batch * 4, in_shape, seed=args.seed)  # timing needs shapes only
    kw = dict(split=split, batch=batch, device=device, seed=args.seed)
    std = Runner(arch, in_shape, n_iter, eps, False, **kw)
    glo = Runner(arch, in_shape, n_iter, eps, True, **kw)
    convs = _conv_bounds(glo.net)
    rule = [b._native_cpu for b in convs]

    def gloro(use_rule: bool):
        def fn() -> None:
            _set_rule(convs, use_rule, rule)
            glo.steps(steps)

        return fn

    t = C.interleave(
        {"standard": lambda: std.steps(steps), "rule": gloro(True), "onednn": gloro(False)},
        reps, device,
    )  # fmt: skip
    _set_rule(convs, True, rule)
    med = {k: C.median(v) / steps for k, v in t.items()}
    out = {
        "arch": arch,
        "batch_size": batch,
        "power_iterations": n_iter,
        "sec_per_step": med,
        "ratio_rule": med["rule"] / med["standard"],
        "ratio_onednn_everywhere": med["onednn"] / med["standard"],
    }
    print(
        f"{arch} step: standard {med['standard'] * 1e3:.1f} ms, GloRo {med['rule'] * 1e3:.1f} "
        f"ms with the rule ({out['ratio_rule']:.3f}x), {med['onednn'] * 1e3:.1f} ms with "
        f"oneDNN everywhere ({out['ratio_onednn_everywhere']:.3f}x)"
    )
    return out


def main(argv=None) -> dict:
    args = C.parser(__doc__.splitlines()[0]).parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("conv_backend measures CPU kernels only; run it with --device cpu.")
    device = C.setup(args)
    archs = ARCHS[:2] if args.quick else ARCHS
    with torch.no_grad():
        results = [run_arch(*a, args, device) for a in archs]
    steps = [run_step(*m, args, device) for m in (MODELS[:1] if args.quick else MODELS)]
    notes = [
        f"sec_per_iteration = median over interleaved rounds of {N_ITER} iterations / {N_ITER}.",
        "A mismatch where the two times are within a few percent is noise, not a wrong pick.",
    ]
    payload = {"power_iterations": N_ITER, "results": results, "training_steps": steps,
               "notes": notes}  # fmt: skip
    C.write_result("conv_backend", args, device, payload)
    return payload


if __name__ == "__main__":
    main()
