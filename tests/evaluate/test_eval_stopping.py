"""A stopped ``gloro evaluate`` keeps what it finished (Ctrl-C or SIGTERM, in any phase)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_eval_cli import make_run

from torchgloro.evaluate import EvalOptions, evaluate_run, progress
from torchgloro.evaluate.stopping import Interrupted, signals_stop

REPO = Path(__file__).resolve().parents[2]


def _stop_in(monkeypatch, phase: str, after: int) -> None:
    """Ctrl-C once the phase whose bar starts with ``phase`` has done ``after`` units."""
    update = progress.Phase.update

    def interrupted_update(self, k=1):
        update(self, k)
        if self.desc.startswith(phase) and self.done >= after:
            raise KeyboardInterrupt

    monkeypatch.setattr(progress.Phase, "update", interrupted_update)


def test_ctrl_c_in_pgd_writes_the_certification_and_the_attacked_batches(
    tmp_path, monkeypatch, capsys, trained_digits_net
):
    from torchgloro.cli import main

    run = make_run(tmp_path / "r", trained_digits_net[0].state_dict())
    _stop_in(monkeypatch, "PGD", after=32 * 5)  # a step into the second batch of 32
    args = ["evaluate", str(run), "--pgd-steps", "4", "--batch-size", "32", "--limit", "100"]
    assert main(args) == 130
    out = capsys.readouterr().out
    assert "Stopped by SIGINT: partial results" in out and "Wrote the finished parts" in out
    ev = json.loads((run / "evaluation-first100.json").read_text())
    stop = ev["stopped"]
    assert stop["signal"] == "SIGINT" and stop["finished"] == ["certification"]
    phase = stop["in_progress"]
    assert phase["phase"] == "PGD" and phase["partial"] is True
    assert (phase["done"], phase["total"], phase["unit"]) == (160, 400, "point-step")
    assert phase["points_finished"] == 32 and 0 <= phase["points_fooled"] <= 32
    assert (
        ev["metrics"]["vra_sound"] > 0 and "pgd" not in ev and "pgd_accuracy" not in ev["metrics"]
    )
    assert (run / "certified_accuracy-first100.png").is_file()  # certification finished
    md = (run / "evaluation-first100.md").read_text()
    assert "In progress (partial): PGD, 160 of 400 point-steps done" in md
    assert main(["compare", str(run / "evaluation-first100.json")]) == 0
    assert "| r (stopped: partial) |" in capsys.readouterr().out


def test_a_stop_in_the_local_bound_keeps_the_global_one(tmp_path, monkeypatch, trained_digits_net):
    run = make_run(tmp_path / "r", trained_digits_net[0].state_dict())
    _stop_in(monkeypatch, "local lower bound", after=3)
    opts = EvalOptions(attack=None, lower_bounds=True, lb_points=4, lb_steps=5, local_steps=50,
                       limit=40, progress=False)  # fmt: skip
    with pytest.raises(Interrupted) as e:
        evaluate_run(run, opts)
    result = e.value.result
    assert result["stopped"]["finished"] == ["certification"]
    lip = result["lipschitz"]
    assert 0 < lip["global_lb"] <= lip["global_ub_sound"] and "local_lb" not in lip
    phase = result["stopped"]["in_progress"]
    assert phase["phase"] == "local lower bound (4 points)" and phase["done"] == 3
    assert 0 <= phase["lower_bound_so_far"] <= lip["global_ub_sound"]
    written = json.loads((run / "evaluation-first40.json").read_text())
    assert written["lipschitz"]["global_lb"] == lip["global_lb"]


def test_a_stop_during_certification_writes_the_counts_without_plots(
    tmp_path, monkeypatch, trained_digits_net
):
    run = make_run(tmp_path / "r", trained_digits_net[0].state_dict())
    _stop_in(monkeypatch, "certify (fast)", after=16)
    with pytest.raises(Interrupted):
        evaluate_run(run, EvalOptions(batch_size=16, limit=64, progress=False))
    ev = json.loads((run / "evaluation-first64.json").read_text())
    phase = ev["stopped"]["in_progress"]
    assert ev["stopped"]["finished"] == [] and ev["metrics"] == {}
    assert (phase["phase"], phase["done"], phase["total"]) == ("certify (fast)", 16, 64)
    assert 0 <= phase["certified"] <= 16
    assert not (run / "certified_accuracy-first64.png").exists()
    assert "Finished: nothing" in (run / "evaluation-first64.md").read_text()


def test_sigterm_raises_interrupted_inside_the_block_only():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e:
        with signals_stop():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert e.value.signal == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigint_to_gloro_evaluate_exits_130_with_the_finished_parts(tmp_path, trained_digits_net):
    run = make_run(tmp_path / "r", trained_digits_net[0].state_dict())
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torchgloro.cli", "evaluate", str(run), "--lower-bounds",
           "--lb-steps", "1000000", "--attack", "none", "--limit", "50"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    err, deadline = b"", time.monotonic() + 120
    while b"global lower bound" not in err and time.monotonic() < deadline:  # its bar is up
        if select.select([proc.stderr], [], [], 1.0)[0]:
            err += os.read(proc.stderr.fileno(), 4096)
        assert proc.poll() is None, err.decode(errors="replace")
    time.sleep(2)  # well inside the phase, not at its first line
    proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=120)
    assert proc.returncode == 130, (err + rest).decode(errors="replace")
    assert b"Wrote the finished parts" in out
    ev = json.loads((run / "evaluation-first50.json").read_text())
    assert ev["stopped"]["signal"] == "SIGINT" and ev["stopped"]["finished"] == ["certification"]
    assert ev["stopped"]["in_progress"]["phase"].startswith("global lower bound")
