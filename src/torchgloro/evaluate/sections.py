"""The sections of an evaluation besides certification: PGD (with the soundness check of
every certified point it breaks), the Lipschitz upper and empirical lower bounds, and the
local-bound fallback. Each fills its part of ``evaluation.json``."""

from __future__ import annotations

import copy
import sys
import time

import torch

from torchgloro._errors import UnsoundBoundError
from torchgloro.evaluate import attacks, lower_bounds, metrics, progress

__all__ = ["pgd_section", "lipschitz_section", "fallback_section"]


def _warn(msg: str) -> None:
    print(f"gloro evaluate: warning: {msg}", file=sys.stderr)


def pgd_section(net, x, y, eps, opts, seed, cert_sound, cert_fast) -> dict:
    f = net.backbone
    res = attacks.pgd_l2(
        f,
        x,
        y,
        eps,
        steps=opts.pgd_steps,
        step_size=opts.pgd_step_size,
        restarts=opts.pgd_restarts,
        seed=seed,
        batch_size=opts.batch_size,
    )
    fooled = res.fooled.cpu()
    yc = y.cpu()
    out = {
        "accuracy": res.accuracy,
        "steps": res.steps,
        "restarts": res.restarts,
        "step_size": res.step_size,
        "max_perturbation_norm": res.max_norm,
        "float32_only_flips": 0,
    }
    flipped = (cert_sound.pred == yc) & cert_sound.certified & fooled
    if bool(flipped.any()):
        # Certified in exact (float64, proven) arithmetic: recheck the flip in float64.
        f64 = copy.deepcopy(f).double().eval()
        idx = flipped.nonzero().squeeze(1)
        with torch.no_grad():
            p64 = f64(res.x_adv[idx.to(x.device)].double()).argmax(1).cpu()
        real = p64 != yc[idx]
        if bool(real.any()):
            k = int(idx[real][0])
            raise UnsoundBoundError(
                f"PGD flipped {int(real.sum())} point(s) certified robust in sound mode at "
                f"ε={eps:g} (first: test index {k}, label {int(yc[k])}, certified radius "
                f"{float(cert_sound.radius[k]):.6g}): the certificate is not sound. Please "
                f"report this as a bug."
            )
        out["float32_only_flips"] = int(flipped.sum())
    out["certified_flipped_sound"] = 0
    flipped_fast = (cert_fast.pred == yc) & cert_fast.certified & fooled
    out["certified_flipped_fast"] = int(flipped_fast.sum())
    if out["certified_flipped_fast"]:
        _warn(
            f"PGD flipped {out['certified_flipped_fast']} point(s) certified in fast mode: the "
            f"power-iteration bound underestimates; trust mode='sound'."
        )
    vra_sound = metrics.vra(cert_sound.pred, cert_sound.certified, yc)
    if res.accuracy + 1e-12 < vra_sound:
        raise UnsoundBoundError(
            f"PGD accuracy {res.accuracy:.4f} is below the sound VRA {vra_sound:.4f}."
        )
    return out


def lipschitz_section(net, x, eps, opts, seed, out: dict) -> None:
    """Fills ``out`` with the sound and fast upper bounds and, with ``opts.lower_bounds``,
    the global then the local lower bound on ``opts.lb_points`` of the points ``x``, each
    as soon as it is done (so that a stopped evaluation keeps it)."""
    ub = lower_bounds.upper_bounds(net)
    K = ub.pop("_K_sound")
    out.update(ub)
    ub_sound = ub["global_ub_sound"]
    f = net.backbone
    if not opts.lower_bounds:
        return
    t0 = time.perf_counter()
    glb = lower_bounds.global_lower_bound(
        f, x, pairs=opts.lb_points, steps=opts.lb_steps, lr=opts.lb_lr, seed=seed + 1
    )
    lower_bounds.check_against_upper(glb, K, "Global")
    k = int(glb.values.argmax())
    out.update(
        global_lb=glb.max,
        global_lb_pair=[int(glb.j[k]), int(glb.i[k])],
        global_lb_over_ub=glb.max / ub_sound if ub_sound else None,
        global_lb_settings={
            "pairs": opts.lb_points,
            "steps": opts.lb_steps,
            "lr": opts.lb_lr,
            "of_points": int(x.shape[0]),
        },  # fmt: skip
        global_lb_seconds=time.perf_counter() - t0,
    )
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed + 2)
    pick = torch.randperm(x.shape[0], generator=g)[: opts.lb_points].sort().values
    llb = lower_bounds.local_lower_bound(
        f, x[pick.to(x.device)], eps, steps=opts.local_steps, lr=opts.local_lr, seed=seed + 3
    )
    lower_bounds.check_against_upper(llb, K, "Local")
    out.update(
        local_lb=llb.mean,
        local_lb_max=llb.max,
        local_lb_over_ub=llb.mean / ub_sound if ub_sound else None,
        local_lb_settings={
            "points": int(pick.numel()),
            "steps": opts.local_steps,
            "lr": opts.local_lr,
            "of_points": int(x.shape[0]),
        },  # fmt: skip
        local_lb_seconds=time.perf_counter() - t0,
    )


def fallback_section(net, x, yc, eps, opts, cs) -> dict:
    """VRA with the local-bound fallback for the points the global sound bound left as ⊥."""
    from torchgloro.local import certify_local

    t0 = time.perf_counter()
    parts = []
    with progress.bar("local-bound fallback", len(x), "point") as shown:
        for xb in x.split(opts.batch_size):
            parts.append(certify_local(net, xb, eps, net.certify(xb, eps, precision="float64")))
            shown.update(len(xb))
    certified = torch.cat(parts).cpu()
    seconds = time.perf_counter() - t0
    tried = int((~cs.certified).sum())
    vra = metrics.vra(cs.pred, certified, yc)
    return {
        "vra": vra,
        "vra_added": vra - metrics.vra(cs.pred, cs.certified, yc),
        "points_tried": tried,
        "points_added": int((certified & ~cs.certified).sum()),
        "seconds": seconds,
        "seconds_per_point_tried": seconds / max(tried, 1),
    }
