"""The training step compiled as one graph (``run.compile``) against the eager step."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import torchgloro as tg
from torchgloro.losses import GloroCrossEntropy, GloroEMMA, GloroHinge, GloroTrades
from torchgloro.train import train
from torchgloro.train._step import TrainStep
from torchgloro.train.build import TrainModule
from torchgloro.train.checkpoint import read_checkpoint
from torchgloro.train.cli import resume_config

LOSSES = {
    "ce": lambda net: GloroCrossEntropy(),
    "trades": lambda net: GloroTrades(),
    "emma": lambda net: GloroEMMA(net),
    "certified-hinge": lambda net: GloroHinge(certified=True, net=net),
}


def _stepper(net, loss_name, compile_options, grad_clip=0.5):
    loss_fn = LOSSES[loss_name](net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-7)
    acc = torch.zeros(4, dtype=torch.float64)
    module = TrainModule(net, amp=False)
    return TrainStep(module, net, opt, loss_fn, acc, 10, grad_clip, compile_options), loss_fn


def _pair(arch="2c2f", power_iterations=3):
    torch.manual_seed(0)
    net = tg.GloroNet(
        tg.create_model(arch, (1, 28, 28), 10), 0.3, power_iterations=power_iterations
    )
    net.train()
    return net, copy.deepcopy(net)


def _run_steps(steps, nets, n, batch=16):
    """``n`` steps on each stepper, the first standard, with ε, λ and lr changing every step."""
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        x, y = (
            torch.rand(batch, 1, 28, 28, generator=g),
            torch.randint(0, 10, (batch,), generator=g),
        )
        for (step, loss_fn), net in zip(steps, nets):
            net.epsilon = 0.1 + 0.05 * i
            step.set_lr(1e-3 * (1 + i))
            if hasattr(loss_fn, "lam"):
                loss_fn.lam = 0.5 + 0.25 * i
            step(x, y, robust=i > 0)


def _assert_same_training(eager, compiled, eager_step, compiled_step, lr=4e-3):
    # Adam moves every weight by about lr per step: compare against that scale. (Compiled,
    # torch computes Adam's bias corrections in float32: step sizes differ by ~1e-5 relative.)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=lr * 1e-2, msg=name)
    for (name, u), v in zip(eager.bounds.named_buffers(), compiled.bounds.buffers()):
        torch.testing.assert_close(v, u, rtol=1e-3, atol=1e-5, msg=name)  # the iterates
    torch.testing.assert_close(compiled_step.acc, eager_step.acc, rtol=1e-5, atol=0, equal_nan=True)
    state_e, state_c = eager_step.optimizer.state_dict(), compiled_step.optimizer.state_dict()
    assert [s["step"].item() for s in state_c["state"].values()] == [
        s["step"].item() for s in state_e["state"].values()
    ]


@pytest.mark.parametrize("loss_name", ["trades", "certified-hinge"])
def test_compiled_steps_match_eager_steps(loss_name):
    """N compiled steps (aot_eager: no C++ build) give the eager parameters, iterates, loss
    sums and optimizer state, across a standard and robust step, with ε, λ and lr changing
    every step and gradient clipping on; and compile once per phase, never per value."""
    eager, compiled = _pair()
    e_step, c_step = (
        _stepper(eager, loss_name, None),
        _stepper(compiled, loss_name, {"backend": "aot_eager"}),
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _run_steps([e_step, c_step], [eager, compiled], 4)
    _assert_same_training(eager, compiled, e_step[0], c_step[0])
    assert c_step[0].acc[3].item() == 4 * 16
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # standard, robust


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_the_compiled_step_is_one_graph(loss_name):
    """No graph break anywhere in the step: forward, ⊥, bound, power iterations, loss,
    gradients, clipping, optimizer update and metrics are one graph."""
    net, _ = _pair("4c3f")
    step, _ = _stepper(net, loss_name, {"backend": "aot_eager"})
    step._prepare()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explained = torch._dynamo.explain(step._graph)(x, y, True)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_a_last_partial_batch_gets_its_own_static_graph():
    """Shapes stay static: a smaller last batch compiles a second graph, and still matches."""
    eager, compiled = _pair()
    e_step, c_step = _stepper(eager, "ce", None), _stepper(compiled, "ce", {"backend": "aot_eager"})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(2)
    for batch in (16, 16, 5):
        x, y = (
            torch.rand(batch, 1, 28, 28, generator=g),
            torch.randint(0, 10, (batch,), generator=g),
        )
        for step in (e_step[0], c_step[0]):
            step(x, y, robust=True)
    _assert_same_training(eager, compiled, e_step[0], c_step[0], lr=1e-3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


@pytest.mark.slow
def test_compiled_steps_match_eager_with_inductor():
    """The same with the inductor backend (C++ code generated and compiled, niced: minutes)."""
    eager, compiled = _pair(power_iterations=2)
    e_step, c_step = (
        _stepper(eager, "trades", None),
        _stepper(compiled, "trades", {"backend": "inductor"}),
    )
    torch._dynamo.reset()
    _run_steps([e_step, c_step], [eager, compiled], 3)
    _assert_same_training(eager, compiled, e_step[0], c_step[0], lr=3e-3)


@pytest.mark.slow
def test_a_compiled_run_resumes_from_its_checkpoint(tiny):
    """A compiled run stopped mid-epoch and resumed (compiled) ends where an uninterrupted
    compiled run does; its checkpoints hold the learning rate as a float."""
    compiled = ("run.compile=true", "run.compile_backend=aot_eager", "run.epochs=2")
    straight = train(tiny(*compiled), progress=False)
    first = train(tiny(*compiled), stop_after=1.5, progress=False)
    ck = read_checkpoint(first.run_dir)
    assert (ck.epoch, ck.step) == (1, 2)
    assert all(isinstance(g["lr"], float) for g in ck.info["optim"]["param_groups"])
    second = train(resume_config(first.run_dir, []), resume=first.run_dir, progress=False)
    assert second.interrupted is None
    a = load_file(str(straight.run_dir / "checkpoint.safetensors"))
    b = load_file(str(second.run_dir / "checkpoint.safetensors"))
    for k in a:
        if k.startswith(("model.", "optim.")):
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)


def test_on_a_cpu_the_iterations_run_before_the_graph(monkeypatch):
    """CPU: the step's power iterations run eagerly (native kernels for small convolutions),
    the graph iterates 0 times, and the net's setting is restored after the step."""
    net, _ = _pair()
    step, _ = _stepper(net, "ce", {"backend": "aot_eager"})
    seen = []
    real = net._advance
    monkeypatch.setattr(net, "_advance", lambda n: (seen.append(n), real(n)))
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    torch._dynamo.reset()
    step(x, y, robust=True)
    assert seen == [3, 0] and net.power_iterations == 3


def test_a_tensor_learning_rate_is_checkpointed_as_a_float():
    """The compiled step keeps lr as a 0-dim tensor; the checkpoint's JSON gets its float."""
    import json

    from torchgloro.train.checkpoint import optimizer_tensors

    net, _ = _pair()
    step, _ = _stepper(net, "ce", {"backend": "aot_eager"})
    step._prepare()
    step.set_lr(0.25)
    assert isinstance(step.optimizer.param_groups[0]["lr"], torch.Tensor)
    _, info = optimizer_tensors(step.optimizer)
    assert json.loads(json.dumps(info))["param_groups"][0]["lr"] == 0.25
