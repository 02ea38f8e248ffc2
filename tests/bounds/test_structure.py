"""A GloroNet certifies only the network its bounds were built for (torchgloro.bounds.structure).

Each case below certified points of another network before the check: the bounds (and
the proven caches) described the backbone as it was when the GloroNet was built.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import torchgloro as tg
from torchgloro._errors import GloroInputError, UnsupportedLayerError


def _mlp() -> tg.GloroNet:
    torch.manual_seed(0)
    bb = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    return tg.GloroNet(bb, epsilon=0.1, in_shape=(2,)).eval()


def _every_proof_refuses(
    net: tg.GloroNet, error: type[Exception], match: str, fast_too: bool = True
) -> None:
    x = torch.randn(8, *net.in_shape)
    calls = [
        lambda: net.certify(x),
        lambda: net.certify(x, precision="float64"),
        lambda: net.certify(x, fallback="local"),
        lambda: net.lipschitz_constant("sound"),
        lambda: net.predict(x),
    ]
    if fast_too:  # the estimates' caches go stale the same way
        calls += [lambda: net.certify(x, mode="fast"), lambda: net(x)]
    for call in calls:
        with pytest.raises(error, match=match):
            call()


def test_a_replaced_layer_is_refused():
    net = _mlp()
    net.certify(torch.randn(4, 2))  # caches built for the original layers
    bigger = nn.Linear(2, 16)
    with torch.no_grad():
        bigger.weight.copy_(net.backbone[0].weight * 100)
    net.backbone[0] = bigger  # the old bound still points at the old layer (K 100x too small)
    _every_proof_refuses(net, GloroInputError, "modules changed")


def test_a_swapped_parameterless_layer_is_refused():
    net = _mlp()
    net.backbone[1] = nn.GELU()  # Lipschitz 1.13 > the ReLU's 1 the bounds assume
    _every_proof_refuses(net, GloroInputError, "modules changed")


def test_a_changed_setting_is_refused():
    torch.manual_seed(0)
    block = tg.LiResBlock(2, 3, residual_scale=0.0, bias=False)
    bb = nn.Sequential(block, nn.Flatten(), nn.Linear(2 * 5 * 5, 3))
    net = tg.GloroNet(bb, epsilon=0.1, in_shape=(2, 5, 5)).eval()
    k_before = float(net.lipschitz_constant("sound").max())
    block.residual_scale = 50.0  # the folded kernel changes; no parameter value does
    _every_proof_refuses(net, GloroInputError, r"LiResBlock .*\(residual_scale\)")
    fresh = tg.GloroNet(bb, epsilon=0.1, in_shape=(2, 5, 5)).eval()
    assert float(fresh.lipschitz_constant("sound").max()) > 10 * k_before  # it did matter


def test_a_conv_padding_mode_changed_in_place_is_refused():
    torch.manual_seed(0)
    bb = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    net = tg.GloroNet(bb, epsilon=0.1, in_shape=(1, 4, 4)).eval()
    bb[0].padding_mode = "circular"  # the same shapes, another operator
    _every_proof_refuses(net, GloroInputError, r"Conv2d .*\(padding_mode\)")


def test_a_parametrized_layer_is_refused():
    net = _mlp()

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(net.backbone[2], "weight", Double())
    _every_proof_refuses(net, GloroInputError, "changed after this GloroNet was built")


def test_forward_hooks_are_refused_by_proofs_only():
    """Hooks can change outputs behind the bounds' back: no certificate through them. The
    estimates (fast mode, the eval forward) allow them, as inspection tools use hooks."""
    torch.manual_seed(0)
    bb = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3))
    handle = bb[0].register_forward_hook(lambda m, i, out: 10 * out)
    net = tg.GloroNet(bb, epsilon=0.1, in_shape=(2,)).eval()
    _every_proof_refuses(net, UnsupportedLayerError, "forward hooks", fast_too=False)
    handle.remove()
    x = torch.randn(4, 2)
    net.certify(x)
    handle = bb[2].register_forward_pre_hook(lambda m, args: (3 * args[0],))
    _every_proof_refuses(net, UnsupportedLayerError, "forward hooks", fast_too=False)
    assert net(x).shape == (4, 4) and net.certify(x, mode="fast").pred.shape == (4,)
    handle.remove()
    assert net.certify(x).pred.shape == (4,)  # the same net, hooks gone: certifies again


def test_spectral_norm_hook_is_refused():
    """The old hook-based spectral_norm recomputes the weight in every forward (in float64
    on the certification copy), which the bound taken from the float32 weight missed."""
    net = _mlp()
    nn.utils.spectral_norm(net.backbone[0])  # a hook, and weight_orig in weight's place
    _every_proof_refuses(
        net, (UnsupportedLayerError, GloroInputError), r"tensor weight removed, tensor weight_orig"
    )


def test_global_forward_hooks_are_refused():
    net = _mlp()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, out: out)
    try:
        _every_proof_refuses(net, UnsupportedLayerError, "Global forward hooks", fast_too=False)
    finally:
        handle.remove()
    assert net.certify(torch.randn(2, 2)).pred.shape == (2,)


def test_a_changed_buffer_refreshes_the_proven_bounds():
    """LLNLinear's fixed scale is a buffer: loading a state that differs only there must
    rebuild the proven K (it stayed 100x too small: parameters alone were compared)."""
    torch.manual_seed(0)
    bb = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), tg.LLNLinear(16, 3, scale=1.0))
    net = tg.GloroNet(bb, epsilon=0.1, in_shape=(2,)).eval()
    x = torch.randn(256, 2) * 3
    k_before = net.lipschitz_constant("sound")
    state = copy.deepcopy(net.state_dict())
    state["backbone.2.scale"] = torch.tensor(100.0)
    net.load_state_dict(state)
    fresh = tg.GloroNet(copy.deepcopy(bb), epsilon=0.1, in_shape=(2,)).eval()
    K = net.lipschitz_constant("sound")
    assert torch.allclose(K, 100 * k_before, rtol=1e-6)
    assert torch.equal(K, fresh.lipschitz_constant("sound"))
    assert torch.equal(net.certify(x).certified, fresh.certify(x).certified)
    assert torch.allclose(
        net.lipschitz_constant("fast"), fresh.lipschitz_constant("fast"), rtol=1e-4
    )


@pytest.mark.parametrize("layer", ["lln", "liresblock"])
def test_derived_weights_in_bfloat16_are_refused(layer):
    """The net rounds LLN rows / folded kernels to bfloat16; the float64 proof did not."""
    torch.manual_seed(0)
    if layer == "lln":
        bb = nn.Sequential(nn.Linear(2, 2), tg.LLNLinear(2, 2, bias=False))
        shape = (2,)
    else:
        bb = nn.Sequential(tg.LiResBlock(2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
        shape = (2, 4, 4)
    net = tg.GloroNet(bb.to(torch.bfloat16), epsilon=1.0, in_shape=shape).eval()
    x = torch.rand(2, *shape, dtype=torch.bfloat16)
    with pytest.raises(UnsupportedLayerError, match="net.float()"):
        net.certify(x)
    assert net.float().certify(x.float()).pred.shape == (2,)  # the advice works


def test_plain_bfloat16_backbone_still_certifies():
    net = _mlp().to(torch.bfloat16)
    x = torch.randn(16, 2).to(torch.bfloat16)
    cert = net.certify(x)
    ref = copy.deepcopy(net).double().certify(x.double())
    assert torch.equal(cert.certified, ref.certified)


def test_copies_keep_a_consistent_structure():
    net = _mlp()
    copied = copy.deepcopy(net)
    x = torch.randn(32, 2)
    assert torch.equal(copied.certify(x).radius, net.certify(x).radius)
    copied.backbone[1] = nn.ReLU()  # the copy's own layers, checked against the copy's
    with pytest.raises(GloroInputError, match="modules changed"):
        copied.certify(x)
    assert net.certify(x).pred.shape == (32,)  # the original is untouched


def test_a_list_setting_changed_in_place_is_refused():
    """MaxPool2d keeps kernel_size/stride as given: a list can change in place (a review
    certified a point that flipped at distance 0.03 after [2, 2] became [3, 3])."""
    torch.manual_seed(0)
    pool = nn.MaxPool2d([2, 2], [2, 2])
    bb = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), pool, nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
    net = tg.GloroNet(bb, epsilon=0.03, in_shape=(1, 6, 6)).eval()
    net.certify(torch.rand(2, 1, 6, 6))
    pool.kernel_size[0] = 3
    _every_proof_refuses(net, GloroInputError, r"MaxPool2d .*\(kernel_size\)", fast_too=False)


def test_an_instance_forward_override_is_refused():
    net = _mlp()
    layer = net.backbone[2]
    layer.forward = lambda t: 10 * nn.functional.linear(t, layer.weight, layer.bias)
    _every_proof_refuses(net, GloroInputError, r"Linear .*\(forward\)")
    torch.manual_seed(0)
    bb = nn.Sequential(nn.Linear(2, 3))
    bb[0].forward = lambda t: 10 * t.sum(1, keepdim=True).expand(-1, 3)
    with pytest.raises(UnsupportedLayerError, match="own forward attribute"):
        tg.GloroNet(bb, epsilon=0.1, in_shape=(2,))


def test_a_plain_tensor_weight_changed_in_place_refreshes_the_bounds():
    net = _mlp()
    layer = net.backbone[0]
    w = layer.weight.detach().clone()
    del layer.weight
    layer.weight = w  # a plain tensor attribute, not a parameter
    net2 = tg.GloroNet(net.backbone, epsilon=0.1, in_shape=(2,)).eval()
    k = net2.lipschitz_constant("sound").clone()
    with torch.no_grad():
        w.mul_(100)
    assert torch.allclose(net2.lipschitz_constant("sound"), 100 * k, rtol=1e-6)


def test_a_compiled_backbone_wrapper_is_the_same_structure():
    net = _mlp()
    x = torch.randn(4, 2)
    ref = net.certify(x, mode="fast")
    net.backbone = torch.compile(net.backbone, backend="eager")
    assert torch.equal(net.certify(x, mode="fast").radius, ref.radius)


def test_nets_pickled_before_the_structure_check_still_load():
    import pickle

    net = _mlp()
    x = torch.randn(4, 2)
    ref = net.certify(x)
    del net.__dict__["_structure"]  # as a net of the previous version
    again = pickle.loads(pickle.dumps(net))
    assert torch.equal(again.certify(x).radius, ref.radius)


@pytest.mark.parametrize("how", ["parameter", "data"])
def test_a_weight_whose_shape_changed_is_refused(how):
    """Found by a review: a 3x3 kernel swapped for a 5x5 one under padding="same" kept the
    bound's old padding (K 3x too small) because only values, not shapes, were compared."""
    conv, head = nn.Conv2d(1, 1, 3, padding="same", bias=False), nn.Linear(9, 2, bias=False)
    net = tg.GloroNet(nn.Sequential(conv, nn.Flatten(), head), epsilon=0.5, in_shape=(1, 3, 3))
    net.eval().certify(torch.rand(1, 1, 3, 3))
    if how == "parameter":
        conv.weight = nn.Parameter(torch.ones(1, 1, 5, 5))
    else:
        conv.weight.data = torch.ones(1, 1, 5, 5)
    _every_proof_refuses(
        net, GloroInputError, r"the shape of weight: \(1, 1, 3, 3\) -> \(1, 1, 5, 5\)"
    )


def test_layers_that_change_the_batch_dimension_are_refused():
    """Found by a review: a ZeroPad2d over a (B, D) tensor pads the batch: certify returned
    a certificate for a padding row as the first input's."""
    bb = nn.Sequential(nn.ZeroPad2d((0, 0, 1, 0)), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedLayerError, match="ZeroPad2d turns a batch of 2 inputs into"):
        tg.GloroNet(bb, epsilon=0.5, in_shape=(4,))


@pytest.mark.parametrize("where", ["inside", "head"])
def test_a_linear_layer_applied_per_position_is_refused(where):
    """Found by a review: nn.Linear on (B, P, d) adds its bias at P positions but the
    round-off model counted it once; the float32 allowance was too small and the wrong
    class was certified."""
    if where == "inside":
        bb = nn.Sequential(nn.Unflatten(1, (8, 1)), nn.Linear(1, 1), nn.Flatten(), nn.Linear(8, 2))
        match = r"Linear applied to an input of shape \(8, 1\)"
    else:
        bb = nn.Sequential(nn.Unflatten(1, (4, 2)), nn.Linear(2, 2))
        match = r"last nn.Linear gets inputs of shape \(4, 2\)"
    with pytest.raises(UnsupportedLayerError, match=match):
        tg.GloroNet(bb, epsilon=0.5, in_shape=(8,))


@pytest.mark.parametrize("name,value", [("lipschitz", "margin"), ("in_shape", (1, 2, 2))])
def test_settings_the_bounds_were_built_for_are_read_only(name, value):
    """Found by a review: switching net.lipschitz from "basic" to "margin" reused the cached
    per-class K as pair bounds (radius 1.0 where the truth is 0.5), and a new in_shape of the
    same size passed the input check with bounds proven for the old shape."""
    net = tg.GloroNet(
        nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Flatten(), nn.Linear(4, 2)),
        epsilon=0.5, in_shape=(1, 1, 4), lipschitz="basic",
    )  # fmt: skip
    before = getattr(net, name)
    with pytest.raises(AttributeError, match=f"GloroNet.{name} is fixed at construction"):
        setattr(net, name, value)
    assert getattr(net, name) == before
    assert copy.deepcopy(net).lipschitz == "basic" and copy.deepcopy(net).in_shape == (1, 1, 4)


def test_a_float64_head_with_tiny_rows_is_not_certified_far_away():
    head = nn.Linear(2, 2).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1e-200, 1e-200], [0.0, 0.0]], dtype=torch.float64))
        head.bias.copy_(torch.tensor([1e-250, 0.0], dtype=torch.float64))
    x = torch.zeros(1, 2, dtype=torch.float64)
    for variant in ("margin", "basic"):
        net = tg.GloroNet(nn.Sequential(head), epsilon=1.0, in_shape=(2,), lipschitz=variant)
        # exact radius: 1e-250 / (sqrt(2)·1e-200) = 7e-51; x - 1e-50·(1, 1) flips the class
        assert float(net.certify(x).radius[0]) < 1e-50
