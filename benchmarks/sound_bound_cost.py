"""One-off cost of the proven bounds, per layer and in all, for each paper architecture.

Sound certification proves every layer's operator norm once per weights (``net._sound_state()``:
exact FFT/Gram bounds for convolutions, a float64 SVD for dense layers, the round-off model);
later calls reuse it. This times that step on random (Glorot) weights: each layer bound's
``sound()`` alone, then the whole state, for 2C2F/4C3F (MNIST), 6C2F (CIFAR-10) and 7C1F
(Tiny-ImageNet, 200 classes).

    python -m benchmarks.sound_bound_cost [--quick] [--threads N] [--out-dir DIR]
"""

from __future__ import annotations

import time

import torchgloro as tg
from benchmarks import _common as C

MODELS = {
    "2c2f": ((1, 28, 28), 10),
    "4c3f": ((1, 28, 28), 10),
    "6c2f": ((3, 32, 32), 10),
    "7c1f": ((3, 64, 64), 200),
}


def main(argv=None) -> dict:
    args = C.parser(__doc__.splitlines()[0]).parse_args(argv)
    device = C.setup(args)
    names = ["2c2f"] if args.quick else list(MODELS)
    rows = []
    for name in names:
        in_shape, classes = MODELS[name]
        net = tg.GloroNet(tg.create_model(name, in_shape, classes), epsilon=0.1).to(device)
        layers = []
        for b in net.bounds:
            t0 = time.perf_counter()
            value = b.sound()
            layers.append(
                {"layer": repr(b.layer) if hasattr(b, "layer") else b.name,
                 "seconds": time.perf_counter() - t0, "bound": value}
            )  # fmt: skip
        net._sound_cache = None
        t0 = time.perf_counter()
        net._sound_state()
        total = time.perf_counter() - t0
        rows.append({"arch": name, "in_shape": in_shape, "classes": classes,
                     "sound_state_seconds": total, "layers": layers})  # fmt: skip
        print(f"{name}: sound state {total:.1f} s; slowest layer "
              f"{max(x['seconds'] for x in layers):.1f} s")  # fmt: skip
    payload = {"results": rows}
    C.write_result("sound_bound_cost", args, device, payload)
    return payload


if __name__ == "__main__":
    main()
