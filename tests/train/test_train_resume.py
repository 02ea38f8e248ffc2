"""Exact resume, SIGINT, corrupt/foreign checkpoints, and divergence."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

import torchgloro as tg
from torchgloro.cli import main
from torchgloro.losses import GloroCrossEntropy
from torchgloro.train import LOSSES, TrainingDivergedError, train
from torchgloro.train.checkpoint import read_checkpoint
from torchgloro.train.cli import resume_config
from torchgloro.train.report import read_metrics


def _state(run_dir):
    """Model + optimizer tensors of a run's checkpoint."""
    t = load_file(str(run_dir / "checkpoint.safetensors"))
    return {k: v for k, v in t.items() if k.startswith(("model.", "optim."))}


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) or (a[k].isnan().all() and b[k].isnan().all()), k


@pytest.fixture
def straight(tiny):
    """A 4-epoch tiny run, uninterrupted."""
    return train(tiny(), progress=False)


def test_resume_is_bit_identical(tiny, straight):
    first = train(tiny(), stop_after=2, progress=False)
    assert first.interrupted == "--stop-after" and first.epochs_done == 2
    ck = read_checkpoint(first.run_dir)
    assert (ck.epoch, ck.step) == (2, 0)
    second = train(resume_config(first.run_dir, []), resume=first.run_dir, progress=False)
    assert second.interrupted is None
    _assert_identical(_state(straight.run_dir), _state(second.run_dir))
    a, b = (
        read_metrics(straight.run_dir / "metrics.csv"),
        read_metrics(second.run_dir / "metrics.csv"),
    )
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert second.final["vra_sound"] == straight.final["vra_sound"]


def test_resume_via_cli(tiny, straight, tmp_path):
    run_dir = train(tiny(), stop_after=1, progress=False).run_dir
    argv = ["train", "--resume", str(run_dir), "--no-progress", "--set", "run.eval_batch_size=77"]
    assert main(argv) == 0
    _assert_identical(_state(straight.run_dir), _state(run_dir))
    assert "eval_batch_size = 77" in (run_dir / "config.toml").read_text()  # as resumed
    with pytest.raises(tg.ConfigError, match="when resuming"):
        resume_config(run_dir, ["optim.lr=0.1"])
    with pytest.raises(tg.ConfigError, match=r"differs .*optim\.lr"):
        train(tiny("optim.lr=0.1"), resume=run_dir, progress=False)


class _SigintAt(torch.nn.Module):
    """Cross-entropy that sends this process SIGINT during its ``n``-th call."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls, self.ce = n, 0, GloroCrossEntropy()

    def forward(self, logits, y):
        self.calls += 1
        if self.calls == self.n:
            os.kill(os.getpid(), signal.SIGINT)
        return self.ce(logits, y)


def test_sigint_mid_epoch_leaves_exact_checkpoint(tiny, straight, monkeypatch, capsys):
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setitem(LOSSES, "ce", lambda cfg: _SigintAt(6))  # epoch 2, step 2
    first = train(tiny(), progress=False)
    assert first.interrupted == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored
    assert "gloro train --resume" in capsys.readouterr().out
    ck = read_checkpoint(first.run_dir)
    assert (ck.epoch, ck.step) == (1, 2)
    # A mid-epoch checkpoint is still a loadable model file (bound recomputed on use).
    assert torch.isnan(ck.tensors["model._frozen_k_pen"])
    monkeypatch.setitem(LOSSES, "ce", lambda cfg: GloroCrossEntropy())
    second = train(resume_config(first.run_dir, []), resume=first.run_dir, progress=False)
    _assert_identical(_state(straight.run_dir), _state(second.run_dir))


def test_corrupt_checkpoint_is_refused(tiny):
    run_dir = train(tiny(), stop_after=1, progress=False).run_dir
    cfg = resume_config(run_dir, [])
    path = run_dir / "checkpoint.safetensors"
    backup = path.read_bytes()
    path.write_bytes(backup[: len(backup) // 2])
    with pytest.raises(tg.CheckpointError, match="corrupt"):
        train(cfg, resume=run_dir, progress=False)
    path.write_bytes(backup)
    (run_dir / "checkpoint.json").write_text('{"format": "torchgloro-train/1", "epo')
    with pytest.raises(tg.CheckpointError, match="corrupt"):
        train(cfg, resume=run_dir, progress=False)
    assert main(["train", "--resume", str(run_dir)]) == 2  # a clean error, no traceback


def test_disagreeing_pair_is_refused(tiny):
    run_dir = train(tiny(), stop_after=1, progress=False).run_dir
    info = json.loads((run_dir / "checkpoint.json").read_text())
    info["epoch"] = 3
    (run_dir / "checkpoint.json").write_text(json.dumps(info))
    with pytest.raises(tg.CheckpointError, match="disagree"):
        train(resume_config(run_dir, []), resume=run_dir, progress=False)


@pytest.mark.parametrize("stage", ["before_tensors", "after_tensors"])
def test_interrupted_checkpoint_write_resumes_exactly(tiny, straight, stage):
    """A kill while the epoch-2 checkpoint is written. Before the tensors are replaced the
    epoch-1 pair stands (and the pending JSON is dropped); after, the pending JSON completes
    the epoch-2 pair. Either way the run resumes and ends bit-identical to a straight run."""
    ahead = train(tiny(), stop_after=2, progress=False).run_dir  # the pair being written
    run_dir = train(tiny(), stop_after=1, progress=False).run_dir
    shutil.copy(ahead / "metrics.csv", run_dir / "metrics.csv")  # logged before the write
    shutil.copy(ahead / "checkpoint.json", run_dir / "checkpoint.json.next")
    if stage == "after_tensors":
        shutil.copy(ahead / "checkpoint.safetensors", run_dir / "checkpoint.safetensors")
    ck = read_checkpoint(run_dir)  # a reader without the lock (another DDP rank) ...
    assert ck.epoch == (2 if stage == "after_tensors" else 1)
    assert (run_dir / "checkpoint.json.next").exists()  # ... changes nothing on disk
    done = train(resume_config(run_dir, []), resume=run_dir, progress=False)
    assert not (run_dir / "checkpoint.json.next").exists()  # the lock holder tidied up
    _assert_identical(_state(straight.run_dir), _state(done.run_dir))
    rows = read_metrics(done.run_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]


def test_checkpoint_of_another_architecture_is_refused(tiny):
    mine = train(tiny(), stop_after=1, progress=False).run_dir
    other = train(tiny("model.arch=2c2f"), stop_after=1, progress=False).run_dir
    shutil.copy(other / "checkpoint.safetensors", mine / "checkpoint.safetensors")
    with pytest.raises(tg.CheckpointError, match="another architecture"):  # (the config too)
        train(resume_config(mine, []), resume=mine, progress=False)


def test_disk_full_while_checkpointing_keeps_the_last_one(tiny, straight, monkeypatch):
    """An OSError writing epoch 2's checkpoint: a clear error naming the resume command,
    epoch 1's checkpoint intact, and a resume that ends bit-identical to a straight run."""
    from safetensors import SafetensorError

    import torchgloro.io as tg_io

    real, calls = tg_io.save_file, []

    def full_on_second(tensors, filename, *args, **kwargs):  # as safetensors reports it
        calls.extend([1] if ".checkpoint.safetensors." in str(filename) else [])
        if len(calls) == 2:
            raise SafetensorError(
                "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                '"No space left on device" })'
            )
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(tg_io, "save_file", full_on_second)
    with pytest.raises(tg.CheckpointError, match=r"epoch 2 .*No space.*--resume") as err:
        train(tiny(), progress=False)
    monkeypatch.setattr(tg_io, "save_file", real)
    run_dir = err.value.args[0].rsplit("--resume ", 1)[1]
    assert read_checkpoint(run_dir).epoch == 1
    done = train(resume_config(run_dir, []), resume=run_dir, progress=False)
    _assert_identical(_state(straight.run_dir), _state(done.run_dir))
    assert [int(r["epoch"]) for r in read_metrics(done.run_dir / "metrics.csv")] == [1, 2, 3, 4]


class _NanAt(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls, self.ce = n, 0, GloroCrossEntropy()

    def forward(self, logits, y):
        self.calls += 1
        loss = self.ce(logits, y)
        return loss * float("nan") if self.calls >= self.n else loss


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny, monkeypatch, tmp_path):
    monkeypatch.setitem(LOSSES, "ce", lambda cfg: _NanAt(7))  # epoch 2, step 3
    with pytest.raises(TrainingDivergedError, match="epoch 1"):
        train(tiny(), progress=False)
    (run_dir,) = list((tmp_path / "runs").iterdir())
    ck = read_checkpoint(run_dir)
    assert (ck.epoch, ck.step) == (1, 0)
    for k, v in ck.tensors.items():
        if k.startswith(("model.", "optim.")):
            assert torch.isfinite(v).all(), k
    assert len(read_metrics(run_dir / "metrics.csv")) == 1


@pytest.mark.slow
def test_sigint_to_cli_process_exits_cleanly(tmp_path):
    import subprocess
    import sys
    import time

    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torchgloro.cli", "train", "--out", str(out), "--no-progress",
           "--epochs", "500", "--set", "data.train_subset=512"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait for the first epoch's checkpoint
            if list(out.glob("*/checkpoint.json")):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "gloro train --resume" in stdout
    (run_dir,) = list(out.iterdir())
    ck = read_checkpoint(run_dir)
    assert 1 <= ck.epoch < 500
    assert (run_dir / "report.md").is_file()


def test_run_from_an_older_version_resumes(tiny, straight):
    """A checkpoint whose config predates newer keys (their defaults apply) still resumes."""
    run_dir = train(tiny(), stop_after=2, progress=False).run_dir
    ck_json = run_dir / "checkpoint.json"
    info = json.loads(ck_json.read_text())
    for section, key in (
        ("run", "compile_mode"),
        ("run", "compile_backend"),
        ("gloro", "cuda_graphs"),
    ):
        del info["config"][section][key]
    ck_json.write_text(json.dumps(info))
    toml = run_dir / "config.toml"
    toml.write_text(
        "\n".join(
            line
            for line in toml.read_text().splitlines()
            if not line.startswith(("compile_mode", "compile_backend", "cuda_graphs"))
        )
    )
    second = train(resume_config(run_dir, []), resume=run_dir, progress=False)
    assert second.interrupted is None
    _assert_identical(_state(straight.run_dir), _state(run_dir))


def test_a_run_folder_in_use_is_refused(tiny):
    """A second process resuming a run that still trains would interleave its checkpoints
    and metrics rows (metrics.csv read 1,2,3,3,4,4,...): the folder is locked."""
    from torchgloro.train._runtime import RunFolderBusyError, RunLock

    run_dir = train(tiny(), stop_after=1, progress=False).run_dir
    held = RunLock(run_dir)  # another open file description: conflicts like another process
    try:
        with pytest.raises(RunFolderBusyError, match="in use by another training process"):
            train(resume_config(run_dir, []), resume=run_dir, progress=False)
        assert main(["train", "--resume", str(run_dir)]) == 2  # a clean error
    finally:
        held.release()
    done = train(resume_config(run_dir, []), resume=run_dir, progress=False)
    assert done.epochs_done == 4
    RunLock(run_dir).release()  # and the finished run let go of it


def test_resume_finishes_an_interrupted_final_evaluation(tiny, straight):
    """Killed during the final evaluation (after the last checkpoint), a run used to say
    'nothing to resume' and never got its report; resuming now runs the evaluation."""
    from torchgloro.train.report import has_final_results, write_report

    run_dir = straight.run_dir
    assert has_final_results(run_dir)
    assert train(resume_config(run_dir, []), resume=run_dir, progress=False).final == {}
    write_report(run_dir, read_metrics(run_dir / "metrics.csv"), "", None)  # as if killed
    assert not has_final_results(run_dir)
    again = train(resume_config(run_dir, []), resume=run_dir, progress=False)
    assert again.final["vra_sound"] == straight.final["vra_sound"]
    assert again.final["clean"] == straight.final["clean"]
    assert has_final_results(run_dir)
    assert [int(r["epoch"]) for r in read_metrics(run_dir / "metrics.csv")] == [1, 2, 3, 4]


def test_a_damaged_metrics_file(tiny):
    """A row cut short by a kill (the last one: its epoch had no checkpoint yet) is redone
    on resume; damage anywhere else is a clear error, not a TypeError."""
    run_dir = train(tiny(), stop_after=2, progress=False).run_dir
    path = run_dir / "metrics.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[-1].replace("2,", "3,", 1)[:12]]) + "\n")
    done = train(resume_config(run_dir, []), resume=run_dir, progress=False)
    assert [int(r["epoch"]) for r in read_metrics(path)] == [1, 2, 3, 4]
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:10]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(tg.CheckpointError, match="damaged at data row 1"):
        read_metrics(path)
    assert done.epochs_done == 4


def test_resume_with_another_number_of_ranks_warns(tiny, capsys):
    run_dir = train(tiny(), stop_after=1, progress=False).run_dir
    info = json.loads((run_dir / "checkpoint.json").read_text())
    info["world_size"] = 2
    (run_dir / "checkpoint.json").write_text(json.dumps(info))
    capsys.readouterr()
    train(resume_config(run_dir, []), resume=run_dir, progress=False)
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().out


def test_every_checkpoint_rename_is_followed_by_a_folder_fsync(tiny, monkeypatch):
    """A rename is durable only once its folder is synced: without it a power loss can bring
    back the old name (or none) even though the file contents were fsynced."""
    import stat

    events = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src, dst):
        real_replace(src, dst)
        st = os.stat(os.path.dirname(os.path.abspath(dst)))
        events.append(("replace", (st.st_dev, st.st_ino)))

    def fsync(fd):
        real_fsync(fd)
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            events.append(("fsync_dir", (st.st_dev, st.st_ino)))

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    run_dir = train(tiny(), stop_after=1, progress=False).run_dir
    renames = [k for k, e in enumerate(events) if e[0] == "replace"]
    assert len(renames) >= 3  # checkpoint.json.next, the tensors, checkpoint.json, ...
    for k in renames:
        assert events[k + 1] == ("fsync_dir", events[k][1]), events[k : k + 2]
    st = os.stat(run_dir)
    assert ("fsync_dir", (st.st_dev, st.st_ino)) in events


def test_a_run_on_a_relative_npz_path_resumes_from_another_folder(tiny, tmp_path, monkeypatch):
    """Found by a review: `npz:ok.npz` was saved as given, so the run could not be resumed
    (or certified) from any other folder, and the path could not be changed on resume."""
    import numpy as np

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    y = np.arange(300) % 10
    x = rng.integers(0, 256, (300, 8, 8), dtype=np.uint8)
    np.savez(data / "ok.npz", train_x=x, train_y=y, test_x=x, test_y=y)
    monkeypatch.chdir(data)
    cfg = tiny("data.name=npz:ok.npz", "data.train_subset=0", "data.val_size=50")
    run_dir = train(cfg, stop_after=1, progress=False).run_dir
    saved = (run_dir / "config.toml").read_text()
    assert f'name = "npz:{data / "ok.npz"}"' in saved
    monkeypatch.chdir(tmp_path)
    done = train(resume_config(run_dir, []), resume=run_dir, progress=False)
    assert done.epochs_done == 4 and not done.interrupted


def test_resume_accepts_the_runs_own_values_and_warns_about_a_lost_log(tiny, capsys):
    """Found by a review: `--resume RUN --epochs 4` on a 4-epoch run was refused, and a
    missing metrics.csv silently dropped the earlier epochs from the log."""
    run_dir = train(tiny(), stop_after=2, progress=False).run_dir
    assert resume_config(run_dir, ["run.epochs=4"]).run.epochs == 4  # its own value
    with pytest.raises(tg.ConfigError, match="Cannot change run.epochs"):
        resume_config(run_dir, ["run.epochs=5"])
    (run_dir / "metrics.csv").unlink()
    capsys.readouterr()
    done = train(resume_config(run_dir, []), resume=run_dir, progress=False)
    assert "holds 0 of the 2 epochs before the checkpoint" in capsys.readouterr().err
    assert [int(r["epoch"]) for r in read_metrics(run_dir / "metrics.csv")] == [3, 4]
    assert done.epochs_done == 2


def test_a_mid_epoch_checkpoint_certifies_at_epsilon_test(tiny):
    """Found by a review: a checkpoint written mid-epoch held the schedule's ε_train as the
    model's ε, so `tg.load` of an interrupted run certified at 0.5 instead of 0.3."""
    cfg = tiny("gloro.epsilon_train=0.5", "gloro.epsilon_test=0.3")
    run_dir = train(cfg, stop_after=1.5, progress=False).run_dir
    assert read_checkpoint(run_dir).step == 2  # mid-epoch
    assert tg.load(run_dir / "checkpoint.safetensors").epsilon == pytest.approx(0.3)
    done = train(resume_config(run_dir, []), resume=run_dir, progress=False)
    straight = train(tiny("gloro.epsilon_train=0.5", "gloro.epsilon_test=0.3"), progress=False)
    _assert_identical(_state(straight.run_dir), _state(done.run_dir))


class _SlowCE(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ce = GloroCrossEntropy()

    def forward(self, logits, y):
        import time

        time.sleep(0.5)
        return self.ce(logits, y)


def test_a_resumed_epoch_counts_its_time_before_the_stop(tiny, monkeypatch):
    """Found by a review: the metrics row of an epoch resumed mid-way counted only the
    resumed part's seconds."""
    monkeypatch.setitem(LOSSES, "ce", lambda cfg: _SlowCE())
    first = train(tiny(), stop_after=1.5, progress=False)  # epoch 2: 2 slow steps, then stop
    assert read_checkpoint(first.run_dir).info["partial_seconds"] >= 1.0
    monkeypatch.setitem(LOSSES, "ce", lambda cfg: GloroCrossEntropy())
    done = train(resume_config(first.run_dir, []), resume=first.run_dir, progress=False)
    rows = read_metrics(done.run_dir / "metrics.csv")
    assert rows[1]["epoch"] == 2 and rows[1]["seconds"] >= 1.0
    assert rows[2]["seconds"] < rows[1]["seconds"]  # a fresh epoch starts from zero


def test_cli_reports_os_errors_in_one_line(monkeypatch, tmp_path, capsys):
    """The CLI turns an OSError (here the report, written at the end) into one line."""
    import torchgloro.train._run as run_mod

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "report.md")

    monkeypatch.setattr(run_mod, "write_report", denied)
    sets = ["data.train_subset=256", "run.epochs=1", f"run.out={tmp_path / 'cli'}"]
    argv = ["train", "--no-progress", *[a for s in sets for a in ("--set", s)]]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "gloro train: error: [Errno 13] Permission denied: 'report.md'" in err
    assert "operating-system error" in err and "Traceback" not in err
