"""The suite's guard (tests/_numeric_guard.py) fails a test that leaks numeric state."""

from __future__ import annotations

import pytest

_LEAKS = {
    "fp32_precision_parent": "torch.backends.mkldnn.fp32_precision = 'bf16'",
    "fp32_precision_owner": "torch.backends.mkldnn.conv.fp32_precision = 'bf16'",
    "flush_denormal": "torch.set_flush_denormal(True)",
    "threads": "torch.set_num_threads(torch.get_num_threads() + 1)",
    "default_dtype": "torch.set_default_dtype(torch.float64)",
    "grad_mode": "torch.set_grad_enabled(False)",
    "deterministic": "torch.use_deterministic_algorithms(True)",
    "autocast": "torch.set_autocast_enabled('cpu', True)",
}


@pytest.fixture
def guarded(pytester):
    """A pytester folder whose conftest is the suite's guard."""
    pytester.makeconftest("from _numeric_guard import numeric_state_guard  # noqa: F401\n")
    return pytester


def test_a_leaking_test_fails_and_the_state_is_restored(guarded):
    import torch

    from torchgloro._fp_env import fp32_snapshot

    before = (fp32_snapshot(), torch.get_num_threads(), torch.get_default_dtype())
    tests = [f"def test_leak_{name}():\n    {code}\n" for name, code in _LEAKS.items()]
    tests.append("def test_clean():\n    torch.ones(3) @ torch.ones(3)\n")
    guarded.makepyfile("import torch\n\n" + "\n".join(tests))
    result = guarded.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=len(_LEAKS) + 1, errors=len(_LEAKS))
    result.stdout.fnmatch_lines(["*left process-wide numeric state changed*"])
    for name in _LEAKS:
        result.stdout.fnmatch_lines([f"ERROR *test_leak_{name}*"])
    # Each leak was undone, so this process (and the rest of the suite) is unaffected.
    assert (fp32_snapshot(), torch.get_num_threads(), torch.get_default_dtype()) == before
    assert torch.is_grad_enabled() and not torch.are_deterministic_algorithms_enabled()
