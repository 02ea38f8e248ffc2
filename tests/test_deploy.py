"""deploy: a GloroNet frozen into plain PyTorch that torch.export and torch.jit can trace."""

from __future__ import annotations

import pytest
import torch

import torchgloro as tg
from torchgloro._inputs import round_up_to_float32

# torch.jit still traces in torch 2.13, which calls it deprecated: tested while it works.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")


def _net(lipschitz: str = "margin") -> tg.GloroNet:
    f = tg.create_model("minicnn", (1, 8, 8), 10)
    return tg.GloroNet(f, epsilon=0.3, lipschitz=lipschitz).eval()


def _off_diagonal(k: torch.Tensor) -> torch.Tensor:
    return k[~torch.eye(k.shape[0], dtype=torch.bool)] if k.dim() == 2 else k


def test_tracing_a_gloronet_names_deploy():
    net, x = _net(), torch.rand(2, 1, 8, 8)
    with pytest.raises(tg.GloroError, match=r"torchgloro\.deploy"):
        torch.jit.trace(net, x)
    if hasattr(torch.compiler, "is_exporting"):  # torch >= 2.5
        with pytest.raises(tg.GloroError, match=r"torchgloro\.deploy"):
            torch.export.export(net, (x,))
    assert net(x).shape == (2, 11)  # the eager net is unaffected


@pytest.mark.parametrize("lipschitz", ["margin", "basic"])
def test_fast_deploy_matches_the_eval_net_and_traces(lipschitz):
    net, x = _net(lipschitz), torch.rand(5, 1, 8, 8)
    d = tg.deploy(net, mode="fast")
    assert isinstance(d, tg.DeployedGloroNet) and not d.training
    assert torch.equal(d(x), net(x))  # the same K, ε and formula
    assert torch.equal(torch.export.export(d, (x,)).module()(x), d(x))
    assert torch.equal(torch.jit.trace(d, x)(x), d(x))
    assert d.ABSTAIN == net.ABSTAIN == 10


@pytest.mark.parametrize("lipschitz", ["margin", "basic"])
def test_sound_deploy_keeps_the_proven_bound(lipschitz):
    net = _net(lipschitz)
    d = tg.deploy(net)
    proven = net.lipschitz_constant("sound")  # float64
    assert d.class_bounds.dtype == torch.float32
    assert bool((_off_diagonal(d.class_bounds).double() >= _off_diagonal(proven)).all())
    # ... and no looser than one float32 step above it
    one_below = torch.nextafter(d.class_bounds, torch.zeros_like(d.class_bounds)).double()
    assert bool((_off_diagonal(one_below) < _off_diagonal(proven)).all())
    fast = net.lipschitz_constant("fast")
    assert bool((_off_diagonal(d.class_bounds) >= _off_diagonal(fast)).all())


def test_round_up_to_float32():
    exact = torch.tensor([0.5, 3.0], dtype=torch.float64)
    assert torch.equal(round_up_to_float32(exact), exact.float())
    k = torch.tensor([0.1, 1 / 3], dtype=torch.float64)  # not float32 numbers
    up = round_up_to_float32(k)
    assert bool((up.double() > k).all())
    assert bool((torch.nextafter(up, torch.zeros_like(up)).double() < k).all())


def test_sound_deploy_agrees_with_certificates(trained_digits_net):
    net, _, test = trained_digits_net
    x = test.x[:300]
    cert = net.certify(x)
    assert int(cert.certified.sum()) > 30  # enough certified points to compare
    out = tg.deploy(net)(x)  # (B, C+1)
    pred = out.argmax(dim=1)
    # Every certified point is answered with its class; abstentions only where not certified.
    assert torch.equal(pred[cert.certified], cert.pred[cert.certified])
    assert not bool(cert.certified[pred == net.ABSTAIN].any())


def test_deployed_copy_is_independent():
    net = _net().train()
    d = tg.deploy(net, mode="fast")
    assert net.training  # modes restored
    assert not any(p.requires_grad for p in d.parameters())
    x = torch.rand(3, 1, 8, 8)
    before = d(x)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)
    assert torch.equal(d(x), before)
    assert float(tg.deploy(net, epsilon=0.5).epsilon) == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"mode": "exact"}, "mode"), ({"epsilon": 0.0}, "epsilon"), ({"epsilon": -1}, "epsilon")],
)
def test_deploy_bad_arguments(kwargs, match):
    with pytest.raises(tg.GloroInputError, match=match):
        tg.deploy(_net(), **kwargs)


def test_deploy_needs_a_gloronet():
    with pytest.raises(tg.GloroInputError, match=r"GloroNet\(backbone"):
        tg.deploy(tg.create_model("minicnn", (1, 8, 8), 10))


def test_deploy_unwraps_compile_and_data_parallel():
    net, x = _net(), torch.rand(2, 1, 8, 8)
    want = tg.deploy(net, mode="fast")(x)
    for wrapped in (torch.compile(net), torch.nn.DataParallel(net)):
        assert torch.equal(tg.deploy(wrapped, mode="fast")(x), want)


def test_deploy_leaves_a_training_net_unchanged():
    """Found by a review: deploying a stale net refreshed its iterates, which changed the
    rest of a training run that deployed mid-way."""
    net = _net().train()
    with torch.no_grad():
        next(net.parameters()).mul_(1.5)  # the frozen constants are now stale
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tg.deploy(net, mode="fast")
    tg.deploy(net)
    after = net.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]) or bool(v.isnan().all() and after[k].isnan().all()), k
    assert net.training


def test_deploy_keeps_dtypes():
    """Found by a review: casting K to the logits' dtype rounded the bound down under bf16
    autocast, and .half() shrank it and ε; a float64 net's K was cut to float32."""
    net, x = _net(), torch.rand(4, 1, 8, 8)
    d = tg.deploy(net)
    k, eps = d.class_bounds.clone(), d.epsilon.clone()
    d.half()
    assert torch.equal(d.class_bounds, k) and torch.equal(d.epsilon, eps)
    d.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d(x)
    assert out.dtype == torch.float32  # ⊥ in float32, K not rounded to bfloat16
    net64 = _net().double()
    x64 = x.double()
    assert torch.equal(tg.deploy(net64, mode="fast")(x64), net64(x64))
    assert tg.deploy(net64).class_bounds.dtype == torch.float64


def test_sound_deploy_rounds_epsilon_up():
    net = _net()
    for value in (0.7, 0.1, 1 / 3):  # none is a float32 number
        assert float(tg.deploy(net, epsilon=value).epsilon) >= value
    net.epsilon = 0.7  # fast mode keeps the eval-mode net's ε (itself rounded up)
    assert float(tg.deploy(net, mode="fast").epsilon) == net.epsilon > 0.7
