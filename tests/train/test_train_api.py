"""``tg.train(model, data, ...)``: the loop of ``gloro train`` on a user's model and tensors."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import torchgloro as tg
from torchgloro import ConfigError, GloroInputError
from torchgloro.train import load_config
from torchgloro.train.loop import train as train_config


def _digits():
    return tg.data.get_dataset("digits", "train"), tg.data.get_dataset("digits", "test")


def _mlp(in_features: int = 64, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU(), nn.Linear(32, classes)
    )


def test_tg_train_and_evaluate_are_callable_and_the_subpackages_stay():
    assert "train" in tg.__all__ and "evaluate" in tg.__all__
    assert callable(tg.train) and callable(tg.evaluate)
    assert tg.train.load_config is load_config  # still the subpackage
    assert inspect.ismodule(tg.evaluate) and tg.evaluate.EvalOptions().attack == "pgd"


def test_a_recipe_on_in_memory_data_runs_the_same_loop_as_gloro_train(tiny):
    """The same config and data through tg.train and through the config's own loop: the
    same numbers, epoch by epoch (one loop, not two)."""
    cfg = tiny("data.val_size=100", "data.train_subset=0", "run.epochs=2")
    reference = train_config(cfg, progress=False)
    train, test = _digits()
    torch.manual_seed(cfg.run.seed)  # as the loop seeds before building the config's model
    f = tg.models.create_model("minicnn", (1, 8, 8), 10)
    net, result = tg.train(
        f, (train.x, train.y), epsilon=0.3, val=100, test=test, config=cfg, progress=False
    )
    assert isinstance(net, tg.GloroNet) and net.backbone is f
    assert len(result.history) == 2 and result.run_dir is None
    for mine, theirs in zip(result.history, reference.history):
        for key in ("train_loss", "train_vra", "val_vra", "val_clean_acc", "lipschitz"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key
    assert result.final["vra_sound"] == pytest.approx(reference.final["vra_sound"])
    assert result.final["n_test"] == len(test)


def test_tabular_tensors_without_held_out_data_train_and_certify(tmp_path, capsys):
    torch.manual_seed(0)
    x = torch.randn(512, 4)
    y = (x[:, 0] > 0).long()
    f = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
    net, result = tg.train(
        f, torch.utils.data.TensorDataset(x, y), epsilon=0.05, epochs=6, lr=1e-2,
        batch_size=64, out=tmp_path, progress=False,
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "512 train / no validation / no test" in out and "no held-out data" in out
    assert "No test split" in out and result.final.get("n_test") is None
    assert result.history[-1]["train_clean_acc"] > 0.9  # it learned
    assert result.run_dir.parent == tmp_path and (result.run_dir / "metrics.csv").is_file()
    assert not (result.run_dir / "best.safetensors").exists()  # nothing to select on
    assert tg.evaluate(net, (x, y), progress=False).vra > 0.5


def test_a_gloro_net_keeps_its_settings_and_the_run_folder_is_kept_when_asked(tmp_path):
    train, test = _digits()
    net = tg.GloroNet(_mlp(), epsilon=1.0, power_iterations=3)
    same, result = tg.train(
        net, train, epsilon=0.3, epochs=2, val=200, batch_size=128, out=tmp_path,
        settings={"run.threads": 1, "loss.name": "trades"}, progress=False,
    )  # fmt: skip
    assert same is net and net.epsilon == pytest.approx(0.3) and not net.training
    assert result.run_dir.name.startswith("Sequential-")
    config = (result.run_dir / "config.toml").read_text()
    assert 'arch = "Sequential"' in config and "power_iterations = 3" in config
    assert 'name = "trades"' in config and "val_size = 200" in config
    loaded = tg.load(result.run_dir / "best.safetensors", backbone=_mlp())
    assert loaded.loaded_weights.text.startswith("best")


def test_bad_data_and_settings_are_refused_clearly():
    train, _ = _digits()
    data = (train.x, train.y)
    cases = [
        (dict(data=(train.x.mul(255).byte(), train.y)), GloroInputError, "floating point"),
        (dict(data=(train.x, train.y + 5)), GloroInputError, "labels|classes"),
        (dict(data=(train.x[:, :, :4], train.y)), GloroInputError, "shape"),
        (dict(data=[1, 2, 3]), GloroInputError, "tg.train's data takes a Split"),
        (dict(settings={"data.train_subset": 10}), ConfigError, "val=N"),
        (dict(settings={"optim.lr": 1e-3}, lr=1e-2), ConfigError, "given twice"),
        (dict(settings={"optim.lrr": 1e-3}), ConfigError, "did you mean 'optim.lr'"),
        (dict(val=-1), GloroInputError, "val = -1"),
    ]
    for kwargs, error, match in cases:
        kwargs = {"data": data, **kwargs}
        with pytest.raises(error, match=match):
            tg.train(_mlp(), epsilon=0.3, epochs=1, progress=False, **kwargs)


def test_a_stopped_api_run_returns_the_net_without_a_resume_hint(monkeypatch, capsys):
    from torchgloro.train import api

    train, _ = _digits()

    def stop_after_one(cfg, **kwargs):
        return train_config(cfg, stop_after=0.5, **kwargs)

    monkeypatch.setattr(api, "train_config", stop_after_one)
    net, result = tg.train(
        _mlp(), train, epsilon=0.3, epochs=2, batch_size=128, progress=False,
        settings={"run.threads": 1},
    )  # fmt: skip
    out = capsys.readouterr().out
    assert result.interrupted == "--stop-after" and result.history == []
    assert "the net keeps the weights it had then" in out and "--resume" not in out
    assert isinstance(net, tg.GloroNet)
