"""Where the gap between the fast and the sound Lipschitz bound of a GloRo net comes from.

For each layer bound of the net: the frozen power-iteration estimate the fast mode uses, the
estimate after many more iterations (still a *lower* estimate of the layer's operator norm),
and the proven upper bound the sound mode uses. Exact norm lies between the last two, so
``sound / long_iteration`` bounds how loose the proven bound can be, layer by layer; the
global bounds (max over class pairs of K) are reported for both modes.

    python -m benchmarks.bound_tightness --run RUN_DIR [--iters N] [--threads N]
    python -m benchmarks.bound_tightness --quick      # a small random 2C2F, for tests

Writes ``bound_tightness-<device>.json`` (``--name`` changes the prefix).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torchgloro as tg
from benchmarks import _common as C
from torchgloro.bounds.registry import ConstantBound
from torchgloro.nn.models import create_model


def _layer_rows(net: tg.GloroNet, iters: int) -> list[dict]:
    rows = []
    for i, b in enumerate(net.bounds):
        if isinstance(b, ConstantBound):
            continue
        frozen = float(b.estimate())
        t0 = time.perf_counter()
        upper = float(b.sound())
        sound_s = time.perf_counter() - t0
        long_est = float(b.converge(tol=0.0, max_iter=iters))
        rows.append(
            {
                "index": i,
                "bound": type(b).__name__,
                "layer": repr(b.layer),
                "frozen_estimate": frozen,
                "long_iteration_estimate": long_est,
                "sound_upper": upper,
                "sound_over_long_iteration": upper / long_est,
                "sound_over_frozen": upper / frozen,
                "sound_seconds": sound_s,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__.split("\n", 1)[0])
    p.add_argument("--run", type=Path, default=None, help="run folder (best.safetensors)")
    p.add_argument("--iters", type=int, default=20_000, help="power iterations per layer")
    p.add_argument("--name", default="bound_tightness", help="result file prefix")
    args = p.parse_args(argv)
    device = C.setup(args)
    if args.run is not None:
        net = tg.load(args.run)
        source = f"{args.run}/best.safetensors"
    else:
        if not args.quick:
            raise SystemExit("--run RUN_DIR is required (or --quick for a random net).")
        net = tg.GloroNet(create_model("2c2f", (1, 28, 28), 10), 0.3, in_shape=(1, 28, 28))
        source = "random 2c2f"
    net.eval()
    iters = 200 if args.quick else args.iters
    fast_k = float(net.lipschitz_constant("fast").max())
    rows = _layer_rows(net, iters)
    sound_k = float(net.lipschitz_constant("sound").max())
    # Exact layer norms lie in [long_iteration, sound]; so does their product.
    span = math.prod(r["sound_over_long_iteration"] for r in rows)
    payload = {
        "source": source,
        "power_iterations": iters,
        "layers": rows,
        "global_ub_fast": fast_k,
        "global_ub_sound": sound_k,
        "sound_over_fast": sound_k / fast_k,
        "product_sound_over_long_iteration": span,
        "product_frozen_to_long_iteration": math.prod(
            r["long_iteration_estimate"] / r["frozen_estimate"] for r in rows
        ),
    }
    for r in rows:
        print(
            f"{r['index']:3d} {r['bound']:14s} frozen {r['frozen_estimate']:.6g}  "
            f"long {r['long_iteration_estimate']:.6g}  sound {r['sound_upper']:.6g}  "
            f"(sound/long {r['sound_over_long_iteration']:.5f})"
        )
    print(f"global K: fast {fast_k:.6g}, sound {sound_k:.6g} (x{sound_k / fast_k:.5f})")
    C.write_result(args.name, args, device, payload)
    return payload


if __name__ == "__main__":
    main()
