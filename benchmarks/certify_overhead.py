"""Certification vs plain inference over a whole test set, per model.

With K precomputed (``net.refresh()`` once), the interleaved rounds time five passes over
the test set in batches: plain float32 inference ``net.backbone(x)``, ``certify(mode="fast")``,
``certify(mode="sound")`` (float32 logits with a proven float32 allowance, float64 for the
points it leaves open), plain float64 inference (the sound state's float64 backbone copy) and
``certify(mode="sound", precision="float64")``. Separately, the one-off cost of the proven bounds
(``net._sound_state()`` after ``net._sound_cache = None``) is timed once per round.

    python -m benchmarks.certify_overhead [--quick] [--device cpu|cuda] [--threads N]
    python -m benchmarks.certify_overhead --run RUN_DIR [--threads N]   # a trained MNIST run

With ``--run`` the trained net of a run folder (``best.safetensors``) is timed on the MNIST
test set instead of random weights, and the share of points sound certification sends to
float64 is recorded (``certify_overhead-trained-<device>.json``). ``--batch N`` certifies N
points per call instead of the trainer's default 1000 (``-batch<N>`` in the file name): on a
GPU, 10,000 amortises the fixed per-call work (input and staleness checks, a few host syncs).
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch

import torchgloro as tg
import torchgloro.train
from benchmarks import _common as C
from torchgloro import GloroNet
from torchgloro.nn.models import create_model

MODELS = [
    ("2c2f", "mnist", (1, 28, 28), 0.3),
    ("4c3f", "mnist", (1, 28, 28), 0.3),
    ("6c2f", "cifar-shaped synthetic", (3, 32, 32), 36 / 255),
]
# test samples timed (full mode); the CPU can't afford 4 passes x rounds of 6C2F on 10k
FULL_N = {"2c2f": 10_000, "4c3f": 10_000, "6c2f": 2_000}
FULL_ROUNDS = {"2c2f": 5, "4c3f": 3, "6c2f": 3}
TARGETS = {"certify_fast_over_inference": 1.05, "certify_sound_over_inference": 1.05}


def run_model(
    arch, data, in_shape, eps, args, device, run: Path | None = None, batch: int = 1000
) -> dict:
    n_full = 10_000
    n = 128 if args.quick else FULL_N.get(arch, n_full)
    rounds = 2 if args.quick else FULL_ROUNDS.get(arch, 5)
    if data == "mnist":
        split, source = C.load_mnist("test", n)
    else:
        split, source = C.synthetic_split(n, in_shape, seed=args.seed + 1), "synthetic 3x32x32"
    x = split.x.to(device)
    batches = list(torch.split(x, batch))
    torch.manual_seed(args.seed)
    if run is not None:
        net = tg.load(run).to(device)
        eps = float(net.epsilon)
    else:
        with torch.device(device):
            net = GloroNet(create_model(arch, in_shape, 10), eps)
    net.eval()
    t0 = time.perf_counter()
    net.refresh()  # converge K once: certification below reuses it
    t_refresh = time.perf_counter() - t0
    one_off = []  # the proven bounds, computed from scratch (cache invalidated)
    net._sound_cache = None
    t0 = time.perf_counter()
    st = net._sound_state()
    C.sync(device)
    one_off.append(time.perf_counter() - t0)
    backbone64 = st.backbone64

    @torch.no_grad()
    def infer32():
        for xb in batches:
            net.backbone(xb)

    def fast():
        for xb in batches:
            net.certify(xb, mode="fast")

    @torch.no_grad()
    def infer64():
        for xb in batches:
            backbone64(xb.to(torch.float64))

    def sound_():
        for xb in batches:
            net.certify(xb, mode="sound")

    def sound64():
        for xb in batches:
            net.certify(xb, mode="sound", precision="float64")

    print(f"{arch}: {n} test samples, batch {batch}, {rounds} rounds")
    t = C.interleave(
        {"inference_f32": infer32, "certify_fast": fast, "certify_sound": sound_,
         "inference_f64": infer64, "certify_sound_float64": sound64},
        rounds, device,
    )  # fmt: skip
    for _ in range(0 if args.quick else 1):  # once more, after the timed rounds
        net._sound_cache = None
        C.sync(device)
        t0 = time.perf_counter()
        net._sound_state()
        C.sync(device)
        one_off.append(time.perf_counter() - t0)
    med = {k: C.median(v) for k, v in t.items()}
    scale = n_full / n
    out = {
        "arch": arch,
        "data": source,
        "n_timed": n,
        "n_test_set": n_full,
        "batch_size": batch,
        "rounds": rounds,
        "extrapolated_to_test_set": n != n_full,
        "refresh_seconds": t_refresh,
        "sound_state_seconds_median": C.median(one_off),
        "sound_state_seconds_all": one_off,
    }
    for k, v in t.items():
        out[k] = {"seconds_median": med[k], "seconds_all": v, "test_set_seconds": med[k] * scale}
    if run is not None:  # which points went to float64, and that the decisions agree
        auto = [net.certify(xb) for xb in batches]
        full = [net.certify(xb, precision="float64") for xb in batches]
        y32 = torch.cat([c.logits for c in auto])
        y64 = torch.cat([c.logits for c in full])
        gap = ((y32 - y64).abs() / (1 + y64.abs())).amax(dim=1)
        out["run"] = str(run)
        out["epsilon"] = eps
        out["float64_fraction"] = float((gap < 1e-11).double().mean())  # rows recomputed
        out["same_certified"] = bool(
            torch.equal(torch.cat([c.certified for c in auto]),
                        torch.cat([c.certified for c in full]))
        )  # fmt: skip
    out["ratio_fast_over_f32_inference"] = med["certify_fast"] / med["inference_f32"]
    out["ratio_sound_over_f32_inference"] = med["certify_sound"] / med["inference_f32"]
    out["ratio_sound_float64_over_f64_inference"] = (
        med["certify_sound_float64"] / med["inference_f64"]
    )
    print(
        f"  inference {med['inference_f32']:.3f}s, fast {med['certify_fast']:.3f}s "
        f"(x{out['ratio_fast_over_f32_inference']:.3f}), sound {med['certify_sound']:.3f}s "
        f"(x{out['ratio_sound_over_f32_inference']:.3f}); f64 inference "
        f"{med['inference_f64']:.3f}s, sound float64 {med['certify_sound_float64']:.3f}s "
        f"(x{out['ratio_sound_float64_over_f64_inference']:.3f}); sound state "
        f"{out['sound_state_seconds_median']:.2f}s once"
    )
    return out


def main(argv=None) -> dict:
    notes = [
        "Random (Glorot) weights: the cost of certification does not depend on the weights "
        "(the one-off sound bound may, slightly, through its iterative parts).",
        "test_set_seconds = median seconds x (10,000 / n_timed); 6C2F times 2,000 "
        "CIFAR-shaped synthetic samples in full mode and is extrapolated.",
        "certify_sound (precision='auto') is compared with float32 inference: it runs the "
        "float32 backbone and recomputes in float64 only the points float32 leaves open. "
        "With random weights few points are open; a trained net's share is measured by "
        "`gloro evaluate --cost` on a real run (see docs/performance.md).",
        "certify_sound_float64 is compared with float64 inference of the same float64 "
        "backbone copy (what it runs).",
    ]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--run", type=Path, default=None)
    pre.add_argument("--batch", type=int, default=1000, help="points per call (default 1000)")
    known, rest = pre.parse_known_args(argv)
    suffix = "" if known.batch == 1000 else f"-batch{known.batch}"
    if known.run is None:
        measure = functools.partial(run_model, batch=known.batch)
        name = "certify_overhead" + suffix
        return C.run_per_model(name, __doc__, MODELS, measure, notes, TARGETS, rest)
    cfg = tg.train.load_config(known.run / "config.toml")
    if cfg.data.name != "mnist":
        raise SystemExit(f"--run times MNIST runs only; {known.run} trained on {cfg.data.name}.")
    models = [(cfg.model.arch, "mnist", (1, 28, 28), None)]
    notes[0] = f"Trained weights: {known.run}/best.safetensors on the MNIST test set."
    measure = functools.partial(run_model, run=known.run, batch=known.batch)
    return C.run_per_model(
        "certify_overhead-trained" + suffix, __doc__, models, measure, notes, TARGETS, rest
    )


if __name__ == "__main__":
    main()
