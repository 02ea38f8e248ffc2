"""GloRo's training overhead vs batch size and vs model width (2C2F, MNIST shapes).

Per-step time of GloRo and standard training (the ``train_overhead`` loop), interleaved,
for batch sizes 64..1024 at width x1, and for channel/width multipliers 0.5, 1, 2 (2C2F
built with ``torchgloro.nn.models.build_plan``) at batch 256. The power-iteration cost per
step does not depend on the batch, so GloRo's relative overhead should shrink as the
batch work grows. Writes a JSON and a plot ``scaling-<device>[-quick].png``.

    python -m benchmarks.scaling [--quick] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

from benchmarks import _common as C
from benchmarks.train_overhead import Runner
from torchgloro.nn import models

BATCHES = [64, 128, 256, 512, 1024]
WIDTHS = [0.5, 1.0, 2.0]
N_ITER = 10


def plan_2c2f(mult: float) -> list[tuple]:
    m = lambda c: max(1, round(c * mult))  # noqa: E731
    return [("c", m(16), 4, 2), ("c", m(32), 4, 2), ("d", m(100)), ("d", 10)]


def _register(mult: float) -> str:
    name = f"_bench_2c2f_x{mult:g}"
    if name not in models.list_models():
        plan = plan_2c2f(mult)
        models.register_model(name)(
            lambda in_shape, num_classes, activation, plan=plan: models.build_plan(
                plan, in_shape, num_classes, activation
            )
        )
    return name


def measure(arch, batch, split, args, device, target_s) -> dict:
    kw = dict(split=split, batch=batch, device=device, seed=args.seed)
    std = Runner(arch, (1, 28, 28), N_ITER, 0.45, False, **kw)
    glo = Runner(arch, (1, 28, 28), N_ITER, 0.45, True, **kw)
    # steps per block: enough for ~target_s seconds of standard training
    C.interleave({"s": lambda: std.steps(1)}, 1, device)
    probe = C.interleave({"s": lambda: std.steps(1)}, 2, device)["s"]
    steps = max(1, min(50, round(target_s / max(C.median(probe), 1e-4))))
    rounds = 3 if args.quick else 5
    t = C.interleave(
        {"standard": lambda: std.steps(steps), "gloro": lambda: glo.steps(steps)}, rounds, device
    )
    med = {k: C.median(v) / steps for k, v in t.items()}
    r = {
        "batch_size": batch,
        "steps_per_block": steps,
        "rounds": rounds,
        "standard_sec_per_step": med["standard"],
        "gloro_sec_per_step": med["gloro"],
        "standard_sec_per_sample": med["standard"] / batch,
        "gloro_sec_per_sample": med["gloro"] / batch,
        "ratio": med["gloro"] / med["standard"],
    }
    print(f"  {arch} batch {batch}: std {med['standard'] * 1e3:.1f} ms, gloro "
          f"{med['gloro'] * 1e3:.1f} ms, ratio {r['ratio']:.3f}")  # fmt: skip
    return r


def plot(by_batch, by_width, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    b = [r["batch_size"] for r in by_batch]
    ax[0].plot(b, [r["standard_sec_per_sample"] * 1e6 for r in by_batch], "o-", label="standard")
    ax[0].plot(b, [r["gloro_sec_per_sample"] * 1e6 for r in by_batch], "s-", label="GloRo")
    ax[0].set(xscale="log", xlabel="batch size", ylabel="µs per sample", title="2C2F, width x1")
    ax[0].legend()
    ax[1].plot(b, [r["ratio"] for r in by_batch], "o-")
    ax[1].axhline(1.10, ls="--", c="gray", label="target 1.10")
    ax[1].set(xscale="log", xlabel="batch size", ylabel="GloRo / standard", title="vs batch")
    ax[1].legend()
    w = [r["width_multiplier"] for r in by_width]
    ax[2].plot(w, [r["ratio"] for r in by_width], "o-")
    ax[2].axhline(1.10, ls="--", c="gray", label="target 1.10")
    ax[2].set(xscale="log", xlabel="width multiplier", ylabel="GloRo / standard",
              title="vs width (batch 256)")  # fmt: skip
    ax[2].legend()
    ax[2].minorticks_off()
    ax[2].set_xticks(w)
    ax[2].set_xticklabels([f"{x:g}" for x in w])
    for a in ax[:2]:
        a.minorticks_off()
        a.set_xticks(b)
        a.set_xticklabels([str(x) for x in b])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> dict:
    args = C.parser(__doc__.splitlines()[0]).parse_args(argv)
    device = C.setup(args)
    batches = [64, 256] if args.quick else BATCHES
    widths = [0.5, 1.0] if args.quick else WIDTHS
    split, source = C.load_mnist("train", 4096 if args.quick else 16_384)
    target_s = 0.05 if args.quick else 0.6
    print("vs batch size (2C2F x1):")
    by_batch = [measure("2c2f", b, split, args, device, target_s) for b in batches]
    print("vs width (batch 256):")
    by_width = []
    for m in widths:
        r = measure(_register(m), 256, split, args, device, target_s)
        by_width.append({"width_multiplier": m, "plan": plan_2c2f(m), **r})
    png = C.result_path("scaling", args, ".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(by_batch, by_width, png)
    payload = {
        "data": source,
        "power_iterations": N_ITER,
        "by_batch_size": by_batch,
        "by_width": by_width,
        "plot": png.name,
        "notes": ["Per-step medians over interleaved blocks of GloRo and standard steps."],
    }
    C.write_result("scaling", args, device, payload)
    return payload


if __name__ == "__main__":
    main()
