"""The same math on a CUDA GPU as on the CPU.

Skipped (with the reason shown) where no GPU is present, as in CI; a session lent a GPU runs
them with ``benchmarks/device_checks.sh`` (see docs/performance.md, "GPU checks").
"""

from __future__ import annotations

import copy

import pytest
import torch

import torchgloro as tg
from torchgloro.cli import main

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: run benchmarks/device_checks.sh on a GPU machine",
)


def _pair(arch="2c2f", in_shape=(1, 28, 28)):
    torch.manual_seed(0)
    cpu = tg.GloroNet(tg.create_model(arch, in_shape, 10), 0.3)
    return cpu, copy.deepcopy(cpu).cuda()


def test_training_step_matches_cpu():
    cpu, gpu = _pair()
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    loss_fn = tg.GloroCrossEntropy()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # full fp32 convs
        for net, dev in ((cpu, "cpu"), (gpu, "cuda")):
            net.train()
            loss_fn(net(x.to(dev)), y.to(dev)).backward()
    for b_cpu, b_gpu in zip(cpu.bounds, gpu.bounds):
        if hasattr(b_cpu, "u"):
            assert torch.allclose(b_gpu.u.cpu(), b_cpu.u, rtol=1e-3, atol=1e-5)
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        assert torch.allclose(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5)


def test_sound_certificates_agree_with_cpu():
    cpu, gpu = _pair()
    x = torch.rand(64, 1, 28, 28)
    c_cpu = cpu.certify(x, 0.01, precision="float64")
    c_gpu = gpu.certify(x.cuda(), 0.01, precision="float64")
    assert torch.equal(c_gpu.pred.cpu(), c_cpu.pred)
    assert torch.allclose(c_gpu.radius.cpu(), c_cpu.radius, rtol=1e-9, atol=1e-12)
    Kc, Kg = cpu.lipschitz_constant("sound"), gpu.lipschitz_constant("sound")
    assert torch.allclose(Kg.cpu(), Kc, rtol=1e-9)


def test_float32_first_certifies_the_float64_points_on_cuda_even_with_tf32_on():
    """precision="auto" runs float32 with cuDNN and TF32 off, whatever the user set."""
    cpu, gpu = _pair()
    x = torch.rand(256, 1, 28, 28).cuda()
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        for eps in (0.003, 0.01, 0.03):
            auto = gpu.certify(x, eps)
            f64 = gpu.certify(x, eps, precision="float64")
            assert torch.equal(auto.certified, f64.certified)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # restored
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def test_certified_points_survive_attack_on_cuda():
    """Theorem 1 on the GPU: PGD never changes a certified prediction (sound mode)."""
    torch.manual_seed(0)
    f = tg.create_model("minicnn", (1, 8, 8), 10)
    net = tg.GloroNet(f, 0.3, power_iterations=5).cuda()
    train = tg.data.get_dataset("digits", "train")
    x, y = train.x[:512].cuda(), train.y[:512].cuda()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(200):
        opt.zero_grad()
        tg.GloroCrossEntropy()(net(x), y).backward()
        opt.step()
    net.eval()
    cert = net.certify(x)
    assert cert.certified.float().mean() > 0.2
    xa = x[cert.certified].clone()
    pred = cert.pred[cert.certified]
    delta = torch.zeros_like(xa, requires_grad=True)
    for _ in range(50):  # ℓ2 PGD on the margin, inside the ε-ball
        logits = net.backbone(xa + delta)
        top = logits.gather(1, pred[:, None]).squeeze(1)
        other = logits.scatter(1, pred[:, None], float("-inf")).amax(1)
        (grad,) = torch.autograd.grad((other - top).sum(), delta)
        with torch.no_grad():
            delta += 0.05 * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta *= torch.clamp(0.3 / norm.clamp_min(1e-12), max=1.0)
    with torch.no_grad():
        assert torch.equal(net.backbone(xa + delta).argmax(1), pred)


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_trainer_on_cuda(tmp_path, amp):
    out = tmp_path / "runs"
    args = ["train", "--device", "cuda", "--epochs", "3", "--out", str(out), "--no-progress"]
    assert main([*args, "--set", f"run.amp={amp}"]) == 0
    (run,) = list(out.iterdir())
    assert main(["certify", str(run)]) == 0
    net = tg.load(run)
    assert net.lipschitz_constant("sound").dtype == torch.float64


@pytest.mark.parametrize(
    "arch, in_shape, kwargs",
    [
        ("2c2f", (1, 28, 28), {}),
        ("4c3f", (1, 28, 28), {"activation": "minmax", "lln": True}),
        ("liresnet", (3, 32, 32), {"depth": 2, "width": 16}),
    ],
)
def test_graphed_power_iteration_matches_eager(arch, in_shape, kwargs):
    """Training with the iterations replayed from a CUDA graph = training eagerly."""
    torch.manual_seed(0)
    activation = kwargs.pop("activation", "relu")
    f = tg.create_model(arch, in_shape, 10, activation, **kwargs)
    graphed = tg.GloroNet(f, 0.3, power_iterations=4).cuda()
    eager = copy.deepcopy(graphed)
    eager.cuda_graphs = False
    opts = [torch.optim.Adam(n.parameters(), lr=1e-3) for n in (graphed, eager)]
    x, y = torch.rand(16, *in_shape, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    # Deterministic cuDNN: Adam turns run-to-run noise in tiny gradient entries into lr-sized steps.
    with torch.backends.cudnn.flags(
        enabled=True, benchmark=False, deterministic=True, allow_tf32=False
    ):
        for step in range(6):
            if step == 3:  # a new iteration count: a new capture
                graphed.power_iterations = eager.power_iterations = 2
            for net, opt in zip((graphed, eager), opts):
                net.train()
                opt.zero_grad()
                tg.GloroCrossEntropy()(net(x), y).backward()
                opt.step()
    assert graphed._graphed.disabled_reason is None
    assert {(4, False), (2, False)} <= set(graphed._graphed._graphs)  # one graph per count
    for a, b in zip(graphed.bounds.buffers(), eager.bounds.buffers()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    for p, q in zip(graphed.parameters(), eager.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)


def test_graph_is_recaptured_when_a_parameter_moves():
    torch.manual_seed(0)
    net = tg.GloroNet(tg.create_model("2c2f", (1, 28, 28), 10), 0.3, power_iterations=3).cuda()
    net.train()
    x = torch.rand(8, 1, 28, 28, device="cuda")
    net(x)
    ptrs = net._graphed._ptrs
    w = net.backbone[0].weight
    w.data = w.data.clone() * 2  # a new address: the old graph would read freed memory
    net(x)
    assert net._graphed._ptrs != ptrs and list(net._graphed._graphs) == [(3, False)]
    ref = copy.deepcopy(net)
    ref.cuda_graphs = False
    net(x), ref(x)
    for a, b in zip(net.bounds.buffers(), ref.bounds.buffers()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_step_matches_eager_on_cuda(mode):
    """The whole step compiled by inductor (CUDA graphs with reduce-overhead): ⊥, the bound
    and the power iterations inside the graph give the eager parameters, iterates and sums,
    and no part of the step falls back from CUDA graphs."""
    from torchgloro.train._step import TrainStep
    from torchgloro.train.build import TrainModule

    _, eager = _pair()
    compiled = copy.deepcopy(eager)
    steps = []
    for net, options in ((eager, None), (compiled, {"backend": "inductor", "mode": mode})):
        net.train()
        loss_fn = tg.GloroTrades().cuda()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-7, fused=options is None)
        acc = torch.zeros(4, dtype=torch.float64, device="cuda")
        steps.append((TrainStep(TrainModule(net, False), net, opt, loss_fn, acc, 10, 0.0,
                                options), net, loss_fn))  # fmt: skip
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(1)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for i in range(6):
            x = torch.rand(64, 1, 28, 28, generator=g).cuda()
            y = torch.randint(0, 10, (64,), generator=g).cuda()
            for step, net, loss_fn in steps:
                net.epsilon, loss_fn.lam = 0.1 + 0.05 * i, 0.5 + 0.25 * i
                step.set_lr(1e-3 * (1 + i))
                step(x, y, robust=i > 0)
    torch.cuda.synchronize()
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=6e-5)
    for u, v in zip(eager.bounds.buffers(), compiled.bounds.buffers()):
        torch.testing.assert_close(v, u, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(steps[1][0].acc, steps[0][0].acc, rtol=1e-4, atol=0, equal_nan=True)
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
