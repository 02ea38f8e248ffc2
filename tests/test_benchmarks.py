"""The benchmarks' --quick mode runs and writes a JSON with the expected keys.

No speed assertions, ever: timings on shared machines are noise for a test.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a top-level package of the checkout
    sys.path.insert(0, str(REPO))

PROVENANCE = {"command", "git_commit", "device", "torch", "threads", "date", "quick"}

pytestmark = pytest.mark.slow


def _run(module, tmp_path):
    module.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)])
    name = module.__name__.rsplit(".", 1)[1]
    path = tmp_path / f"{name}-cpu-quick.json"
    assert path.exists()
    data = json.loads(path.read_text())
    assert data["benchmark"] == name
    assert PROVENANCE <= set(data["provenance"])
    assert data["provenance"]["threads"] == 1 and data["provenance"]["quick"] is True
    return data


def test_train_overhead_quick(tmp_path):
    from benchmarks import train_overhead

    data = _run(train_overhead, tmp_path)
    assert [r["arch"] for r in data["results"]] == ["2c2f", "4c3f", "6c2f"]
    for r in data["results"]:
        assert {"ratio_time", "ratio_peak_memory", "ratio_saved_for_backward"} <= set(r)
        for k in ("standard", "gloro"):
            assert {"sec_per_step_median", "sec_per_epoch",
                    "peak_mem_growth_per_instance_bytes",
                    "saved_for_backward_per_instance_bytes"} <= set(r[k])  # fmt: skip


def test_certify_overhead_quick(tmp_path):
    from benchmarks import certify_overhead

    data = _run(certify_overhead, tmp_path)
    for r in data["results"]:
        assert {"ratio_fast_over_f32_inference", "ratio_sound_over_f32_inference",
                "ratio_sound_float64_over_f64_inference", "sound_state_seconds_median",
                "inference_f32", "certify_fast", "certify_sound", "inference_f64",
                "certify_sound_float64"} <= set(r)  # fmt: skip


def test_scaling_quick(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import scaling

    data = _run(scaling, tmp_path)
    assert data["by_batch_size"] and data["by_width"]
    assert {"batch_size", "ratio", "gloro_sec_per_step", "standard_sec_per_step"} <= set(
        data["by_batch_size"][0]
    )
    assert (tmp_path / "scaling-cpu-quick.png").exists()


def test_conv_backend_quick(tmp_path):
    from benchmarks import conv_backend

    data = _run(conv_backend, tmp_path)
    assert [r["arch"] for r in data["results"]] == ["minicnn", "2c2f"]
    two = data["results"][1]
    assert len(two["layers"]) == 2  # 2C2F's two convolutions
    assert all(r["rule_picks"] == "native" for r in two["layers"])  # both are small
    assert {"sec_per_iteration_onednn", "sec_per_iteration_native", "macs"} <= set(two["layers"][0])


def test_record_run_summarizes_a_run_folder(tmp_path):
    from benchmarks import record_run

    run = tmp_path / "mnist-2c2f-plus-20260101-000000"
    run.mkdir()
    (run / "config.toml").write_text('[run]\nname = "mnist-2c2f-plus"\nepochs = 2\n')
    (run / "metrics.csv").write_text("epoch,test_vra,seconds\n1,0.5,10.0\n2,0.75,12.0\n")
    metrics = {"vra_sound": 0.75, "clean_accuracy": 0.9}
    (run / "evaluation.json").write_text(json.dumps({"epsilon": 0.3, "metrics": metrics}))
    out = record_run.main(
        [str(run), "--name", "x-cpu", "--train-command", "gloro train mnist-2c2f-plus",
         "--eval-command", "gloro evaluate RUN", "--commit", "abc123", "--out-dir",
         str(tmp_path / "results")]
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert out == tmp_path / "results" / "x-cpu.json"
    assert data["git_commit"] == "abc123" and data["recipe"] == "mnist-2c2f-plus"
    assert data["epochs"] == 2 and data["train_seconds_total"] == 22.0
    assert data["final_epoch"]["test_vra"] == "0.75"
    assert data["evaluation"]["metrics"] == metrics and data["date"]
    # The same folder without its evaluation: a timing record, with a note and no metrics.
    (run / "evaluation.json").unlink()
    out = record_run.main(
        [str(run), "--name", "t-cpu", "--train-command", "gloro train mnist-2c2f-plus",
         "--note", "timing only", "--out-dir", str(tmp_path / "results")]
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert data["evaluation"] is None and data["note"] == "timing only"
    assert data["eval_command"] is None and data["sec_per_epoch_median"] == 12.0
    # A subset evaluation is recorded when named; an eval command without its file is refused.
    (run / "evaluation-first100.json").write_text(json.dumps({"n": 100, "metrics": metrics}))
    base = [str(run), "--train-command", "t", "--eval-command", "e", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        record_run.main([*base, "--name", "full"])  # no evaluation.json
    out = record_run.main([*base, "--name", "sub", "--evaluation", "evaluation-first100.json"])
    assert json.loads(out.read_text())["evaluation"]["n"] == 100


def test_activation_cost_quick(tmp_path):
    from benchmarks import activation_cost

    data = _run(activation_cost, tmp_path)
    assert [r["arch"] for r in data["results"]] == ["2c2f", "4c3f"]
    for r in data["results"]:
        assert set(r["sec_per_step_median"]) == {"minmax", "minmax_autograd", "relu"}
        saved = r["saved_for_backward_per_instance_bytes"]
        # MinMax keeps a 1-byte weight per activation; plain autograd keeps the 4-byte input
        assert saved["relu"] < saved["minmax"] < saved["minmax_autograd"]


def test_bound_tightness_quick(tmp_path):
    from benchmarks import bound_tightness

    data = _run(bound_tightness, tmp_path)
    assert [r["bound"] for r in data["layers"]] == ["Conv2dBound"] * 2 + ["DenseBound"]
    for r in data["layers"]:
        # Power iteration only ever under-estimates a norm; the proven bound must sit above it.
        assert r["long_iteration_estimate"] <= r["sound_upper"] * (1 + 1e-6)
        assert r["frozen_estimate"] <= r["sound_upper"] * (1 + 1e-6)
    assert data["global_ub_sound"] >= data["global_ub_fast"] * (1 - 1e-6)


def test_certify_decisions_quick(tmp_path):
    from benchmarks import certify_decisions

    data = _run(certify_decisions, tmp_path)
    assert [r["batch"] for r in data["rows"]] == [256, 1000]
    for r in data["rows"]:
        assert r["certified_radius_us"] > 0 and r["may_certify_us"] > 0
    assert data["eval_mode_on_eval_net_us"] > 0


def test_sound_bound_cost_quick(tmp_path):
    from benchmarks import sound_bound_cost

    data = _run(sound_bound_cost, tmp_path)
    (row,) = data["results"]
    assert row["arch"] == "2c2f" and row["sound_state_seconds"] > 0
    names = [x["layer"].split("(")[0] for x in row["layers"]]
    assert names == ["Conv2d", "ReLU", "Conv2d", "ReLU", "Flatten", "Linear", "ReLU"]
    assert all(x["bound"] == 1.0 for x in row["layers"] if x["layer"] in ("ReLU", "Flatten"))
    assert all(x["bound"] > 0.5 for x in row["layers"])  # Glorot layers: norms of order 1


def test_epoch_overhead_quick(tmp_path):
    """Two runs of the trainer (standard and GloRo) alternate whole epochs on real data."""
    from benchmarks import epoch_overhead

    epoch_overhead.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path),
                         "--recipe", "digits-minicnn-gloro"])  # fmt: skip
    data = json.loads((tmp_path / "epoch_overhead-digits-minicnn-gloro-cpu-quick.json").read_text())
    assert PROVENANCE <= set(data["provenance"])
    assert set(data["sec_per_epoch_all"]) == {"standard", "gloro"}
    assert all(len(v) == 2 for v in data["sec_per_epoch_all"].values())  # --quick: 2 rounds
    assert data["steps_per_epoch"] == 1024 // 256 and data["ratio_time"] > 0


def _peer_record(threads, side, seconds, samples=100):
    binding = {"cpus": list(range(threads))}
    return {"threads": threads, "side": side, "epoch_seconds": [9.0, seconds],
            "train_samples": samples, "steps_per_epoch": 1, "binding": binding}  # fmt: skip


def test_peer_tf_gloro_arguments_and_summary():
    from benchmarks import peer_tf_gloro as P

    args = P.parse_args([])
    assert args.threads == [1, 2] and args.reps == 3 and not args.quick
    assert P.parse_args(["--quick"]).reps == 1
    for bad in (["--threads", "0"], ["--reps", "0"], ["--threads", "100000"]):
        with pytest.raises(SystemExit):
            P.parse_args(bad)
    tf = [_peer_record(1, "tf_gloro", s) for s in (6.0, 6.4, 6.2)]
    ours = [_peer_record(1, "torchgloro", s) for s in (3.0, 4.0, 3.5)]
    (row,) = P.summarize(tf + ours)
    assert row["threads"] == 1
    assert row["tf_gloro"]["epoch_seconds"] == [6.0, 6.4, 6.2]  # the second epoch of each
    assert row["tf_gloro"]["first_epoch_seconds"] == [9.0] * 3
    assert row["tf_gloro"]["median"] == 6.2 and row["torchgloro"]["median"] == 3.5
    assert row["ratio_torchgloro_over_tf"] == pytest.approx(3.5 / 6.2)
    assert row["meets_target"] and not P.summarize(tf + ours, target=0.5)[0]["meets_target"]
    mismatched = [_peer_record(2, "tf_gloro", 1.0, 100), _peer_record(2, "torchgloro", 1.0, 99)]
    with pytest.raises(RuntimeError, match="different data"):
        P.summarize(mismatched)


def test_peer_tf_gloro_names_the_setup_script_without_its_venv(tmp_path):
    from benchmarks import peer_tf_gloro as P

    argv = ["--quick", "--peer-python", str(tmp_path / "nope"), "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="peer_tf_gloro_setup.sh"):
        P.main(argv)
    assert not list(tmp_path.iterdir())


def test_peer_torch_worker_runs_the_trainer_epoch_pinned(tmp_path):
    from benchmarks import _common as C
    from benchmarks import peer_tf_gloro as P

    if not C.MNIST_ROOT.exists():
        pytest.skip(f"MNIST not at {C.MNIST_ROOT} (set BENCH_MNIST)")
    out = tmp_path / "torch.json"
    cmd = [sys.executable, "-m", "benchmarks._peer_torch_worker", "--recipe", P.RECIPE,
           "--data-root", str(C.MNIST_ROOT), "--out", str(out), "--threads", "1",
           "--train-subset", "512"]  # fmt: skip
    rec = P._spawn(cmd, 1, P._torch_env(), tmp_path / "torch.log", out)
    assert rec["side"] == "torchgloro" and len(rec["epoch_seconds"]) == 2
    assert rec["train_samples"] == 512 and rec["steps_per_epoch"] == 2  # batch 256
    assert len(rec["binding"]["cpus"]) == 1 and rec["binding"]["OMP_NUM_THREADS"] == "1"
    assert rec["binding"]["torch_threads"] == 1 and math.isfinite(rec["final_loss"])


def test_peer_tf_gloro_quick(tmp_path):
    from benchmarks import peer_tf_gloro as P

    if not P.PEER_PYTHON.exists():
        pytest.skip(f"no peer venv at {P.PEER_PYTHON}: bash benchmarks/peer_tf_gloro_setup.sh")
    P.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "peer_tf_gloro-cpu-quick.json").read_text())
    assert PROVENANCE <= set(data["provenance"]) and data["provenance"]["threads"] == [1]
    assert data["peer"]["tensorflow"].startswith("2.15") and data["peer"]["gloro"] == "1.1.1"
    (row,) = data["results"]
    for side in ("tf_gloro", "torchgloro"):
        assert row[side]["train_samples"] == P.QUICK_SUBSET and row[side]["steps_per_epoch"] == 10
        assert len(row[side]["epoch_seconds"]) == 1
    assert row["tf_gloro"]["binding"]["intra_op_threads"] == 1
    assert row["ratio_torchgloro_over_tf"] > 0
