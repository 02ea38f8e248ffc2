"""Round-off models of the smooth activations in float32 and float64, and Softplus's exact
maximum slope and jump at its threshold."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchgloro._certify import strict_fp32
from torchgloro.bounds.capture import make_bound
from torchgloro.bounds.elementwise import softplus_jump
from torchgloro.bounds.registry import backend_off
from torchgloro.margins import UNIT_ROUNDOFF_F32, UNIT_ROUNDOFF_F64, gamma

SMOOTH = [
    nn.Tanh(), nn.Sigmoid(), nn.GELU(), nn.SiLU(), nn.ELU(), nn.ELU(alpha=2.5),
]  # fmt: skip


def _grid() -> torch.Tensor:
    """Float32 inputs: dense on [-40, 40], log-spaced out to ±1e30, and normal samples."""
    wide = torch.logspace(-30, 30, 60_001, dtype=torch.float64)
    dense = torch.linspace(-40, 40, 800_001, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    return torch.cat([dense, wide, -wide, torch.randn(200_000, generator=gen) * 5]).float()


@pytest.mark.parametrize("layer", SMOOTH, ids=repr)
def test_float32_round_off_model_covers_torch(layer):
    """The model's per-entry error γ₁₆·c·(|z| + 1), with float32's u, covers torch's float32
    values (float64's, off by at most the same model at float64's u, as the reference)."""
    bound = make_bound(layer, (1,))
    assert bound.fp_terms_precision_free
    n, c, _ = bound.fp_terms()
    z = _grid()
    with torch.no_grad(), strict_fp32():  # the kernels sound certification runs
        err = (layer(z).double() - layer(z.double())).abs()
    scale = c * (z.double().abs() + 1)
    allowed = (gamma(n, UNIT_ROUNDOFF_F32) - gamma(n, UNIT_ROUNDOFF_F64)) * scale
    assert bool((err <= allowed).all())
    assert float((err / scale).max()) > UNIT_ROUNDOFF_F32 / 8  # the test sees float32 error


def test_softplus_bound_is_the_exact_max_slope_through_the_threshold():
    """Slope σ(βz) < 1 below the threshold, exactly 1 above it: sup = 1 = the bound. On a
    dense float64 grid across the switch (finite differences between grid points, inside
    each smooth piece) the largest slope approaches 1 and never exceeds it."""
    for beta, t in [(1.0, 20.0), (3.0, 2.0), (0.5, 1.0)]:
        layer = nn.Softplus(beta=beta, threshold=t)
        assert make_bound(layer, (4,)).sound() == 1.0
        z = torch.linspace(-30 / beta, 3 * t / beta, 2_000_001, dtype=torch.float64)
        y = layer(z)
        same = (beta * z[1:] > t) == (beta * z[:-1] > t)  # both points in one piece
        slope = ((y[1:] - y[:-1]) / (z[1:] - z[:-1]))[same]
        assert float(slope.max()) <= 1.0 + 1e-9
        assert float(slope.max()) >= 1.0 - 1e-6


@pytest.mark.parametrize("beta, t", [(1.0, 20.0), (3.0, 2.0), (0.5, 0.0), (2.0, -3.0)])
def test_softplus_jump_is_the_exact_gap_at_the_threshold(beta, t):
    """PyTorch's Softplus is the smooth softplus up to βz = t and z above: it drops by
    log1p(e^{−t})/β there (a discontinuity: no Lipschitz bound exists). softplus_jump bounds
    the gap to the smooth function on the whole identity region and is that drop."""
    jump = softplus_jump(beta, t)
    z = t / beta + torch.logspace(-12, 1.7, 100_001, dtype=torch.float64)
    assert torch.equal(F.softplus(z, beta, t), z)  # the identity region
    gap = torch.log1p(torch.exp(-beta * z)) / beta  # = log1p(e^{βz})/β − z, no cancellation
    assert bool((gap <= jump).all()) and float(gap[0]) >= jump * (1 - 1e-8)
    below = torch.tensor(t / beta, dtype=torch.float64)  # βz = t: still the smooth branch
    drop = F.softplus(below, beta, t) - F.softplus(z[0], beta, t)
    assert float(drop) == pytest.approx(jump, rel=1e-5)
    bound = make_bound(nn.Softplus(beta=beta, threshold=t), (4,))
    assert not bound.fp_terms_precision_free  # the jump is absolute: float64 only


def test_softplus_threshold_past_exp_overflow_is_refused():
    """Below its threshold Softplus computes e^{βz}, which overflows float64 past 709.78 (and
    float32 past 88.7): an inf that a later layer may clip to a finite, wrong value."""
    with pytest.raises(TypeError, match="threshold"):
        make_bound(nn.Softplus(threshold=math.inf), (4,))
    with pytest.raises(TypeError, match="threshold"):
        make_bound(nn.Softplus(beta=2.0, threshold=800.0), (4,))


def test_sound_float32_passes_run_gelu_on_pytorchs_own_kernel():
    """On x86 CPUs PyTorch sends a contiguous float32 GELU to oneDNN, a minimax polynomial
    whose error is documented nowhere (up to 4.3 of the 16 units measured, against 1.7 for
    PyTorch's own A&S erf kernel). strict_fp32 runs every GELU call (nn.GELU, F.gelu) on
    PyTorch's own kernel, whose error docs/soundness.md §14b derives."""
    z = torch.linspace(-8, 8, 100_001)
    with torch.no_grad():
        with backend_off(torch.backends.mkldnn):
            own = F.gelu(z)
        with strict_fp32():
            assert torch.equal(F.gelu(z), own) and torch.equal(nn.GELU()(z), own)
        assert torch.backends.mkldnn.enabled  # restored


@pytest.mark.slow
def test_own_gelu_kernel_on_every_float32_in_its_worst_binade():
    """Every float32 in ±[2, 4) (16.8M inputs), where PyTorch's own GELU kernel errs most: at
    most 1.73 of the model's 16 units (docs/soundness.md §14b: the whole float32 range)."""
    bound = make_bound(nn.GELU(), (1,))
    n, c, _ = bound.fp_terms()
    lo = int(torch.tensor(2.0).view(torch.int32))
    bits = torch.arange(lo, lo + 2**23, dtype=torch.int32)
    z = torch.cat([bits.view(torch.float32), -bits.view(torch.float32)])
    with torch.no_grad(), strict_fp32():
        err = (F.gelu(z).double() - F.gelu(z.double())).abs()
    units = err / (UNIT_ROUNDOFF_F32 * c * (z.double().abs() + 1))
    assert 1.0 < float(units.max()) < 1.8
    assert float(units.max()) * UNIT_ROUNDOFF_F32 < gamma(n, UNIT_ROUNDOFF_F32) - gamma(
        n, UNIT_ROUNDOFF_F64
    )
