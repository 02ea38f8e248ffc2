"""``tg.evaluate(net, data, ...)``: ``gloro evaluate``'s figures on a user's own data."""

from __future__ import annotations

import pytest
import torch

import torchgloro as tg
from torchgloro import GloroInputError


def test_figures_match_the_nets_own_certificates(trained_digits_net):
    net, _, test = trained_digits_net
    x, y = test.x[:120], test.y[:120]
    ev = tg.evaluate(net, (x, y), progress=False)
    cert = net.certify(x, mode="sound", precision="float64")
    correct = cert.pred == y
    assert ev.n == 120 and ev.epsilon == net.epsilon and ev.pgd_accuracy is None
    assert ev.vra == pytest.approx(float((correct & cert.certified).double().mean()))
    assert ev.certified == pytest.approx(float(cert.certified.double().mean()))
    assert ev.clean_accuracy == pytest.approx(
        float((net.backbone(x).argmax(1) == y).double().mean())
    )
    assert "pgd" not in ev.details and ev.details["metrics"]["vra_fast"] >= 0
    assert f"VRA {100 * ev.vra:.2f}%" in str(ev)


def test_pgd_and_other_data_forms(trained_digits_net):
    net, _, test = trained_digits_net
    data = torch.utils.data.TensorDataset(test.x[:60], test.y[:60].int())  # int32 labels
    ev = tg.evaluate(net, data, attack="pgd", epsilon=0.2, pgd_steps=4, progress=False)
    assert ev.epsilon == 0.2 and ev.details["pgd"]["steps"] == 4
    assert ev.vra <= ev.pgd_accuracy <= ev.clean_accuracy
    pairs = [(test.x[i], int(test.y[i])) for i in range(60)]  # a map-style Dataset
    assert tg.evaluate(net, pairs, epsilon=0.2, progress=False).vra == ev.vra


def test_unknown_options_and_float_labels_are_refused(trained_digits_net):
    net, _, test = trained_digits_net
    with pytest.raises(GloroInputError, match="unknown option.*pgd_step.*the options are"):
        tg.evaluate(net, test, pgd_step=3)
    with pytest.raises(GloroInputError, match="integer"):
        tg.evaluate(net, (test.x, test.y.float()), progress=False)
