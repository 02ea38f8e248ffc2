"""An autouse fixture that fails any test leaving process-wide numeric state changed.

Numeric settings are process state: a test (or library code under test) that changes one and
does not restore it changes every later test's arithmetic, so failures then depend on the
order tests run in and on the CPU (bfloat16 only bites on CPUs with AMX). The guard reads the
state before and after each test; on a difference it restores what it can and reports what
changed, which pytest shows as an error in that test's teardown.
"""

from __future__ import annotations

import pytest
import torch

from torchgloro._fp_env import (
    _TREE,
    flushes_on_this_thread,
    fp32_restore,
    fp32_snapshot,
    pool_flushes,
)


def _autocast() -> dict[str, tuple[bool, torch.dtype]]:
    return {
        dev: (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        for dev in ("cpu", "cuda")
    }


# cuDNN's own owners are also written by PyTorch itself: torch.export reads and writes back the
# legacy ``cudnn.allow_tf32`` flag, which turns their yielding default into an equal explicit
# value. Their effective values are still compared ("as read").
_CUDNN = (("cuda", "conv"), ("cuda", "rnn"))


def _as_set() -> dict:
    return {n: v for n, v in fp32_snapshot().items() if n not in _CUDNN}


def numeric_state() -> dict[str, object]:
    """Every process-wide setting that changes what a float computation returns."""
    state: dict[str, object] = {
        "fp32_precision (as set)": _as_set(),
        "fp32_precision (as read)": {n: torch._C._get_fp32_precision_getter(*n) for n, _ in _TREE},
        "flush_denormal (this thread)": flushes_on_this_thread(),
        "flush_denormal (intra-op pool)": pool_flushes(),
        "num_threads": torch.get_num_threads(),
        "default_dtype": torch.get_default_dtype(),
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "autocast": _autocast(),
        "deterministic_algorithms": (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
        "cudnn.enabled": torch.backends.cudnn.enabled,
        "mkldnn.enabled": torch.backends.mkldnn.enabled,
        "nnpack.enabled": torch._C._get_nnpack_enabled(),
        "anomaly_mode": torch.is_anomaly_enabled(),
    }
    return state


def restore(before: dict[str, object], after: dict[str, object]) -> None:
    """Puts back what can be put back (the pool threads' flush setting cannot)."""
    raw_before, raw_after = before["fp32_precision (as set)"], after["fp32_precision (as set)"]
    changed = tuple(n for n in raw_before if raw_before[n] != raw_after[n])
    fp32_restore(raw_before, changed)
    torch.set_flush_denormal(bool(before["flush_denormal (this thread)"]))
    torch.set_num_threads(int(before["num_threads"]))
    torch.set_default_dtype(before["default_dtype"])
    torch.set_grad_enabled(bool(before["grad_enabled"]))
    for dev, (enabled, dtype) in before["autocast"].items():
        torch.set_autocast_enabled(dev, enabled)
        torch.set_autocast_dtype(dev, dtype)
    det, warn_only = before["deterministic_algorithms"]
    torch.use_deterministic_algorithms(det, warn_only=warn_only)
    torch.backends.cudnn.enabled = before["cudnn.enabled"]
    torch.backends.mkldnn.enabled = before["mkldnn.enabled"]
    torch._C._set_nnpack_enabled(before["nnpack.enabled"])
    torch.set_anomaly_enabled(bool(before["anomaly_mode"]))


@pytest.fixture(autouse=True)
def numeric_state_guard():
    """Fails the test (in its teardown) if it left any :func:`numeric_state` changed."""
    before = numeric_state()
    yield
    after = numeric_state()
    if after != before:
        restore(before, after)
        diff = [f"{k}: {before[k]!r} -> {after[k]!r}" for k in before if before[k] != after[k]]
        pytest.fail(
            "this test left process-wide numeric state changed (restored now, so later tests "
            "are unaffected):\n  " + "\n  ".join(diff),
            pytrace=False,
        )
