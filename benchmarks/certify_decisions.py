"""Per-call cost of certification's decision steps on a (B, 10) float64 batch.

Times ``margins.certified_radius`` and ``_certify._may_certify`` (random logits, slack and a
symmetric K), one ``eval_mode`` enter/exit on an already-eval 2C2F GloroNet, and the net's
weights key (``GloroNet._fingerprint``: the values of parameters and buffers against a
snapshot, plus the structure check where the checkout has it), for 2C2F and 4C3F: the fixed
per-batch work that sound certification adds to inference. With ``PYTHONPATH=OLD/src`` it
times an older checkout's functions (``eval_mode``: null where the checkout lacks it).

    python -m benchmarks.certify_decisions [--quick] [--threads N] [--out-dir DIR]
"""

from __future__ import annotations

import time

import torch

import torchgloro as tg
from benchmarks import _common as C
from torchgloro import margins
from torchgloro._certify import _may_certify
from torchgloro.nn.models import create_model

try:
    from torchgloro._net_attributes import eval_mode
except ImportError:  # commits before 974baa0, for an A/B against them (PYTHONPATH=old/src)
    eval_mode = None


def _per_call_us(fn, n: int) -> float:
    for _ in range(max(1, n // 10)):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main(argv=None) -> dict:
    args = C.parser(__doc__).parse_args(argv)
    device = C.setup(args)
    n = 20 if args.quick else 500
    rows = []
    for batch in (256, 1000):
        y = torch.randn(batch, 10, dtype=torch.float64) * 3
        K = torch.rand(10, 10, dtype=torch.float64) + 1
        K = ((K + K.t()) / 2).fill_diagonal_(0)
        s = torch.rand(batch, 10, dtype=torch.float64) * 1e-3
        pred, _ = margins.certified_radius(y, K, s)

        def radius(y=y, K=K, s=s):
            margins.certified_radius(y, K, s)

        def may(y=y, K=K, s=s, pred=pred):
            _may_certify(y, pred, K, s, 0.3, "margin")

        rows.append({
            "batch": batch,
            "certified_radius_us": _per_call_us(radius, n),
            "may_certify_us": _per_call_us(may, n),
        })  # fmt: skip
        print(rows[-1])
    net = tg.GloroNet(create_model("2c2f", (1, 28, 28), 10), 0.3).eval()

    def toggle():
        with eval_mode(net):
            pass

    def walk():  # what certify did before eval_mode: Module.eval() and .train(False)
        net.eval()
        net.train(False)

    fingerprint = {"2c2f": _per_call_us(net._fingerprint, n)}
    net4 = tg.GloroNet(create_model("4c3f", (1, 28, 28), 10), 1.58).eval()
    fingerprint["4c3f"] = _per_call_us(net4._fingerprint, max(1, n // 5))
    out = {
        "rows": rows,
        "eval_mode_on_eval_net_us": None if eval_mode is None else _per_call_us(toggle, n),
        "module_eval_and_train_walk_us": _per_call_us(walk, n),
        "fingerprint_us": fingerprint,
    }
    print(out)
    C.write_result("certify_decisions", args, device, out)
    return out


if __name__ == "__main__":
    main()
