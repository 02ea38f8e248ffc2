"""The weights generation counter that keys GloroNet's caches (frozen K, proven bounds)."""

import torch

from torchgloro.bounds.generation import WeightsGeneration
from torchgloro.bounds.registry import bound_for
from torchgloro.bounds.weight_cache import build_sound_state


def test_generation_moves_only_when_values_change():
    w = torch.randn(3, 4)
    gen = WeightsGeneration()
    g0 = gen.update([w])
    assert gen.update([w]) == g0  # unchanged values: same generation
    with torch.no_grad():
        w.data[0, 0] += 1e-6  # through .data: no _version bump
    g1 = gen.update([w])
    assert g1 == g0 + 1
    assert gen.update([w.clone()]) == g1  # equal values in a new tensor: same generation


def test_shape_or_count_change_moves_generation():
    gen = WeightsGeneration()
    g0 = gen.update([torch.zeros(2)])
    assert gen.update([torch.zeros(3)]) == g0 + 1
    assert gen.update([torch.zeros(3), torch.zeros(1)]) == g0 + 2


def test_nan_weights_never_reuse_a_cache():
    w = torch.tensor([float("nan"), 1.0])
    gen = WeightsGeneration()
    g0 = gen.update([w])
    assert gen.update([w]) == g0 + 1


def test_sound_state_bounds_the_exact_norms():
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)
    backbone = torch.nn.Sequential(lin1, torch.nn.ReLU(), lin2)
    bounds = [bound_for(lin1, (6,)), bound_for(torch.nn.ReLU(), (5,))]
    st = build_sound_state(7, backbone, bounds, lin2.weight, lin2.bias)
    exact = torch.linalg.matrix_norm(lin1.weight.double(), ord=2).item()
    assert st.fingerprint == 7
    assert exact <= st.k_pen <= exact * (1 + 1e-6)
    assert st.err_coef > 0 and st.err_const > 0  # float64 round-off is accounted for
    assert next(st.backbone64.parameters()).dtype == torch.float64
    assert not any(p.requires_grad for p in st.backbone64.parameters())


def test_head_roundoff_known_answer():
    """The head's float32 round-off terms: γ_n with n = d + 1, max row norm, max |b|, and
    row distances, each a proven upper bound within a hair of the exact value."""
    lin1 = torch.nn.Linear(2, 2)
    head = torch.nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0], [-3.0, 0.0]]))
        head.bias.copy_(torch.tensor([0.5, -2.0, 1.0]))
    backbone = torch.nn.Sequential(lin1, torch.nn.ReLU(), head)
    bounds = [bound_for(lin1, (2,)), bound_for(torch.nn.ReLU(), (2,))]
    hd = build_sound_state(1, backbone, bounds, head.weight, head.bias).head32
    u = 2.0**-24
    assert 3 * u / (1 - 3 * u) * 1.001 <= hd.gamma <= 3 * u * 1.0011  # n = 2 products + bias
    assert 5.0 <= hd.row_norm <= 5.0 * (1 + 1e-12)  # ‖(3, 4)‖
    assert hd.bias == 2.0
    exact = torch.tensor([[0.0, 18**0.5, 52**0.5], [18**0.5, 0.0, 10**0.5],
                          [52**0.5, 10**0.5, 0.0]], dtype=torch.float64)  # fmt: skip
    assert bool((hd.pair >= exact).all()) and bool((hd.pair <= exact * (1 + 1e-12) + 1e-149).all())
    assert hd.underflow > 0
