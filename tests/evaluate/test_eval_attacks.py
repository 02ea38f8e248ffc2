"""ℓ2 PGD: it breaks a standard model, matches ART, and is optimal on a linear model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchgloro as tg
from torchgloro.evaluate.attacks import pgd_l2


def _test_points(n=200):
    test = tg.data.get_dataset("digits", "test")
    return test.x[:n], test.y[:n]


def test_pgd_breaks_standard_model_and_stays_in_ball(standard_digits_net):
    f = standard_digits_net.backbone
    x, y = _test_points()
    clean = float((f(x).argmax(1) == y).double().mean())
    res = pgd_l2(f, x, y, epsilon=1.0, steps=20, seed=0)
    assert clean > 0.9
    assert res.accuracy < clean - 0.4
    norms = torch.linalg.vector_norm((res.x_adv.double() - x.double()).flatten(1), dim=1)
    assert float(norms.max()) <= 1.0 and res.max_norm <= 1.0
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    again = pgd_l2(f, x, y, epsilon=1.0, steps=20, seed=0)
    assert torch.equal(again.x_adv, res.x_adv)  # same seed, same attack
    # fooled is truthful: every point reported broken really is misclassified.
    with torch.no_grad():
        wrong = f(res.x_adv).argmax(1) != y
    assert torch.equal(wrong, res.fooled)


def test_pgd_agrees_with_art(standard_digits_net):
    pytest.importorskip("art")
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    f = standard_digits_net.backbone
    x, y = _test_points()
    clf = PyTorchClassifier(
        model=f,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(1, 8, 8),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    for eps in (0.3, 0.6):
        ours = pgd_l2(f, x, y, epsilon=eps, steps=20, seed=0).accuracy
        np.random.seed(0)
        atk = ProjectedGradientDescent(
            clf,
            norm=2,
            eps=eps,
            eps_step=2.5 * eps / 20,
            max_iter=20,
            num_random_init=1,
            batch_size=256,
            verbose=False,
        )
        x_art = atk.generate(x.numpy())
        art_acc = float((clf.predict(x_art).argmax(1) == y.numpy()).mean())
        # Ours keeps the worst iterate of every step, so it is at least as strong, give or take
        # random starts; both must agree within a few points.
        assert ours <= art_acc + 0.02, (eps, ours, art_acc)
        assert abs(ours - art_acc) <= 0.06, (eps, ours, art_acc)


def test_pgd_is_optimal_on_a_linear_binary_model():
    """For f(x) = Wx + b with 2 classes, the smallest ℓ2 perturbation that flips x has norm
    |margin| / ‖w_1 − w_0‖: PGD (unclamped) must break exactly the points closer than ε."""
    torch.manual_seed(0)
    d = 20
    f = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, 2))
    x = torch.randn(400, 1, 4, 5)
    y = (torch.rand(400) < 0.5).long()
    with torch.no_grad():
        logits = f(x)
        w = f[1].weight
        margin = logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, 1 - y[:, None]).squeeze(
            1
        )
        dist = margin / torch.linalg.vector_norm(w[1] - w[0])  # signed distance to the boundary
    eps = float(dist.abs().median())
    robust = dist > eps  # correct and at least ε from the boundary
    # From x itself, every step follows ±(w_1 − w_0) exactly: the optimal attack.
    res = pgd_l2(f, x, y, epsilon=eps, steps=10, clip=None, random_start=False)
    borderline = (dist - eps).abs() < 1e-4 * eps
    assert torch.equal((~res.fooled)[~borderline], robust[~borderline])
    # From a random start the iterate approaches the optimum; no attack can beat it.
    res = pgd_l2(f, x, y, epsilon=eps, steps=30, clip=None, seed=0)
    assert bool((robust & ~borderline <= ~res.fooled).all())
    assert res.accuracy == pytest.approx(float(robust.double().mean()), abs=0.03)
