"""The floating-point environment of certified computations: set for them, restored exactly."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.overrides import TorchFunctionMode

import torchgloro as tg
from torchgloro._fp_env import _STRICT, _TREE, fp32_restore, fp32_snapshot, ieee_precision

pytestmark = pytest.mark.skipif(not _TREE, reason="this torch has no fp32_precision API")

mkldnn = torch.backends.mkldnn


def _read(node):
    return torch._C._get_fp32_precision_getter(*node)


@pytest.fixture
def caller_precision():
    """Hands the test a way to set owners; puts every owner back as it was afterwards."""
    raw = fp32_snapshot()
    yield
    after = fp32_snapshot()
    fp32_restore(raw, tuple(n for n, _ in _TREE if after[n] != raw[n]))


def _net() -> tg.GloroNet:
    torch.manual_seed(0)
    return tg.GloroNet(tg.create_model("minicnn", (1, 8, 8), 10), epsilon=0.3).eval()


def test_certify_leaves_inherited_owners_inherited(caller_precision):
    """The issue's snippet: bf16 set on the parent, certify, bf16 switched off again."""
    net, x = _net(), torch.rand(4, 1, 8, 8)
    mkldnn.fp32_precision = "bf16"
    net.certify(x)
    mkldnn.fp32_precision = "none"
    assert (mkldnn.conv.fp32_precision, mkldnn.matmul.fp32_precision) == ("none", "none")


def test_snapshot_tells_inherited_from_explicit(caller_precision):
    mkldnn.fp32_precision = "bf16"  # sets the generic owner
    mkldnn.matmul.fp32_precision = "bf16"  # explicit, and equal to what it would inherit
    raw = fp32_snapshot()
    assert raw[("generic", "all")] == "bf16"
    assert raw[("mkldnn", "conv")] == "none" and raw[("mkldnn", "matmul")] == "bf16"
    assert fp32_snapshot() == raw  # probing changed nothing


def test_snapshot_keeps_a_backend_default_that_yields():
    """cuDNN's convolutions read "tf32" in a fresh process, yet follow any value set above:
    the snapshot must not turn that default into an explicit value."""
    code = textwrap.dedent(
        """
        import torch
        from torchgloro._fp_env import ieee_precision, fp32_snapshot
        g, s = torch._C._get_fp32_precision_getter, torch._C._set_fp32_precision_setter
        before = g("cuda", "conv")
        torch.backends.mkldnn.conv.fp32_precision = "bf16"
        with ieee_precision():
            pass
        fp32_snapshot()
        s("generic", "all", "ieee")
        print(before, g("cuda", "conv"))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = out.stdout.split()
    if before != "tf32":
        pytest.skip(f"this torch's cuDNN convolutions read {before!r} by default")
    assert after == "ieee"


class _ReducedPrecisionSpy(TorchFunctionMode):
    """Records every float32 product or convolution run while an owner allows TF32/bf16."""

    _OPS = ("linear", "conv", "matmul", "mm", "bmm", "einsum")

    def __init__(self) -> None:
        super().__init__()
        self.reduced: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        f32 = any(isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args)
        if f32 and any(op in name for op in self._OPS):
            if any(_read(n) not in ("ieee", "none") for n in _STRICT):
                self.reduced.append(name)
        return func(*args, **(kwargs or {}))


_SETTINGS = {
    "mkldnn bf16 (inherited)": lambda: setattr(mkldnn, "fp32_precision", "bf16"),
    "mkldnn tf32 (inherited)": lambda: setattr(mkldnn, "fp32_precision", "tf32"),
    "mkldnn.conv bf16": lambda: setattr(mkldnn.conv, "fp32_precision", "bf16"),
    "mkldnn.matmul bf16": lambda: setattr(mkldnn.matmul, "fp32_precision", "bf16"),
    "cuda.matmul tf32": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
    "legacy matmul precision medium": lambda: torch.set_float32_matmul_precision("medium"),
}

_PATHS = {
    "certify": lambda net, x: net.certify(x).radius,
    "certify float64": lambda net, x: net.certify(x, precision="float64").radius,
    "certify local fallback": lambda net, x: net.certify(x, fallback="local").certified,
    "certified_radius": lambda net, x: net.certified_radius(x),
    "predict": lambda net, x: net.predict(x),
    "lipschitz_constant sound": lambda net, x: net.lipschitz_constant("sound"),
    "lipschitz_constant fast": lambda net, x: net.lipschitz_constant("fast"),
    "deploy sound": lambda net, x: tg.deploy(net).class_bounds,
    "deploy fast": lambda net, x: tg.deploy(net, mode="fast").class_bounds,
}


@functools.cache
def _ieee_result(path: str) -> torch.Tensor:
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return _PATHS[path](_net(), x)


@pytest.mark.parametrize("path", list(_PATHS))
@pytest.mark.parametrize("setting", list(_SETTINGS))
def test_certified_paths_ignore_the_callers_precision(setting, path, caller_precision):
    """Each path that produces a certified quantity gives what it gives in IEEE float32, runs
    no float32 product at reduced precision, and hands the caller's settings back."""
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = _ieee_result(path)
    _SETTINGS[setting]()
    before = fp32_snapshot()
    net = _net()  # fresh: the bounds and iterates are computed under the caller's setting
    spy = _ReducedPrecisionSpy()
    with spy:
        got = _PATHS[path](net, x)
    assert spy.reduced == []
    assert torch.equal(got, expected)
    assert fp32_snapshot() == before


@pytest.mark.parametrize("setting", list(_SETTINGS))
def test_deployed_bound_never_below_the_proven_one(setting, caller_precision):
    proven = _net().lipschitz_constant("sound")  # in IEEE arithmetic
    _SETTINGS[setting]()
    net = _net()
    net(torch.rand(2, 1, 8, 8))  # a forward under the caller's setting first
    deployed = tg.deploy(net).class_bounds.double()
    off = ~torch.eye(10, dtype=torch.bool)
    assert bool((deployed[off] >= proven[off]).all())


def test_ieee_precision_writes_nothing_when_already_ieee(monkeypatch):
    writes = []
    monkeypatch.setattr(torch._C, "_set_fp32_precision_setter", lambda *a: writes.append(a))
    with ieee_precision():
        pass
    assert writes == []


_FTZ_SCRIPT = """
import copy, sys, torch, torch.nn as nn, torchgloro as tg
torch.set_num_threads(2)
torch.set_flush_denormal(True)
torch.randn(1000, 1000) @ torch.randn(1000, 1000)   # the pool's threads inherit FTZ/DAZ
torch.set_flush_denormal(False)
def case(layer):
  if layer == "linear":
      f = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 2))
      with torch.no_grad():
          f[0].weight.fill_(1e-39); f[1].weight.zero_(); f[1].weight[1].fill_(1.0 / 64)
          f[1].bias.copy_(torch.tensor([1e-21, 0.0]))
      x1, in_shape = torch.full((1, 64), 1e18), (64,)
  else:
      f = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.Flatten(), nn.Linear(144, 2))
      with torch.no_grad():
          f[0].weight.fill_(1e-39); f[2].weight.zero_(); f[2].weight[1].fill_(1.0 / 144)
          f[2].bias.copy_(torch.tensor([1e-21, 0.0]))
      x1, in_shape = torch.full((1, 1, 8, 8), 1e18), (1, 8, 8)
  net = tg.GloroNet(f, epsilon=1.0, in_shape=in_shape).eval()
  truth = int(copy.deepcopy(f).double()(x1.double())[0].argmax())
  if not torch.set_flush_denormal(True):
      return "no-ftz"
  cert = net.certify(x1.expand(20000, *in_shape).contiguous())
  torch.set_flush_denormal(False)
  return (f"{truth} {int((cert.certified & (cert.pred != truth)).sum())} "
          f"{int(cert.certified.sum())} {torch.get_num_threads()}")
print(case("linear")); print(case("conv"))
"""


def test_flush_to_zero_in_pool_threads_certifies_nothing_wrong():
    """Issue 30, case 1: worker threads created while flush-denormal was on keep it, for
    a dense and a convolutional net. Run in a subprocess: this process's pool must not be
    left flushing."""
    out = subprocess.run(
        [sys.executable, "-c", _FTZ_SCRIPT], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    if "no-ftz" in out:
        pytest.skip("this CPU cannot flush denormals (no DAZ/FTZ)")
    for line in out:  # linear, then conv
        truth, wrong, certified, threads = map(int, line.split())
        assert truth == 1 and wrong == 0
        assert threads == 2  # the caller's thread count is back
        assert certified > 0  # the true class is still certified: nothing was given up


def test_a_forward_in_bf16_does_not_change_the_proof():
    """A sanity check of the spy: it does see reduced precision outside certified paths."""
    spy = _ReducedPrecisionSpy()
    net = _net()
    raw = fp32_snapshot()
    try:
        mkldnn.conv.fp32_precision = "bf16"
        with spy:
            net.backbone(torch.rand(2, 1, 8, 8))
    finally:
        mkldnn.conv.fp32_precision = raw[("mkldnn", "conv")]
    assert "conv2d" in spy.reduced
