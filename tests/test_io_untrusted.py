"""Model files are untrusted input (issue #30, item 6): metadata and tensors are checked
before anything is built or trusted."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import torchgloro as tg
from torchgloro._model_file import metadata_digest


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small trained-looking net (converged fast bound) saved to a file."""
    torch.manual_seed(0)
    net = tg.GloroNet(tg.create_model("minicnn", (1, 8, 8), 10), 0.5).eval()
    path = tmp_path_factory.mktemp("io") / "m.safetensors"
    net.save(path)
    return path


def _rewrite(src, dst, edit_meta=None, edit_tensors=None, keep_digest=False):
    """A copy of ``src`` edited; crafted (its digest recomputed) unless ``keep_digest``."""
    with safe_open(str(src), "pt") as f:
        info = json.loads(f.metadata()["torchgloro"])
    tensors = load_file(str(src))
    if edit_meta:
        edit_meta(info)
        if not keep_digest:
            info["digest"] = metadata_digest(info)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata={"torchgloro": json.dumps(info)})
    return dst


def _frozen_key(tensors):
    return next(k for k in tensors if k.endswith("_frozen_k_pen"))


def test_an_untouched_file_loads(saved, tmp_path):
    net = tg.load(_rewrite(saved, tmp_path / "same.safetensors"))
    assert net.epsilon == 0.5 and not net.is_stale


def test_a_lowered_frozen_bound_is_refused(saved, tmp_path):
    """Scaling the stored K by 1e-3 turned 0% fast VRA into 14%."""

    def lower(t):
        t[_frozen_key(t)] = t[_frozen_key(t)] * 1e-3

    bad = _rewrite(saved, tmp_path / "k.safetensors", edit_tensors=lower)
    with pytest.raises(tg.CheckpointError, match="frozen Lipschitz bound"):
        tg.load(bad)


def test_iterates_scaled_with_the_frozen_bound_are_refused(saved, tmp_path):
    """Scaling every iterate and the stored K alike keeps them consistent: the iterates'
    norms (1 after every power iteration) give it away."""

    def scale(t):
        for k in t:
            if k.endswith(".u"):
                t[k] = t[k] * 1e-3
        t[_frozen_key(t)] = t[_frozen_key(t)] * 1e-3

    bad = _rewrite(saved, tmp_path / "u.safetensors", edit_tensors=scale)
    with pytest.raises(tg.CheckpointError, match="iterate"):
        tg.load(bad)


def test_a_weight_with_another_dtype_is_refused(saved, tmp_path):
    """An I32 weight where the model has F32 was cast and loaded."""

    def to_int(t):
        k = next(k for k in t if k.endswith("weight"))
        t[k] = t[k].to(torch.int32)

    bad = _rewrite(saved, tmp_path / "d.safetensors", edit_tensors=to_int)
    with pytest.raises(tg.CheckpointError, match=r"dtype.*int32.*float32"):
        tg.load(bad)


def test_a_huge_input_shape_is_refused_before_allocating(saved, tmp_path, monkeypatch):
    """``in_shape [1, 20000, 20000]`` asked for a 1.28 TB allocation."""

    def huge(info):
        info["gloro"]["in_shape"] = info["model"]["in_shape"] = [1, 20000, 20000]

    bad = _rewrite(saved, tmp_path / "s.safetensors", edit_meta=huge)
    start = time.perf_counter()
    with pytest.raises(tg.CheckpointError, match="in_shape"):
        tg.load(bad)
    assert time.perf_counter() - start < 10


def test_a_huge_model_option_is_refused_before_allocating(saved, tmp_path, monkeypatch):
    """A width the file's tensors do not have is found on the meta device, not by building:
    the 4 GB head that ``num_classes = 10**7`` asks for is never allocated."""

    def wide(info):
        info["model"]["num_classes"] = 10**7

    real_empty = torch.empty

    def guarded_empty(*size, **kwargs):
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        device = torch.device(kwargs.get("device") or torch.get_default_device())
        assert device.type == "meta" or math.prod(shape) < 10**8, f"allocated {shape}"
        return real_empty(*size, **kwargs)

    bad = _rewrite(saved, tmp_path / "w.safetensors", edit_meta=wide)
    monkeypatch.setattr(torch, "empty", guarded_empty)
    with pytest.raises(tg.CheckpointError, match="does not match"):
        tg.load(bad)


def _drop(section, key):
    def edit(info):
        del info[section][key]

    return edit


def _put(section, key, value):
    def edit(info):
        info[section][key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (_drop("gloro", "epsilon"), "epsilon"),
        (_put("gloro", "epsilon", "abc"), "epsilon"),
        (_put("gloro", "epsilon", True), "epsilon"),
        (_drop("gloro", "in_shape"), "in_shape"),
        (_put("gloro", "in_shape", "x"), "in_shape"),
        (_put("gloro", "in_shape", [1, -8, 8]), "in_shape"),
        (_put("gloro", "power_iterations", -1), "power_iterations"),
        (_put("gloro", "power_iterations", "ten"), "power_iterations"),
        (_put("gloro", "lipschitz", "foo"), "lipschitz"),
        (_drop("model", "name"), "name"),
        (_put("model", "name", 5), "name"),
        (_put("model", "num_classes", "10"), "num_classes"),
        (_put("model", "in_shape", None), "in_shape"),
        (_put("model", "width", [1, 2]), "width"),
    ],
)
def test_missing_or_mistyped_metadata_is_a_clear_error(saved, tmp_path, edit, field):
    """These raised raw KeyError, TypeError or ValueError."""
    bad = _rewrite(saved, tmp_path / "m.safetensors", edit_meta=edit)
    with pytest.raises(tg.CheckpointError, match=field):
        tg.load(bad)


@pytest.mark.parametrize(
    "edit", [_put("model", "activation", "minmax"), _put("gloro", "lipschitz", "basic")]
)
def test_edited_settings_are_refused(saved, tmp_path, edit):
    """An edited activation or lipschitz field loaded a different network silently."""
    bad = _rewrite(saved, tmp_path / "e.safetensors", edit_meta=edit, keep_digest=True)
    with pytest.raises(tg.CheckpointError, match="modified"):
        tg.load(bad)
