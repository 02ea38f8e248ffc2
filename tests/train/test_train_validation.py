"""The validation split (data.val_size): held out of training, used to choose
best.safetensors and for the per-epoch VRA; older runs (no val_size) resume as before."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

import torchgloro as tg
from torchgloro.train import train
from torchgloro.train.build import load_splits, validation_indices
from torchgloro.train.checkpoint import Checkpoint, check_val_indices, read_checkpoint
from torchgloro.train.cli import resume_config
from torchgloro.train.distributed import DistEnv
from torchgloro.train.report import epoch_line


def test_the_validation_split_is_seeded_and_disjoint_from_training(tiny):
    a = validation_indices(1000, 100, seed=0)
    assert torch.equal(a, validation_indices(1000, 100, seed=0))
    assert not torch.equal(a, validation_indices(1000, 100, seed=1))
    assert len(a.unique()) == 100 and torch.equal(a, a.sort().values)

    cfg = tiny("data.val_size=200", "data.train_subset=0")
    s = load_splits(cfg, DistEnv())
    full = tg.data.get_dataset("digits", "train")
    assert len(s.val) == 200 and len(s.train) == len(full) - 200
    assert torch.equal(s.val.x, full.x[s.val_indices])
    rows = {tuple(r) for r in full.x[s.val_indices].flatten(1).tolist()}
    assert not rows & {tuple(r) for r in s.train.x.flatten(1).tolist()}
    # train_subset takes the first N of what is left: the validation split stays the same.
    s2 = load_splits(tiny("data.val_size=200", "data.train_subset=100"), DistEnv())
    assert len(s2.train) == 100 and torch.equal(s2.val_indices, s.val_indices)
    assert load_splits(tiny("data.val_size=0"), DistEnv()).val is None


def test_a_validation_split_as_large_as_the_training_split_is_a_config_error(tiny):
    with pytest.raises(tg.ConfigError, match="data.val_size = 5000 leaves no training"):
        load_splits(tiny("data.val_size=5000"), DistEnv())


def test_best_is_chosen_on_validation_and_commands_say_so(tiny):
    result = train(tiny("data.val_size=300"), progress=False)
    rows = result.history
    assert all(not math.isnan(r["val_vra"]) and math.isnan(r["test_vra"]) for r in rows)
    best = max(rows, key=lambda r: (r["val_vra"], r["val_clean_acc"]))
    assert result.final["best_epoch"] == best["epoch"]
    assert result.final["best_split"] == "validation"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*test split")  # not picked on test
        net = tg.load(result.run_dir)
    text = net.loaded_weights.text
    assert f"epoch {best['epoch']} of 4" in text and "validation split (300 images)" in text
    assert not net.loaded_weights.picked_on_test
    final = tg.load(result.run_dir / "checkpoint.safetensors").loaded_weights.text
    assert final == "checkpoint.safetensors: the final weights (epoch 4 of 4)"
    ck = read_checkpoint(result.run_dir)
    assert ck.info["best"]["split"] == "validation" and len(ck.tensors["data.val_indices"]) == 300


def test_the_test_split_each_epoch_only_when_asked(tiny):
    rows = train(tiny("run.test_every_epoch=true", "run.epochs=1"), progress=False).history
    assert not math.isnan(rows[0]["test_vra"]) and not math.isnan(rows[0]["val_vra"])


def test_a_run_without_validation_picks_on_test_and_says_so(tiny):
    result = train(tiny("data.val_size=0", "run.epochs=2"), progress=False)
    assert all(math.isnan(r["val_vra"]) for r in result.history)
    with pytest.warns(UserWarning, match="picked on the test split"):
        net = tg.load(result.run_dir)
    assert net.loaded_weights.picked_on_test


def test_a_run_saved_before_val_size_existed_resumes_bit_identically(tiny):
    """Its config lacks data.val_size (and run.test_every_epoch): it trained on the whole
    training split and picked best.safetensors on test; resumed, it still does."""
    straight = train(tiny("data.val_size=0"), progress=False)
    first = train(tiny("data.val_size=0"), stop_after=2, progress=False)
    run_dir = first.run_dir
    info = json.loads((run_dir / "checkpoint.json").read_text())
    del info["config"]["data"]["val_size"], info["config"]["run"]["test_every_epoch"]
    del info["best"]["split"]
    (run_dir / "checkpoint.json").write_text(json.dumps(info))
    toml = run_dir / "config.toml"
    new = ("val_size", "test_every_epoch")
    toml.write_text("\n".join(x for x in toml.read_text().splitlines() if not x.startswith(new)))
    cfg = resume_config(run_dir, [])
    assert cfg.data.val_size == 0
    second = train(cfg, resume=run_dir, progress=False)
    a = load_file(str(straight.run_dir / "checkpoint.safetensors"))
    b = load_file(str(run_dir / "checkpoint.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second.final["best_split"] == "test"
    assert second.final["best_epoch"] == straight.final["best_epoch"]


def test_a_best_file_from_before_validation_splits_is_labelled_picked_on_test(tiny, tmp_path):
    net = tg.load(train(tiny("run.epochs=1"), progress=False).run_dir / "checkpoint.safetensors")
    net.save(tmp_path / "best.safetensors")  # as older runs wrote it: no selection recorded
    with pytest.warns(UserWarning, match="best test VRA .*picked on the test split"):
        loaded = tg.load(tmp_path)
    assert loaded.loaded_weights.picked_on_test


def test_resuming_with_another_validation_split_is_refused(tmp_path):
    ck = Checkpoint({"data.val_indices": torch.tensor([1, 5, 7])}, {}, None)
    check_val_indices(ck, torch.tensor([1, 5, 7]), tmp_path)
    with pytest.raises(tg.CheckpointError, match="validation split drawn now"):
        check_val_indices(ck, torch.tensor([1, 5, 8]), tmp_path)
    with pytest.raises(tg.CheckpointError, match="validation split drawn now"):
        check_val_indices(Checkpoint({}, {}, None), torch.tensor([1, 5, 7]), tmp_path)


def test_epoch_lines_name_each_figures_split_and_epsilon():
    nan = float("nan")
    row = {
        "epoch": 3, "train_loss": 0.5, "train_clean_acc": 0.9, "train_vra": 0.8,
        "val_clean_acc": 0.95, "val_vra": 0.819, "val_rejection": 0.1,
        "test_clean_acc": nan, "test_vra": nan, "test_rejection": nan,
        "epsilon": 0.45, "lam": nan, "lr": 1e-3, "lipschitz": 5.0, "seconds": 1.0,
        "peak_mem_mb_per_sample": 0.1,
    }  # fmt: skip
    line = epoch_line(row, 10, 0.3)
    assert "train VRA@ε_t 0.800  ε_t 0.45" in line and "val VRA@0.3 0.819" in line
    assert "test" not in line and " VRA 0" not in line
    line = epoch_line({**row, "test_clean_acc": 0.9, "test_vra": 0.7, "test_rejection": 0.2},
                      10, 0.3)  # fmt: skip
    assert "test VRA@0.3 0.700" in line


def test_weights_descriptions_of_crafted_metadata_do_not_crash():
    """A model file is untrusted input: fields of the wrong type give a plain description."""
    from torchgloro._weights import SELECTION_KEY, TRAIN_KEY, describe_weights

    bad = {"epoch": "x", "epsilon": "0.3", "split": 5, "n": [1]}
    info = describe_weights("best.safetensors", {SELECTION_KEY: json.dumps(bad)})
    assert info.picked_on_test and "epoch None of None, the best VRA on the test split" in info.text
    plain = describe_weights("m.safetensors", {TRAIN_KEY: "[1]"})
    assert plain.text == "m.safetensors: a saved model" and not plain.picked_on_test
    stopped = {"epoch": 3, "step": 5, "total_epochs": 4}
    text = describe_weights("checkpoint.safetensors", {TRAIN_KEY: json.dumps(stopped)}).text
    assert text == "checkpoint.safetensors: the weights at epoch 4, step 5 (a stopped run)"
