"""ONNX: ``tg.deploy(net)`` exported by ``torch.onnx.export`` answers in onnxruntime as in
PyTorch. Needs the ``[onnx]`` extra (also in ``[test]``, so CI runs it)."""

from __future__ import annotations

import pytest
import torch

import torchgloro as tg

_EXTRA = "the [onnx] extra is not installed: pip install -e '.[onnx]'"
ort = pytest.importorskip("onnxruntime", reason=_EXTRA)
pytest.importorskip("onnxscript", reason=_EXTRA)  # torch.onnx.export's default exporter


def test_a_deployed_net_runs_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    net = tg.GloroNet(tg.create_model("minicnn", (1, 8, 8), 10), epsilon=0.3).eval()
    deployed = tg.deploy(net)  # the proven K, rounded up to float32
    path = tmp_path / "gloro.onnx"
    torch.onnx.export(
        deployed, (torch.rand(4, 1, 8, 8),), path, input_names=["x"], output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(9, 1, 8, 8)  # another batch size than the export's
    (out,) = session.run(None, {"x": x.numpy()})
    want = deployed(x)
    assert out.shape == (9, 11)  # C logits, then ⊥
    torch.testing.assert_close(torch.from_numpy(out), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.from_numpy(out).argmax(1), want.argmax(1))  # argmax C: abstain
