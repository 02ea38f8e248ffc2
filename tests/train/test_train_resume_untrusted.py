"""Resume treats the run folder as untrusted input (issue #30, item 7)."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import torchgloro as tg
from torchgloro.train import train
from torchgloro.train.cli import resume_config


@pytest.fixture
def stopped(tiny):
    """A tiny run stopped after its first epoch (a whole checkpoint pair)."""
    return train(tiny(), stop_after=1, progress=False).run_dir


def _edit_json(run_dir, edit):
    path = run_dir / "checkpoint.json"
    info = json.loads(path.read_text())
    edit(info)
    path.write_text(json.dumps(info))


@pytest.mark.parametrize(
    ("section", "key", "value"), [("gloro", "epsilon_train", 0.9), ("optim", "lr", 0.1)]
)
def test_an_edited_config_in_checkpoint_json_is_refused(stopped, section, key, value):
    """The same change through --set is refused; an edit of the file was accepted."""
    _edit_json(stopped, lambda info: info["config"][section].__setitem__(key, value))
    with pytest.raises(tg.CheckpointError, match="config.*edited"):
        train(resume_config(stopped, []), resume=stopped, progress=False)


@pytest.mark.parametrize(
    ("key", "value"),
    [("optim", 5), ("best", [1]), ("step", "zero"), ("partial_seconds", "x"), ("world_size", 0)],
)
def test_a_broken_checkpoint_json_is_a_clear_error(stopped, key, value):
    cfg = resume_config(stopped, [])
    _edit_json(stopped, lambda info: info.__setitem__(key, value))
    with pytest.raises(tg.CheckpointError, match=key):
        train(cfg, resume=stopped, progress=False)


@pytest.mark.parametrize("config", [5, [1], {"gloro": 5}, {"run": [1, 2]}])
def test_a_checkpoint_json_config_of_the_wrong_shape_is_a_clear_error(stopped, config):
    """A config that is not a table of tables raised a raw AttributeError or TypeError."""
    _edit_json(stopped, lambda info: info.__setitem__("config", config))
    with pytest.raises(tg.CheckpointError, match="config"):
        resume_config(stopped, [])


@pytest.mark.parametrize("name", ["rng.torch_cpu", "rng.data_epoch_start", "rng.augment"])
def test_a_missing_rng_tensor_is_a_clear_error(stopped, name):
    path = stopped / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    del tensors[name]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(tg.CheckpointError, match=name):
        train(resume_config(stopped, []), resume=stopped, progress=False)


def test_temp_files_of_a_killed_write_are_removed_on_resume(stopped):
    stale = [stopped / ".checkpoint.safetensors.k1ll3d.tmp", stopped / ".config.toml.x.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 1024)
    keep = stopped / "notes.tmp"  # not one of ours
    keep.write_text("mine")
    train(resume_config(stopped, []), resume=stopped, progress=False)
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"


@pytest.mark.parametrize("change", ["run.threads=2", "run.channels_last=true"])
def test_resuming_with_another_arithmetic_says_what_it_changes(stopped, capsys, change):
    capsys.readouterr()
    train(resume_config(stopped, [change]), resume=stopped, progress=False)
    out = capsys.readouterr().out
    assert change.split("=")[0] in out and "will not match an uninterrupted run" in out


def test_a_key_an_older_run_lacks_is_no_arithmetic_change(stopped):
    from torchgloro.train.checkpoint import arithmetic_changes
    from torchgloro.train.config import config_to_dict

    saved = json.loads((stopped / "checkpoint.json").read_text())["config"]
    now = config_to_dict(resume_config(stopped, []))
    del saved["run"]["channels_last"]  # a run from before run.channels_last existed
    assert arithmetic_changes(now, saved) == []
    now["run"]["channels_last"] = True
    assert arithmetic_changes(now, saved) == ["run.channels_last"]


def test_the_config_digest_survives_a_newer_version_with_more_keys(stopped, monkeypatch):
    """A later torchgloro fills the keys an older config lacks with defaults; the digest is
    of the config as saved, so the run still resumes (a digest of the filled config was
    refused as 'edited' as soon as one key was added)."""
    import torchgloro.train.checkpoint as ckpt

    real = ckpt.config_to_dict

    def newer(cfg):  # as if this version had one more config key
        return {**real(cfg), "run": {**real(cfg)["run"], "a_newer_key": 1}}

    monkeypatch.setattr(ckpt, "config_to_dict", newer)
    assert ckpt.read_checkpoint(stopped) is not None
