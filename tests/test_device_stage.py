"""benchmarks/device_stage.py: a file carried to the device machine in parts comes back whole."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a top-level package of the checkout
    sys.path.insert(0, str(REPO))

from benchmarks import device_stage  # noqa: E402


@pytest.fixture
def blob(tmp_path):
    src = tmp_path / "data.npz"
    src.write_bytes(os.urandom(5 * (1 << 20) + 123))  # 5 MiB + a tail: a short last part
    return src


def test_split_then_join_gives_the_same_bytes(blob, tmp_path):
    stage = tmp_path / "stage"
    parts = device_stage.split(blob, stage, part_mib=2)
    assert [p.stat().st_size for p in parts] == [2 << 20, 2 << 20, (1 << 20) + 123]
    out, missing = device_stage.join(stage)
    assert missing == [] and out.read_bytes() == blob.read_bytes()
    assert not any(p.exists() for p in parts)  # removed once joined
    assert device_stage.join(stage) == (out, [])  # a later call finds it already there


def test_join_waits_for_missing_parts(blob, tmp_path):
    stage = tmp_path / "stage"
    parts = device_stage.split(blob, stage, part_mib=2)
    parts[1].unlink()  # not carried yet
    assert device_stage.join(stage) == (None, [parts[1].name])
    assert not (stage / blob.name).exists()


def test_a_corrupt_part_is_refused_and_kept(blob, tmp_path):
    stage = tmp_path / "stage"
    parts = device_stage.split(blob, stage, part_mib=2)
    raw = bytearray(parts[2].read_bytes())
    raw[7] ^= 1
    parts[2].write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"part02: corrupt"):
        device_stage.join(stage)
    assert all(p.exists() for p in parts) and not (stage / blob.name).exists()


def test_cli_prints_one_call_per_part(blob, tmp_path, capsys):
    stage = tmp_path / "stage"
    assert device_stage.main(["split", str(blob), str(stage), "--part-mib", "2"]) == 0
    calls = [ln for ln in capsys.readouterr().out.splitlines() if "run(command=" in ln]
    assert len(calls) == 3 and all("manifest.json" in c for c in calls)
    assert device_stage.main(["join", str(stage)]) == 0
    assert "joined:" in capsys.readouterr().out
