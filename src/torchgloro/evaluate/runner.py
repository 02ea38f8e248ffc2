"""Orchestration: evaluate a GloRo net on a test split, or a whole ``gloro train`` run folder.

:func:`evaluate_net` computes every number (returned as a JSON-able dict plus the per-point
arrays the plots need); :func:`evaluate_run` loads a run folder, evaluates it and writes
``evaluation.json``, ``evaluation.md``, the curve CSV and the PNG plots into it.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from torchgloro._errors import ConfigError, GloroError, UnsoundBoundError
from torchgloro._inputs import check_epsilon, check_one_label_each
from torchgloro.evaluate import attacks, cost, lower_bounds, metrics, progress
from torchgloro.losses import check_labels
from torchgloro.train._runtime import resolve_device

__all__ = ["EvalOptions", "evaluate_net", "evaluate_run", "FORMAT"]

FORMAT = "torchgloro-eval/1"


@dataclass
class EvalOptions:
    """Settings of an evaluation (defaults follow the paper, Section 5 and Appendix E)."""

    epsilon: float | None = None  # default: config [gloro] epsilon_test, else the net's ε
    attack: str | None = "pgd"  # "pgd" or None
    lower_bounds: bool = False
    cost: bool = False
    fallback: bool = False  # also certify ⊥ points with the local bound (torchgloro.local)
    limit: int | None = None
    seed: int | None = None  # default: config [run] seed, else 0
    pgd_steps: int = 100
    pgd_restarts: int = 1
    pgd_step_size: float | None = None  # default 2.5·ε/steps
    lb_steps: int = 7500
    lb_pairs: int = 100
    lb_lr: float = 1e-3
    local_steps: int = 5000
    local_points: int = 100
    local_lr: float = 1e-3
    batch_size: int = 512
    cost_repeats: int = 3
    curve_points: int = 201
    progress: bool = True  # bars with an ETA on stderr (torchgloro.evaluate.progress)
    extra: dict = field(default_factory=dict)


def _warn(msg: str) -> None:
    print(f"gloro evaluate: warning: {msg}", file=sys.stderr)


def _pgd_section(net, x, y, eps, opts, seed, cert_sound, cert_fast) -> dict:
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


def _lb_section(net, x, eps, opts, seed) -> dict:
    ub = lower_bounds.upper_bounds(net)
    K = ub.pop("_K_sound")
    out: dict = dict(ub)
    f = net.backbone
    if not opts.lower_bounds:
        return out
    t0 = time.perf_counter()
    glb = lower_bounds.global_lower_bound(
        f, x, pairs=opts.lb_pairs, steps=opts.lb_steps, lr=opts.lb_lr, seed=seed + 1
    )
    lower_bounds.check_against_upper(glb, K, "Global")
    k = int(glb.values.argmax())
    out.update(
        global_lb=glb.max,
        global_lb_pair=[int(glb.j[k]), int(glb.i[k])],
        global_lb_over_ub=glb.max / ub["global_ub_sound"] if ub["global_ub_sound"] else None,
        global_lb_settings={"pairs": opts.lb_pairs, "steps": opts.lb_steps, "lr": opts.lb_lr},
        global_lb_seconds=time.perf_counter() - t0,
    )
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed + 2)
    pick = torch.randperm(x.shape[0], generator=g)[: opts.local_points].sort().values
    llb = lower_bounds.local_lower_bound(
        f, x[pick.to(x.device)], eps, steps=opts.local_steps, lr=opts.local_lr, seed=seed + 3
    )
    lower_bounds.check_against_upper(llb, K, "Local")
    out.update(
        local_lb=llb.mean,
        local_lb_max=llb.max,
        local_lb_over_ub=llb.mean / ub["global_ub_sound"] if ub["global_ub_sound"] else None,
        local_lb_settings={
            "points": int(pick.numel()),
            "steps": opts.local_steps,
            "lr": opts.local_lr,
        },
        local_lb_seconds=time.perf_counter() - t0,
    )
    return out


def _fallback_section(net, x, yc, eps, opts, cs) -> dict:
    """VRA with the local-bound fallback for the points the global sound bound left as ⊥."""
    from torchgloro.local import certify_local

    t0 = time.perf_counter()
    certified = torch.cat([
        certify_local(net, xb, eps, net.certify(xb, eps, precision="float64")).cpu()
        for xb in x.split(opts.batch_size)
    ])  # fmt: skip
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


def evaluate_net(net, x: torch.Tensor, y: torch.Tensor, opts: EvalOptions) -> tuple[dict, dict]:
    """Evaluates ``net`` on ``(x, y)`` (already on the net's device), with a progress bar
    per phase unless ``opts.progress`` is False.

    Returns:
        ``(result, arrays)``: the JSON-able result, and CPU tensors for plots
        (``radius``, ``correct``, ``grid``, ``curve``).

    Raises:
        UnsoundBoundError: if PGD breaks a soundly certified point, or an empirical lower
            bound exceeds the sound Lipschitz upper bound.
    """
    with progress.shown(opts.progress):
        return _evaluate(net, x, y, opts)


def _evaluate(net, x: torch.Tensor, y: torch.Tensor, opts: EvalOptions) -> tuple[dict, dict]:
    net.eval()
    if net.is_stale:
        net.refresh()
    eps = check_epsilon(opts.epsilon if opts.epsilon is not None else net.epsilon)
    check_one_label_each(x, y)
    check_labels(y.cpu(), net.num_classes)
    seed = int(opts.seed or 0)
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    yc = y.cpu()
    pred32 = metrics.predict_batched(net.backbone, x, opts.batch_size)
    cs = metrics.certify_batched(net, x, eps, "sound", opts.batch_size)
    cf = metrics.certify_batched(net, x, eps, "fast", opts.batch_size)
    timings["certify_seconds"] = time.perf_counter() - t0
    vra_s, vra_f = metrics.vra(cs.pred, cs.certified, yc), metrics.vra(cf.pred, cf.certified, yc)
    result: dict = {
        "format": FORMAT,
        "epsilon": eps,
        "n": int(x.shape[0]),
        "seed": seed,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("extra", "progress")},
        "metrics": {
            "clean_accuracy": metrics.accuracy(pred32, yc),
            "vra_sound": vra_s,
            "vra_fast": vra_f,
            "vra_gap": vra_f - vra_s,
            "rejection_sound": metrics.rejection_rate(cs.certified),
            "rejection_fast": metrics.rejection_rate(cf.certified),
        },
    }
    result["options"]["epsilon"] = eps
    result["options"]["seed"] = seed
    correct = cs.pred == yc
    grid = metrics.curve_grid(cs.radius, eps, opts.curve_points)
    curve = metrics.certified_accuracy_curve(cs.radius, correct, grid)
    metrics.check_curve(grid, curve, eps, vra_s)
    finite = cs.radius[torch.isfinite(cs.radius)]
    if opts.fallback:
        result["fallback"] = _fallback_section(net, x, yc, eps, opts, cs)
        result["metrics"]["vra_fallback"] = result["fallback"]["vra"]
    result["radius"] = {
        "mean": float(finite.mean()) if finite.numel() else 0.0,
        "median": float(finite.median()) if finite.numel() else 0.0,
        "max": float(finite.max()) if finite.numel() else 0.0,
        "mean_correct": float(cs.radius[correct & torch.isfinite(cs.radius)].mean())
        if bool((correct & torch.isfinite(cs.radius)).any())
        else 0.0,
        "infinite": int((~torch.isfinite(cs.radius)).sum()),
    }
    result["curve"] = {"points": int(grid.numel()), "at_epsilon": vra_s}

    if opts.attack:
        if opts.attack != "pgd":
            raise ConfigError(f"Unknown attack {opts.attack!r}; the only attack is 'pgd'.")
        t0 = time.perf_counter()
        result["pgd"] = _pgd_section(net, x, y, eps, opts, seed, cs, cf)
        result["metrics"]["pgd_accuracy"] = result["pgd"]["accuracy"]
        timings["pgd_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result["lipschitz"] = _lb_section(net, x, eps, opts, seed)
    lip = result["lipschitz"]
    for key in ("global_lb_seconds", "local_lb_seconds"):
        if key in lip:
            timings[key] = lip.pop(key)
    result["cost"] = {}
    if opts.cost:
        result["cost"]["certification"] = cost.measure_certification_cost(
            net, x, batch_size=min(opts.batch_size, 256), repeats=opts.cost_repeats
        )
    result["timings"] = timings
    arrays = {"radius": cs.radius, "correct": correct, "grid": grid, "curve": curve}
    return result, arrays


def _load_net(run: Path, dev: torch.device):
    import torchgloro as tg

    return tg.load(run, map_location=str(dev), warn=False)  # result["weights"] says it


def evaluate_run(
    run: str | os.PathLike,
    opts: EvalOptions | None = None,
    data_dir: str | os.PathLike | None = None,
    dataset: str | None = None,
    device: str | None = None,
    write: bool = True,
    download: bool = False,
) -> dict:
    """Evaluates a run folder (or a ``.safetensors`` file) on its dataset's test split.

    The dataset, ε_test and seed come from ``config.toml`` unless given. With ``write``,
    ``evaluation.json``/``.md``, ``certified_accuracy.csv`` and PNG plots are written next to
    the model. They are named for what was evaluated, so that one evaluation never replaces
    another: ``evaluation.json`` for the run's own model on its own test split at its own ε,
    ``evaluation-checkpoint.json`` for ``RUN/checkpoint.safetensors``, ``-eps0.5`` for another
    ε, ``-cifar10`` for another dataset, ``-first100`` for ``opts.limit = 100`` (combined in
    that order).

    Raises:
        GloroError: the folder cannot be written (checked before any work; pass
            ``write=False``), or there is nothing to evaluate.
    """
    import torchgloro as tg
    from torchgloro.evaluate import report
    from torchgloro.io import resolve_model_file
    from torchgloro.train.saved_run import read_saved_run

    opts = copy.deepcopy(opts) if opts is not None else EvalOptions()
    t_start = time.perf_counter()
    run = Path(run)
    run_dir = run if run.is_dir() else run.parent
    model_file = resolve_model_file(run)
    if write:
        _check_writable(run_dir)
    saved = read_saved_run(run)
    dev = resolve_device(device)
    net = _load_net(model_file, dev)
    name = dataset or saved.dataset
    if not name:
        raise ConfigError(
            f"No dataset for {run}: config.toml has no [data] name; pass --dataset NAME."
        )
    root = data_dir if data_dir is not None else saved.root
    split = tg.data.get_dataset(name, "test", root=root, download=download)
    n_full = len(split)
    if opts.limit is not None:
        split = split.subset(min(int(opts.limit), n_full))
    own_eps = saved.epsilon_test if saved.epsilon_test is not None else net.epsilon
    if opts.epsilon is None:
        opts.epsilon = own_eps
    if opts.seed is None:
        opts.seed = saved.seed
    if len(split) == 0:
        raise GloroError("The test split is empty; nothing to evaluate.")
    split.require_model(net.num_classes, net.in_shape)
    suffix = "".join(
        f"-{part}"
        for part, differs in [
            (model_file.stem, model_file.name not in ("best.safetensors", "model.safetensors")),
            (f"eps{opts.epsilon:g}", abs(opts.epsilon - own_eps) > 1e-9 * own_eps),
            (_file_safe(name), saved.dataset is not None and name != saved.dataset),
            (f"first{len(split)}", len(split) < n_full),
        ]
        if differs
    )
    x, y = split.x.to(dev), split.y.to(dev)
    result, arrays = evaluate_net(net, x, y, opts)
    arch = saved.arch
    spec = getattr(net.backbone, "gloro_spec", None) or {}
    result = {
        "format": result.pop("format"),
        "run": str(run_dir.name),
        "model_file": model_file.name,
        "weights": net.loaded_weights.text,  # final, best on validation, or picked on test
        "picked_on_test": net.loaded_weights.picked_on_test,
        "model": arch or spec.get("name"),
        "dataset": name,
        "split": "test",
        "device": str(dev),
        **result,
    }
    result["cost"]["training"] = cost.read_training_cost(run_dir)
    result["timings"]["total_seconds"] = time.perf_counter() - t_start
    if write:
        try:
            report.write_outputs(run_dir, result, arrays, suffix=suffix)
        except OSError as e:
            raise GloroError(
                f"Evaluated, but cannot write the results into {run_dir}: {e}. Free space or "
                f"fix permissions, or use --no-write to only print them."
            ) from e
        result["files"]["folder"] = str(run_dir)
    return result


def _check_writable(folder: Path) -> None:
    """Raises before an evaluation of hours when its results could not be written."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise GloroError(
            f"Cannot write into {folder} ({e.strerror or e}); gloro evaluate writes its "
            f"results there. Fix the permissions, copy the run somewhere writable, or pass "
            f"--no-write to only print the results."
        ) from e


def _file_safe(name: str) -> str:
    """A dataset name as a file-name part (``npz:/a/b.npz`` → ``npz-b``)."""
    if name.startswith("npz:"):
        name = "npz-" + Path(name[4:]).stem
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
