"""Save/load round trips; corrupt and mismatched checkpoints give clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import torchgloro as tg


def test_save_load_round_trip(tmp_path, trained_digits_net):
    net, _, test = trained_digits_net
    path = tmp_path / "m.safetensors"
    net.save(path)
    net2 = tg.load(path)
    assert not net2.training and not net2.is_stale
    assert net2.epsilon == pytest.approx(net.epsilon)
    for (k, a), (_, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert torch.equal(a, b), k
    c1, c2 = net.certify(test.x[:64]), net2.certify(test.x[:64])
    assert torch.equal(c1.certified, c2.certified) and torch.equal(c1.radius, c2.radius)
    raw = path.read_bytes()
    assert b"torchgloro/1" in raw and b"pickle" not in raw


def test_corrupt_and_missing_files(tmp_path, trained_digits_net):
    net, _, _ = trained_digits_net
    path = tmp_path / "m.safetensors"
    net.save(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(tg.CheckpointError, match="corrupt"):
        tg.load(path)
    with pytest.raises(tg.CheckpointError, match="not found"):
        tg.load(tmp_path / "nope.safetensors")
    with pytest.raises(tg.CheckpointError, match="No model file"):
        tg.load(tmp_path)


def test_other_architecture_is_refused(tmp_path, trained_digits_net):
    net, _, _ = trained_digits_net
    path = tmp_path / "m.safetensors"
    net.save(path)
    other = tg.create_model("2c2f", (1, 28, 28), 10)
    with pytest.raises(tg.CheckpointError, match="does not match this architecture"):
        tg.load(path, backbone=other)


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch, trained_digits_net):
    net, _, _ = trained_digits_net
    path = tmp_path / "m.safetensors"
    net.save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("torchgloro.io.save_file", boom)
    with pytest.raises(OSError):
        net.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_metadata_is_json(tmp_path, trained_digits_net):
    from safetensors import safe_open

    net, _, _ = trained_digits_net
    net.save(tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["torchgloro"])
    assert meta["model"]["name"] == "minicnn" and meta["gloro"]["lipschitz"] == "margin"


def test_a_file_whose_epsilon_tensor_disagrees_with_its_metadata_is_refused(tmp_path):
    """The ε buffer in the tensors is what certify uses; a file whose tensor says −1 (every
    point, ties included, passed 'radius > −1') loaded silently before."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    net = tg.GloroNet(tg.create_model("minicnn", (1, 8, 8), 10), 0.5)
    path = tmp_path / "m.safetensors"
    net.save(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("_epsilon"))
    tensors[key] = torch.tensor(-1.0)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(tg.CheckpointError, match="epsilon"):
        tg.load(bad)
    assert tg.load(path).epsilon == 0.5
