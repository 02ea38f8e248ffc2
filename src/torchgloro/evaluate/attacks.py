"""ℓ2 projected gradient descent (Madry et al., 2018) on the plain backbone f.

The attack maximizes the cross-entropy of f inside the ℓ2 ball of radius ε around each
input, with inputs clamped to a box (``[0, 1]`` by default). Every step's iterate is checked,
and the worst point found at any step of any restart is kept: a point counts as broken as
soon as any iterate is misclassified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from torchgloro._errors import GloroInputError
from torchgloro._inputs import check_epsilon, check_one_label_each
from torchgloro._net_attributes import eval_mode
from torchgloro.evaluate import progress

__all__ = ["PGDResult", "pgd_l2", "random_in_ball", "project_l2", "default_step_size"]

# The ball is shrunk by this relative amount while attacking, so that float32 round-off in
# x + δ never takes an iterate outside the true ε-ball (checked exactly in float64 at the end).
_BALL_SHRINK = 1e-5


@dataclass
class PGDResult:
    """Result of :func:`pgd_l2` (tensors on the input's device).

    ``x_adv`` (N, ...) the worst point found per input; ``fooled`` (N,) bool, whether
    f(x_adv) ≠ y (including inputs already misclassified at x); ``accuracy`` the fraction not
    fooled; ``max_norm`` the largest ‖x_adv − x‖₂ (float64), which is ≤ ε.
    """

    x_adv: torch.Tensor
    fooled: torch.Tensor
    accuracy: float
    max_norm: float
    steps: int
    restarts: int
    step_size: float
    epsilon: float


def default_step_size(epsilon: float, steps: int) -> float:
    """Madry et al.'s rule of thumb: 2.5·ε/steps, so that the ball can be crossed."""
    return 2.5 * float(epsilon) / max(int(steps), 1)


def _norms(d: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(d.flatten(1), dim=1)


def project_l2(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Projects each row of ``delta`` (B, ...) onto the ℓ2 ball of ``radius``."""
    n = _norms(delta).clamp_min(1e-30)
    factor = (radius / n).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def random_in_ball(
    shape: tuple[int, ...], radius: float, generator: torch.Generator, device, dtype
) -> torch.Tensor:
    """(B, ...) points drawn uniformly from the ℓ2 ball of ``radius`` (uniform direction,
    radius ∝ U^(1/d))."""
    b, d = shape[0], int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
    z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    z = z / _norms(z).clamp_min(1e-30).view(-1, *([1] * (len(shape) - 1)))
    u = torch.rand(b, generator=generator, device=device, dtype=dtype) ** (1.0 / d)
    return z * (radius * u).view(-1, *([1] * (len(shape) - 1)))


def _attack_batch(f, x, y, eps, steps, alpha, restarts, random_start, clip, gen, shown):
    radius = eps * (1 - _BALL_SHRINK)
    lo, hi = clip if clip is not None else (-float("inf"), float("inf"))
    with torch.no_grad():
        logits = f(x)
        fooled = logits.argmax(1) != y
        best_loss = F.cross_entropy(logits, y, reduction="none")
    x_best = x.clone()

    def record(x_cur, logits):
        nonlocal fooled, best_loss
        with torch.no_grad():
            wrong = logits.argmax(1) != y
            loss = F.cross_entropy(logits, y, reduction="none")
            take = (wrong & ~fooled) | (~fooled & ~wrong & (loss > best_loss))
            x_best[take] = x_cur[take].detach()
            best_loss = torch.where(take, loss, best_loss)
            fooled = fooled | wrong

    shape = (-1, *([1] * (x.dim() - 1)))
    for _ in range(restarts):
        if random_start:
            delta = random_in_ball(tuple(x.shape), radius, gen, x.device, x.dtype)
        else:
            delta = torch.zeros_like(x)
        delta = (x + delta).clamp(lo, hi) - x
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = f(x + delta)
            record(x + delta, logits)
            loss = F.cross_entropy(logits, y, reduction="none")
            (g,) = torch.autograd.grad(loss.sum(), delta)
            with torch.no_grad():
                g = g / _norms(g).clamp_min(1e-12).view(shape)
                delta = project_l2(delta.detach() + alpha * g, radius)
                delta = (x + delta).clamp(lo, hi) - x
            shown.update(len(x))
        with torch.no_grad():
            record(x + delta, f(x + delta))
    return x_best, fooled


def _enforce_ball(f, x, y, x_adv, fooled, eps, clip):
    """Exact float64 check that ‖x_adv − x‖ ≤ ε; pulls offenders back inside (never
    triggered in practice) and re-evaluates them."""
    d64 = x_adv.double() - x.double()
    n64 = _norms(d64)
    bad = n64 > eps
    if bool(bad.any()):
        scale = (eps * (1 - 1e-3) / n64[bad]).view(-1, *([1] * (x.dim() - 1)))
        fixed = (x[bad].double() + d64[bad] * scale).to(x.dtype)
        if clip is not None:
            fixed = fixed.clamp(*clip)
        x_adv = x_adv.clone()
        x_adv[bad] = fixed
        with torch.no_grad():
            fooled = fooled.clone()
            fooled[bad] = f(fixed).argmax(1) != y[bad]
        n64 = _norms(x_adv.double() - x.double())
    return x_adv, fooled, float(n64.max()) if n64.numel() else 0.0


def pgd_l2(
    f: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    steps: int = 100,
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = True,
    clip: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
    batch_size: int = 512,
) -> PGDResult:
    """Untargeted ℓ2 PGD on the cross-entropy of ``f``, batched on ``x``'s device.

    Args:
        f: The model to attack (its logits); its parameters are not modified.
        x: (N, ...) clean inputs; y: (N,) labels (same device).
        epsilon: ℓ2 radius of the attack.
        steps: Gradient steps per restart.
        step_size: ℓ2 length of each step (default ``2.5·ε/steps``).
        restarts: Independent runs (each from a random start when ``random_start``).
        clip: Box the inputs are clamped to, or ``None``.
        seed: Seeds the random starts (a generator on ``x``'s device).

    Returns:
        A :class:`PGDResult`.
    """
    epsilon = check_epsilon(epsilon)
    check_one_label_each(x, y)
    alpha = default_step_size(epsilon, steps) if step_size is None else float(step_size)
    if not (math.isfinite(alpha) and alpha > 0):
        raise GloroInputError(f"step_size must be a finite number > 0, got {step_size!r}.")
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    req = [p.requires_grad for p in f.parameters()]
    for p in f.parameters():
        p.requires_grad_(False)
    try:
        with eval_mode(f), progress.bar("PGD", len(x) * restarts * steps, "point-step") as shown:
            advs, fooled = [], []
            shown.partial = lambda: {  # whole batches only; their ball not yet rechecked
                "points_finished": sum(len(fo) for fo in fooled),
                "points_fooled": sum(int(fo.sum()) for fo in fooled),
            }
            for i in range(0, x.shape[0], batch_size):
                xb, yb = x[i : i + batch_size], y[i : i + batch_size]
                a, fo = _attack_batch(
                    f,
                    xb,
                    yb,
                    float(epsilon),
                    int(steps),
                    alpha,
                    int(restarts),
                    random_start,
                    clip,
                    gen,
                    shown,
                )
                advs.append(a)
                fooled.append(fo)
            x_adv = torch.cat(advs) if advs else x.clone()
            fooled_t = torch.cat(fooled) if fooled else torch.zeros(0, dtype=torch.bool)
            x_adv, fooled_t, max_norm = _enforce_ball(
                f, x, y, x_adv, fooled_t, float(epsilon), clip
            )
    finally:
        for p, r in zip(f.parameters(), req):
            p.requires_grad_(r)
    acc = float((~fooled_t).double().mean()) if fooled_t.numel() else 0.0
    return PGDResult(
        x_adv, fooled_t, acc, max_norm, int(steps), int(restarts), alpha, float(epsilon)
    )
