"""`gloro evaluate` / `gloro compare` end to end on run folders built here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import torchgloro as tg
from torchgloro.evaluate import EvalOptions, evaluate_run
from torchgloro.evaluate.cost import read_training_cost

FAST_ARGS = [
    "--limit", "120", "--pgd-steps", "8", "--lower-bounds", "--lb-steps", "20",
    "--lower-bounds-points", "8", "--local-steps", "15", "--lb-lr", "1e-2",
    "--local-lr", "1e-2",
]  # fmt: skip


def make_run(path: Path, state: dict, metrics_csv: bool = True) -> Path:
    """A run folder like `gloro train` writes: best.safetensors, config.toml, metrics.csv."""
    f = tg.models.create_model("minicnn", (1, 8, 8), 10)
    net = tg.GloroNet(f, epsilon=0.3, power_iterations=5)
    net.load_state_dict(state)
    net.eval()
    path.mkdir(parents=True)
    net.save(path / "best.safetensors")
    (path / "config.toml").write_text(
        '[run]\nseed = 7\n[data]\nname = "digits"\n[gloro]\nepsilon_test = 0.3\n'
        '[model]\narch = "minicnn"\n'
    )
    if metrics_csv:
        (path / "metrics.csv").write_text(
            "epoch,train_loss,seconds_per_epoch,peak_mem_mb_per_instance\n"
            "1,2.1,0.50,0.020\n2,1.5,0.40,0.030\n3,1.2,0.45,\n"
        )
    return path


def _strip(d: dict) -> dict:
    d = dict(d)
    for k in ("cost", "timings", "run"):
        d.pop(k, None)
    return d


def test_evaluate_and_compare_cli(tmp_path, capsys, trained_digits_net, standard_digits_net):
    from torchgloro.cli import main

    glo = make_run(tmp_path / "gloro-1", trained_digits_net[0].state_dict())
    std = make_run(
        tmp_path / "standard-1",
        {k: v.clone() for k, v in standard_digits_net.state_dict().items()},
        metrics_csv=False,
    )
    assert main(["evaluate", str(glo), *FAST_ARGS, "--cost", "--cost-repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "VRA sound (%)" in out and "global LB" in out and "certify (sound)" in out
    assert (
        "Lower bounds on 8 points of 120 (global: 8 pairs, 20 steps; local: 8 points, 15 "
        "steps); --lower-bounds-points to change." in out
    )
    # --limit 120 of the 360 test points: the files say so, and no evaluation.json is written.
    for name in (
        "evaluation-first120.json",
        "evaluation-first120.md",
        "certified_accuracy-first120.csv",
        "certified_accuracy-first120.png",
        "radius_histogram-first120.png",
    ):
        assert (glo / name).is_file() and (glo / name).stat().st_size > 0, name
    assert not (glo / "evaluation.json").exists()
    ev = json.loads((glo / "evaluation-first120.json").read_text())
    assert ev["n"] == 120 and ev["epsilon"] == 0.3 and ev["seed"] == 7
    m = ev["metrics"]
    assert m["vra_sound"] <= m["pgd_accuracy"] <= m["clean_accuracy"]
    assert ev["lipschitz"]["global_lb"] <= ev["lipschitz"]["global_ub_sound"]
    assert ev["cost"]["training"]["sec_per_epoch"] == pytest.approx(0.45)
    assert ev["cost"]["training"]["mem_mb_per_instance"] == pytest.approx(0.03)
    assert ev["cost"]["certification"]["certify_sound"]["seconds"] > 0
    md = (glo / "evaluation-first120.md").read_text()
    assert "certified_accuracy-first120.png" in md and "| evaluation" not in md
    rows = (glo / "certified_accuracy-first120.csv").read_text().splitlines()
    assert rows[0] == "epsilon,certified_accuracy" and len(rows) > 100

    assert main(["evaluate", str(std), *FAST_ARGS, "--epsilon", "1.0"]) == 0
    ev_std = json.loads((std / "evaluation-eps1-first120.json").read_text())  # ε: not its own
    assert ev_std["cost"]["training"] is None
    assert ev_std["metrics"]["pgd_accuracy"] < ev_std["metrics"]["clean_accuracy"] - 0.3
    capsys.readouterr()
    assert main(["compare", str(std)]) == 2  # only a subset evaluation: named, no traceback
    assert "evaluation-eps1-first120.json" in capsys.readouterr().err
    subsets = [str(std / "evaluation-eps1-first120.json"), str(glo / "evaluation-first120.json")]
    assert main(["compare", *subsets, "--names", "Standard,GloRo"]) == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(lines) == 3 and "Standard" in lines[1] and "GloRo" in lines[2]
    assert main(["compare", str(tmp_path / "nope")]) == 2  # clear error, no traceback
    target = glo / "evaluation-first120.json"  # --output onto an evaluation: refused, kept
    before = target.read_bytes()
    assert main(["compare", *subsets, "--output", str(target)]) == 2
    assert "is not a .md or .txt file" in capsys.readouterr().err
    assert target.read_bytes() == before
    assert main(["compare", *subsets, "--output", str(tmp_path / "t.md")]) == 0
    written = (tmp_path / "t.md").read_text().splitlines()
    assert len(written) == 4 and written[2].startswith("| standard-1") and "gloro-1" in written[3]


def test_evaluation_is_reproducible(tmp_path, trained_digits_net):
    run = make_run(tmp_path / "r", trained_digits_net[0].state_dict())
    opts = EvalOptions(
        limit=80, pgd_steps=5, lower_bounds=True, lb_steps=10, lb_points=6, local_steps=10,
        lb_lr=1e-2, local_lr=1e-2,
    )  # fmt: skip
    a = evaluate_run(run, opts, write=False)
    b = evaluate_run(run, opts, write=False)
    assert _strip(a) == _strip(b)
    assert a["seed"] == 7  # from config.toml
    c = evaluate_run(run, EvalOptions(**{**opts.__dict__, "seed": 8}), write=False)
    assert c["lipschitz"]["global_lb"] != a["lipschitz"]["global_lb"]


def test_training_cost_tolerates_missing_columns(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,loss\n1,0.5\n")
    tc = read_training_cost(tmp_path)
    assert tc["epochs"] == 1 and tc["sec_per_epoch"] is None and tc["mem_mb_per_instance"] is None
    (tmp_path / "metrics.csv").write_text("epoch,epoch_seconds,peak_mem_bytes\n1,2,1048576\n")
    tc = read_training_cost(tmp_path)
    assert tc["sec_per_epoch"] == 2 and tc["mem_mb_per_instance"] == pytest.approx(1.0)
    assert read_training_cost(tmp_path / "missing") is None


def test_cli_refuses_bad_options_and_mismatched_data_clearly(tmp_path, capsys, trained_digits_net):
    """Found by a CLI review: each of these was a raw traceback or silent nonsense."""
    import numpy as np

    from torchgloro.cli import main

    net, _, _ = trained_digits_net
    run = make_run(tmp_path / "run", net.state_dict())
    rng = np.random.default_rng(0)
    npz = tmp_path / "c20.npz"  # 8x8 images with 20 classes, for a 10-class model
    y = np.arange(40) % 20
    np.savez(npz, train_x=rng.random((40, 1, 8, 8)), train_y=y,
             test_x=rng.random((40, 1, 8, 8)), test_y=y)  # fmt: skip
    for argv, match in [
        (["certify", str(run), "--dataset", f"npz:{npz}"], "has 20 classes but the model has 10"),
        (["evaluate", str(run), "--dataset", f"npz:{npz}", "--no-write"], "has 20 classes"),
        (["evaluate", str(run), "--device", "tpu", "--no-write"], "use auto, cpu, cuda"),
    ]:
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert match in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as e:  # argparse: a usage error, exit status 2
        main(["certify", str(run), "--batch-size", "0"])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "evaluation.json").write_text("[1, 2]")
    assert main(["compare", str(bad), str(bad)]) == 2
    assert "not an evaluation" in capsys.readouterr().err


def test_subset_evaluation_keeps_the_full_one(tmp_path, trained_digits_net):
    """`--limit` used to overwrite a full evaluation.json with a 50-point one."""
    run = make_run(tmp_path / "r", trained_digits_net[0].state_dict())
    full = evaluate_run(run, EvalOptions(attack=None, limit=10**6))  # limit past the split
    before = (run / "evaluation.json").read_bytes()
    sub = evaluate_run(run, EvalOptions(attack=None, limit=50))
    assert (run / "evaluation.json").read_bytes() == before
    assert json.loads((run / "evaluation-first50.json").read_text())["n"] == 50 == sub["n"]
    assert full["n"] > 50 and sub["files"]["json"] == "evaluation-first50.json"
    assert full["files"]["json"] == "evaluation.json"


def test_evaluations_of_other_files_or_settings_keep_the_runs_own(tmp_path, trained_digits_net):
    """Found by a review: evaluating RUN/checkpoint.safetensors (or another ε) replaced the
    evaluation of the run's best model, and recorded nothing of which file it was."""
    import shutil

    run = make_run(tmp_path / "r", trained_digits_net[0].state_dict())
    shutil.copy(run / "best.safetensors", run / "checkpoint.safetensors")
    quick = EvalOptions(attack=None, limit=10**6)
    own = evaluate_run(run, quick)
    before = (run / "evaluation.json").read_bytes()
    ck = evaluate_run(run / "checkpoint.safetensors", quick)
    eps = evaluate_run(run, EvalOptions(attack=None, limit=10**6, epsilon=0.5))
    assert (run / "evaluation.json").read_bytes() == before
    assert own["model_file"] == "best.safetensors" and own["files"]["json"] == "evaluation.json"
    assert ck["model_file"] == "checkpoint.safetensors"
    assert ck["files"]["json"] == "evaluation-checkpoint.json"
    assert eps["files"]["json"] == "evaluation-eps0.5.json" and eps["epsilon"] == 0.5
    assert ck["files"]["folder"] == str(run)


def test_damaged_run_configs_and_unwritable_folders_give_clear_errors(
    tmp_path, capsys, monkeypatch, trained_digits_net
):
    """Found by a review: raw tracebacks, or a finished evaluation lost at the write."""
    from torchgloro._errors import GloroError
    from torchgloro.cli import main
    from torchgloro.evaluate import report

    run = make_run(tmp_path / "r", trained_digits_net[0].state_dict())
    good = (run / "config.toml").read_text()
    quick = ["--attack", "none", "--limit", "20", "--no-write"]
    for text, match in [
        ("data = 5\n", r"\[data\] must be a table"),
        (good.replace("epsilon_test = 0.3", 'epsilon_test = "x"'), "epsilon_test must be a number"),
        (good.replace("seed = 7", "seed = 1.5"), "run.seed must be an integer"),
    ]:
        (run / "config.toml").write_text(text)
        for cmd in (["evaluate", str(run), *quick], ["certify", str(run)]):
            capsys.readouterr()
            assert main(cmd) == 2, (text, cmd)
            assert re.search(match, capsys.readouterr().err), (text, cmd)
    (run / "config.toml").write_bytes(b'[data]\nname = "digits\xff"\n')
    assert main(["evaluate", str(run), *quick]) == 2
    assert "not valid TOML (UTF-8 text)" in capsys.readouterr().err
    # epsilon_test = 0 means "the default" (here the net's ε), as for gloro certify
    (run / "config.toml").write_text(good.replace("epsilon_test = 0.3", "epsilon_test = 0.0"))
    ev = evaluate_run(run, EvalOptions(attack=None, limit=20), write=False)
    assert ev["epsilon"] == pytest.approx(0.3)
    # A folder of runs: the missing model file is named first, not a missing dataset.
    assert main(["certify", str(tmp_path)]) == 2
    assert "No model file" in capsys.readouterr().err
    # An unwritable folder: refused before any work; a failed write keeps the message clear.
    from torchgloro.evaluate.runner import _check_writable

    with pytest.raises(GloroError, match="Cannot write into .* --no-write"):
        _check_writable(tmp_path / "not-a-folder")

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_outputs", fail)
    with pytest.raises(GloroError, match="cannot write the results .* No space left"):
        evaluate_run(run, EvalOptions(attack=None, limit=20))


def test_help_shows_defaults_and_version(capsys):
    from torchgloro.cli import main

    for argv in (["evaluate", "--help"], ["certify", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "PGD steps (default: 100)" in out and "batch size (default: 1000)" in out
    assert "cuda or cuda:N (default: auto)" in out and "gloro " in out.splitlines()[-1]
    words = " ".join(out.split())  # argparse wraps help to the terminal's width
    assert "--lower-bounds-points N test points for the lower bounds" in words
    assert "the paper: 100) (default: 20)" in words


def test_certify_and_evaluate_refuse_to_run_once_per_torchrun_rank(monkeypatch, capsys):
    from torchgloro.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    for cmd in ("certify", "evaluate"):
        assert main([cmd, "somewhere"]) == 2
        assert "Run it without torchrun" in capsys.readouterr().err
