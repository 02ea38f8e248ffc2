"""The weights generation counter that keys GloroNet's caches (frozen K, proven bounds)."""

import torch

from torchgloro._weight_cache import WeightsGeneration, build_sound_state
from torchgloro.lipschitz import bound_for


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
