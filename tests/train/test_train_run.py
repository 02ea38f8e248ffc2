"""The default `gloro train` end to end, its run folder, and `gloro certify`."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from torchgloro.cli import main
from torchgloro.train import train
from torchgloro.train.report import METRICS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RUN_FILES = (
    "config.toml",
    "metrics.csv",
    "checkpoint.safetensors",
    "checkpoint.json",
    "best.safetensors",
    "report.md",
    "loss.png",
    "accuracy.png",
    "lipschitz.png",
)
DEFAULT_VRA = 0.6  # measured: 0.757 (fast and sound) with seed 0


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs")
    try:
        assert main(["train", "--out", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(old)
    (run_dir,) = list(out.iterdir())
    return run_dir


def test_default_run_is_complete(default_run: Path, capsys):
    for name in RUN_FILES:
        path = default_run / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert default_run.name.startswith("digits-minicnn-gloro-")
    cfg = tomllib.loads((default_run / "config.toml").read_text())
    assert cfg["data"]["name"] == "digits" and cfg["model"]["arch"] == "minicnn"
    assert cfg["gloro"]["epsilon_test"] == 0.3 and cfg["run"]["seed"] == 0
    with open(default_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == cfg["run"]["epochs"] and tuple(rows[0]) == METRICS
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    info = json.loads((default_run / "checkpoint.json").read_text())
    assert info["epoch"] == cfg["run"]["epochs"] and info["step"] == 0
    report = (default_run / "report.md").read_text()
    assert "VRA (sound)" in report and "accuracy.png" in report


def test_default_run_reaches_vra(default_run: Path):
    with open(default_run / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert float(last["val_vra"]) >= DEFAULT_VRA
    assert float(last["val_clean_acc"]) >= 0.85
    assert float(last["val_vra"]) + float(last["val_rejection"]) <= 1.0 + 1e-9
    assert last["test_vra"] == "nan"  # the test split is for the end (run.test_every_epoch)


def test_certify_cli(default_run: Path, capsys):
    assert main(["certify", str(default_run), "--mode", "sound"]) == 0
    out = capsys.readouterr().out
    assert "VRA" in out and "clean accuracy" in out and "rejection" in out
    vra = float(out.split("\n  VRA")[1].split("%")[0])
    assert "weights         best.safetensors: epoch" in out and "validation split" in out
    assert vra >= 100 * DEFAULT_VRA
    assert main(["certify", str(default_run), "--mode", "fast", "--epsilon", "0.01"]) == 0


def test_loaded_model_matches_the_run(default_run: Path):
    import torchgloro as tg

    net = tg.load(default_run)
    assert net.epsilon == pytest.approx(0.3)
    test = tg.data.get_dataset("digits", "test")
    c = net.certify(test.x, mode="fast")
    assert float((c.certified & (c.pred == test.y)).float().mean()) >= DEFAULT_VRA


def test_compiled_training_matches_eager(tmp_path):
    """`run.compile` (backend aot_eager here: no C++ compiler) trains like eager training."""
    finals = []
    for compiled in (False, True):
        out = tmp_path / ("compiled" if compiled else "eager")
        args = ["train", "--out", str(out), "--no-progress", "--epochs", "2"]
        if compiled:
            args += ["--set", "run.compile=true", "--set", "run.compile_backend=aot_eager"]
        assert main(args) == 0
        (run,) = list(out.iterdir())
        with open(run / "metrics.csv", newline="") as f:
            finals.append(list(csv.DictReader(f))[-1])
        if compiled:
            saved = tomllib.loads((run / "config.toml").read_text())["run"]
            assert saved["compile"] is True and saved["compile_backend"] == "aot_eager"
    eager, compiled = finals
    assert float(compiled["train_loss"]) == pytest.approx(float(eager["train_loss"]), rel=1e-3)
    assert abs(float(compiled["val_vra"]) - float(eager["val_vra"])) <= 0.02


def test_a_warmup_as_long_as_the_run_warns(tiny, capsys):
    """With warm-up epochs >= epochs the ⊥ logit is never trained: say so."""
    train(tiny("optim.warmup_epochs=4"), progress=False)
    assert "warning: optim.warmup_epochs (4) >= run.epochs (4)" in capsys.readouterr().out
    train(tiny("optim.warmup_epochs=1"), progress=False)
    assert "warmup_epochs" not in capsys.readouterr().out


def test_training_memory_excludes_the_epochs_evaluation(tiny, monkeypatch):
    """Found by a review: the per-sample training memory was read after the end-of-epoch
    certification of the test split, so it grew with run.eval_batch_size."""
    from torchgloro.train import _selection

    real = _selection.evaluate

    def heavy_evaluate(*args, **kwargs):
        ballast = torch.ones(64 * 2**20)  # 256 MB touched during the evaluation
        out = real(*args, **kwargs)
        del ballast
        return out

    plain = train(tiny("run.epochs=1"), progress=False).history[0]["peak_mem_mb_per_sample"]
    monkeypatch.setattr(_selection, "evaluate", heavy_evaluate)
    heavy = train(tiny("run.epochs=1"), progress=False).history[0]["peak_mem_mb_per_sample"]
    # 256 MB over a batch of 128 would add 2 MB per sample.
    assert heavy < plain + 0.5, (plain, heavy)


def test_amp_on_cpu_warns_that_it_trains_in_float32(tiny, capsys):
    train(tiny("run.epochs=1", "run.amp=bf16", "run.device=cpu"), progress=False)
    assert "run.amp = 'bf16' applies on CUDA only" in capsys.readouterr().out
