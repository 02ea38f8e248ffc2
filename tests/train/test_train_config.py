# ruff: noqa: E501
"""Config parsing, overrides, errors, and every packaged recipe."""

from __future__ import annotations

import sys

import pytest
import torch

import torchgloro as tg
from torchgloro._errors import ConfigError
from torchgloro.train import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    dump_config,
    list_recipes,
    load_config,
)
from torchgloro.train.build import build_net, parse_lr

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TABLE1 = {
    # recipe: (epochs, eps_train, eps_test, init, lr, lr_schedule, loss, lam, eps_sched, power)
    "mnist-2c2f-gloro": (500, 0.45, 0.3, "glorot", 1e-3, "decay_to_1e-6", "ce", None, "single", 10),
    "mnist-2c2f-gloro-t": (500, 0.45, 0.3, "glorot", 1e-3, "decay_to_1e-6", "trades", "0,2,500", "single", 10),
    "mnist-4c3f-gloro": (300, 1.75, 1.58, "glorot", 1e-3, "decay_to_5e-6", "ce", None, "single", 10),
    "mnist-4c3f-gloro-t": (300, 1.75, 1.58, "glorot", 1e-3, "decay_to_5e-6", "trades", "0,3,300", "single", 10),
    "cifar10-6c2f-gloro": (800, 0.1551, 0.141, "orthogonal", 1e-3, "decay_to_1e-6", "ce", None, "log", 5),
    "cifar10-6c2f-gloro-t": (800, 0.1551, 0.141, "glorot", 1e-3, "decay_to_1e-6", "trades", "1.2", "log", 5),
    "tinyimagenet-7c1f-gloro": (250, 0.16, 0.141, "glorot", 2.5e-4, "decay_to_5e-7", "ce", None, "single", 5),
    "tinyimagenet-7c1f-gloro-t": (500, 0.16, 0.141, "glorot", 2.5e-4, "decay_to_5e-7", "trades", "1,10,500", "single", 1),
}  # fmt: skip

SHAPES = {"digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10),
          "tiny-imagenet": ((3, 64, 64), 200)}  # fmt: skip


def test_recipe_list_is_complete():
    names = set(list_recipes())
    expected = set(TABLE1) | {
        "digits-minicnn-gloro",
        "mnist-2c2f-standard",
        "mnist-4c3f-standard",
        "cifar10-6c2f-standard",
        "tinyimagenet-7c1f-standard",
    }
    assert expected <= names


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_recipe_parses_and_builds(name):
    cfg = load_config(name)
    in_shape, classes = SHAPES[cfg.data.name]
    torch.manual_seed(0)
    net = build_net(cfg, in_shape, classes)
    net.train()
    out = net(torch.rand(2, *in_shape))
    assert out.shape == (2, classes + 1)
    assert cfg.run.batch_size == 256 and cfg.optim.eps == 1e-7
    assert cfg.optim.betas == (0.9, 0.999)
    # The paper's rows use Adam; the "-plus" recipes use the modern options (issue 8).
    assert cfg.optim.name == ("nadam" if name.endswith("-plus") else "adam")
    if name.endswith("-standard"):
        assert cfg.gloro.robust is False
    else:
        assert cfg.gloro.robust is True


@pytest.mark.parametrize("name", sorted(TABLE1))
def test_recipes_match_table1(name):
    cfg = load_config(name)
    epochs, etr, ete, init, lr, lrs, loss, lam, esch, power = TABLE1[name]
    assert cfg.run.epochs == epochs
    assert (cfg.gloro.epsilon_train, cfg.gloro.epsilon_test) == (etr, ete)
    assert cfg.model.init == init and cfg.optim.lr == lr and cfg.optim.lr_schedule == lrs
    assert cfg.loss.name == loss and cfg.gloro.epsilon_schedule == esch
    assert cfg.gloro.power_iterations == power
    if lam is not None:
        assert cfg.loss.lam_schedule == lam
    assert cfg.loss.trades_robust == "ce"  # Definition 3, L = cross-entropy
    assert cfg.optim.decay_start == 0.5  # Appendix B: the decay starts at half the epochs
    cifar = name.startswith("cifar10")
    assert cfg.optim.warmup_epochs == (20 if cifar else 0)
    assert cfg.data.augment == (not name.startswith("mnist"))


def test_defaults_are_the_digits_recipe():
    assert load_config(None) == load_config("digits-minicnn-gloro")
    defaults = TrainConfig()
    defaults.run.threads = 1  # the recipe pins one thread for its tiny model
    assert defaults.validate() == load_config(None)


def test_set_overrides_parse_by_type():
    cfg = apply_overrides(
        TrainConfig(),
        [
            "gloro.epsilon_train=0.5",
            "run.epochs=7",
            "data.augment=true",
            "optim.betas=0.8,0.99",
            "loss.lam_schedule=0,2,500",
            "data.root=/tmp/x",
        ],
    )
    assert cfg.gloro.epsilon_train == 0.5 and cfg.run.epochs == 7 and cfg.data.augment is True
    assert cfg.optim.betas == (0.8, 0.99) and cfg.loss.lam_schedule == "0,2,500"
    assert cfg.data.root == "/tmp/x"
    with pytest.raises(tg.ConfigError, match="run.epochs"):
        apply_overrides(TrainConfig(), ["run.epochs=abc"])
    with pytest.raises(tg.ConfigError):
        apply_overrides(TrainConfig(), ["data.augment=maybe"])
    with pytest.raises(tg.ConfigError, match="key=value"):
        apply_overrides(TrainConfig(), ["run.epochs"])


def test_unknown_keys_suggest():
    with pytest.raises(tg.ConfigError, match="did you mean 'gloro.epsilon_train'"):
        apply_overrides(TrainConfig(), ["gloro.epsilon_trian=0.5"])
    with pytest.raises(tg.ConfigError, match="did you mean 'optim.lr'"):
        config_from_dict({"optim": {"lrr": 0.1}})
    with pytest.raises(tg.ConfigError, match="did you mean 'optim'"):
        config_from_dict({"optimizer": {"lr": 0.1}})
    with pytest.raises(tg.ConfigError, match="did you mean 'mnist-2c2f-gloro'"):
        load_config("mnist-2c2f-glro")
    # Names from other tools point to the key that does it here, not the nearest spelling.
    with pytest.raises(tg.ConfigError, match="did you mean 'data.train_subset'"):
        apply_overrides(TrainConfig(), ["data.limit=100"])
    with pytest.raises(tg.ConfigError, match="did you mean 'gloro.epsilon_test'"):
        apply_overrides(TrainConfig(), ["gloro.epsilon=0.3"])


def test_every_recipe_holds_out_a_validation_split():
    for name in list_recipes():
        want = 300 if name.startswith("digits") else 5000
        assert load_config(name).data.val_size == want, name


def test_bad_values_are_config_errors():
    for bad in (
        "model.arch=resnet",
        "run.device=tpu",
        "loss.name=hinge-loss",
        "optim.name=sgd",
        "gloro.epsilon_schedule=wiggle",
        "optim.lr_schedule=decay_to_x",
        "optim.decay_start=1.0",
        "loss.trades_robust=js",
        "run.epochs=0",
    ):
        with pytest.raises(tg.ConfigError):
            load_config(None, [bad])


def test_toml_round_trip_and_reader_keys(tmp_path):
    cfg = load_config("mnist-2c2f-gloro-t", ["data.root=/data/mnist"])
    text = dump_config(cfg)
    data = tomllib.loads(text)
    assert data["data"]["name"] == "mnist" and data["data"]["root"] == "/data/mnist"
    assert data["gloro"]["epsilon_test"] == 0.3 and data["run"]["seed"] == 0
    assert data["model"]["arch"] == "2c2f"
    assert config_from_dict(data) == cfg
    assert "root" not in tomllib.loads(dump_config(TrainConfig()))["data"]  # None is omitted
    path = tmp_path / "my.toml"
    path.write_text(text)
    assert load_config(str(path)) == cfg


def test_lr_schedules():
    cos = parse_lr("cosine", 2)
    assert cos.value(0, 10, 1.0) == 0 and cos.value(1, 10, 1.0) == 0.5
    assert cos.value(2, 10, 1.0) == 1.0 and abs(cos.value(10, 10, 1.0)) < 1e-12
    warm = parse_lr("constant", 4)
    assert warm.value(1, 10, 1.0) == 0.25 and warm.value(5, 10, 1.0) == 1.0
    decay = parse_lr("decay_to_1e-6")
    assert decay.value(5, 10, 1e-3) == 1e-3 and abs(decay.value(10, 10, 1e-3) - 1e-6) < 1e-15


def test_plus_recipes_keep_the_robust_term_they_were_recorded_with():
    assert load_config("mnist-2c2f-plus").loss.trades_robust == "kl"
    assert load_config("mnist-4c3f-plus").loss.trades_robust == "ce"


def test_4c3f_plus_recipe_is_the_recorded_130_epoch_run():
    """The shipped recipe equals the recorded `--epochs 130` run of the 110-epoch one."""
    import json
    from pathlib import Path

    from torchgloro.train.config import config_to_dict

    rec = Path(__file__).parents[2] / "benchmarks/results/mnist-4c3f-plus-130epochs-ce-cpu.json"
    ran = json.loads(rec.read_text())["config"]
    now = config_to_dict(load_config("mnist-4c3f-plus"))
    for section in ("model", "gloro", "loss", "optim"):
        assert now[section] == ran[section], section
    assert now["run"]["epochs"] == ran["run"]["epochs"] == 130


def test_a_saved_run_predating_trades_robust_resumes_with_the_kl_form(tmp_path):
    """Runs saved before loss.trades_robust existed trained with KL; today's default is CE."""
    from torchgloro.train.checkpoint import check_same_run
    from torchgloro.train.config import config_to_dict, saved_run_config

    now = config_to_dict(load_config("mnist-4c3f-gloro-t"))
    old = {s: dict(t) for s, t in now.items()}
    del old["loss"]["trades_robust"]
    assert saved_run_config(old).loss.trades_robust == "kl"
    with pytest.raises(tg.ConfigError, match="loss.trades_robust"):
        check_same_run(now, old, tmp_path)  # resuming it as CE would change the run
    check_same_run(config_to_dict(saved_run_config(old)), old, tmp_path)
    assert saved_run_config(now).loss.trades_robust == "ce"  # a saved key is kept


def test_config_reference_documents_every_key():
    """docs/recipes.md's config reference lists exactly the dataclass fields, with defaults."""
    import dataclasses
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
    rows = re.findall(r"^\| `([a-z]+\.[a-z_]+)` \| ([^|]*) \|", doc.read_text(), re.M)
    documented = {key: default.strip() for key, default in rows}
    cfg = TrainConfig()
    fields = {}
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            fields[f"{section.name}.{f.name}"] = getattr(getattr(cfg, section.name), f.name)
    assert set(documented) == set(fields), (
        f"undocumented: {sorted(set(fields) - set(documented))}; "
        f"documented but absent: {sorted(set(documented) - set(fields))}"
    )
    for key, value in fields.items():  # plain scalar defaults appear verbatim
        if isinstance(value, bool):
            assert documented[key] == str(value).lower(), key
        elif isinstance(value, (int, float)):
            assert float(documented[key]) == float(value), key


def _cli_config(*argv: str) -> TrainConfig:
    import argparse

    from torchgloro.train.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_epochs_flag_rescales_the_recipes_ramps():
    """`--epochs N` shortens a recipe as a whole: ramps given in epochs scale with it."""
    full = load_config("mnist-4c3f-plus")
    short = _cli_config("mnist-4c3f-plus", "--epochs", "13")
    assert (full.run.epochs, short.run.epochs) == (130, 13)
    assert full.gloro.epsilon_schedule == "0.05,1.75,26"
    assert short.gloro.epsilon_schedule == "0.05,1.75,2.6"
    assert (full.loss.lam_schedule, short.loss.lam_schedule) == ("0.5,3,65", "0.5,3,6.5")
    assert short.optim.warmup_lr_epochs == pytest.approx(full.optim.warmup_lr_epochs / 10)
    assert short.optim.lr_schedule == full.optim.lr_schedule == "cosine"  # relative already
    cifar = _cli_config("cifar10-6c2f-gloro", "--epochs", "80")
    assert (load_config("cifar10-6c2f-gloro").optim.warmup_epochs, cifar.optim.warmup_epochs) == (
        20,
        2,
    )
    # --set is absolute and applies after the rescaling
    mixed = _cli_config("mnist-4c3f-plus", "--epochs", "13", "--set", "loss.lam_schedule=0,1,3")
    assert mixed.loss.lam_schedule == "0,1,3" and mixed.gloro.epsilon_schedule == "0.05,1.75,2.6"
    # run.epochs through --set changes the length only
    assert _cli_config("mnist-4c3f-plus", "--set", "run.epochs=30").loss.lam_schedule == "0.5,3,65"
    with pytest.raises(tg.ConfigError, match="--epochs must be >= 1"):
        _cli_config("mnist-4c3f-plus", "--epochs", "0")


@pytest.mark.parametrize(
    "setting,key",
    [
        ("gloro.epsilon_train=nan", "gloro.epsilon_train"),
        ("gloro.epsilon_test=nan", "gloro.epsilon_test"),
        ("gloro.epsilon_test=inf", "gloro.epsilon_test"),
        ("optim.lr=nan", "optim.lr"),
        ("optim.weight_decay=nan", "optim.weight_decay"),
    ],
)
def test_nan_and_inf_settings_name_their_key(setting, key):
    """NaN compares False with everything, so range checks let it through to a traceback."""
    with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
        load_config(None, [setting])


def test_unknown_model_option_and_binary_config_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="has no option 'bogus'; its options are: lln"):
        load_config(None, ['model.options={"bogus": 1}'])
    load_config(None, ["model.arch=liresnet", 'model.options={"depth": 2}'])  # a real one
    path = tmp_path / "bin.toml"
    path.write_bytes(b'a = "\xff"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_an_out_folder_that_cannot_be_created_is_a_clear_error(tmp_path, capsys):
    from torchgloro.cli import main

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(["train", "--out", str(blocker), "--epochs", "1", "--no-progress"]) == 2
    assert "Cannot create the run folder" in capsys.readouterr().err
    assert blocker.read_text() == "x"  # nothing lost


@pytest.mark.parametrize(
    "setting,match",
    [
        ("loss.lam_schedule=nan", "must be finite and >= 0"),
        ("loss.lam_schedule=-1", "must be finite and >= 0"),
        ("loss.lam_schedule=1,-2,10", "must be finite and >= 0"),
        ("optim.eps=0", r"optim.eps must be a finite number > 0"),
        ("run.name=", "run.name = '' must name a folder"),
        ("run.name=../../escape", "without '/'"),
        ("run.name=-x", "not starting with '-'"),
        ('model.options={"lln": "false"}', r"option 'lln' must be a bool .* got 'false'"),
    ],
)
def test_settings_that_used_to_pass_and_fail_later(setting, match):
    """Found by a review: each passed validation, then ended in a misleading "diverged"
    error, a run folder outside run.out, or (lln = "false") the opposite of what was asked."""
    with pytest.raises(tg.ConfigError, match=match):
        load_config(None, [setting])


def test_losses_and_models_refuse_values_of_the_wrong_kind():
    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        tg.GloroTrades(lam=-2)
    loss = tg.GloroTrades(lam=2)
    with pytest.raises(ValueError, match="lam must be finite"):
        loss.lam = float("nan")
    assert loss.lam == 2.0
    with pytest.raises(tg.GloroInputError, match="must be a bool"):
        tg.create_model("minicnn", (1, 8, 8), 10, lln="false")
    assert tg.create_model("liresnet", (1, 8, 8), 10, depth=2, width=8, lln_scale=2)  # int ok


def test_run_out_expands_the_home_folder(tmp_path, monkeypatch):
    from torchgloro.train._runtime import new_run_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    run_dir = new_run_dir(load_config(None, ["run.out=~/gruns"]))
    assert run_dir.parent == tmp_path / "gruns" and run_dir.is_dir()


def test_an_unknown_compile_backend_is_a_config_error():
    with pytest.raises(tg.ConfigError, match="run.compile_backend = 'foo' is not one of"):
        load_config(None, ["run.compile=true", "run.compile_backend=foo"])
    assert load_config(None, ["run.compile_backend=foo"]).run.compile is False  # unused: fine
