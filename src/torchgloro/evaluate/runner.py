"""Orchestration: evaluate a GloRo net on a test split, or a whole ``gloro train`` run folder.

:func:`evaluate_net` computes every number (returned as a JSON-able dict plus the per-point
arrays the plots need); :func:`evaluate_run` loads a run folder, evaluates it and writes
``evaluation.json``, ``evaluation.md``, the curve CSV and the PNG plots into it.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from torchgloro._errors import ConfigError, GloroError
from torchgloro._inputs import check_epsilon, check_one_label_each
from torchgloro.evaluate import cost, metrics, progress, sections
from torchgloro.evaluate.options import EvalOptions
from torchgloro.evaluate.stopping import Interrupted
from torchgloro.losses import check_labels
from torchgloro.train._runtime import resolve_device

__all__ = ["EvalOptions", "evaluate_net", "evaluate_run", "FORMAT"]

FORMAT = "torchgloro-eval/1"


def evaluate_net(net, x: torch.Tensor, y: torch.Tensor, opts: EvalOptions) -> tuple[dict, dict]:
    """Evaluates ``net`` on ``(x, y)`` (already on the net's device), with a progress bar
    per phase unless ``opts.progress`` is False.

    Returns:
        ``(result, arrays)``: the JSON-able result, and CPU tensors for plots
        (``radius``, ``correct``, ``grid``, ``curve``).

    Raises:
        UnsoundBoundError: if PGD breaks a soundly certified point, or an empirical lower
            bound exceeds the sound Lipschitz upper bound.
        Interrupted: Ctrl-C (or SIGTERM, in :func:`~torchgloro.evaluate.stopping.signals_stop`);
            its ``result`` holds the parts that finished and a ``stopped`` entry naming
            them and the part in progress (n done of N), its ``arrays`` the plots' data if
            certification finished.
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
    if opts.attack not in (None, "pgd"):
        raise ConfigError(f"Unknown attack {opts.attack!r}; the only attack is 'pgd'.")
    seed = int(opts.seed or 0)
    torch.manual_seed(seed)
    result: dict = {
        "format": FORMAT,
        "epsilon": eps,
        "n": int(x.shape[0]),
        "seed": seed,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("extra", "progress")},
        "metrics": {},
        "timings": {},
        "cost": {},
    }
    result["options"]["epsilon"] = eps
    result["options"]["seed"] = seed
    arrays: dict = {}
    finished: list[str] = []
    try:
        _sections(net, x, y, eps, seed, opts, result, arrays, finished)
    except KeyboardInterrupt as e:
        stop = Interrupted.of(e)
        result["stopped"] = {"signal": stop.signal, "finished": finished,
                             "in_progress": stop.phase}  # fmt: skip
        stop.result, stop.arrays = result, arrays or None
        if stop is e:
            raise
        raise stop from e
    return result, arrays


def _sections(net, x, y, eps, seed, opts, result: dict, arrays: dict, finished: list) -> None:
    """Computes each part into ``result`` (and the plots' data into ``arrays``) as soon as it
    is done, and names it in ``finished``, so that a stopped evaluation keeps those parts."""
    timings = result["timings"]
    t0 = time.perf_counter()
    yc = y.cpu()
    pred32 = metrics.predict_batched(net.backbone, x, opts.batch_size)
    cs = metrics.certify_batched(net, x, eps, "sound", opts.batch_size)
    cf = metrics.certify_batched(net, x, eps, "fast", opts.batch_size)
    timings["certify_seconds"] = time.perf_counter() - t0
    vra_s, vra_f = metrics.vra(cs.pred, cs.certified, yc), metrics.vra(cf.pred, cf.certified, yc)
    result["metrics"].update({
        "clean_accuracy": metrics.accuracy(pred32, yc),
        "vra_sound": vra_s,
        "vra_fast": vra_f,
        "vra_gap": vra_f - vra_s,
        "rejection_sound": metrics.rejection_rate(cs.certified),
        "rejection_fast": metrics.rejection_rate(cf.certified),
    })  # fmt: skip
    correct = cs.pred == yc
    grid = metrics.curve_grid(cs.radius, eps, opts.curve_points)
    curve = metrics.certified_accuracy_curve(cs.radius, correct, grid)
    metrics.check_curve(grid, curve, eps, vra_s)
    finite = cs.radius[torch.isfinite(cs.radius)]
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
    arrays.update(radius=cs.radius, correct=correct, grid=grid, curve=curve)
    finished.append("certification")
    if opts.fallback:
        result["fallback"] = sections.fallback_section(net, x, yc, eps, opts, cs)
        result["metrics"]["vra_fallback"] = result["fallback"]["vra"]
        finished.append("fallback")
    if opts.attack:
        t0 = time.perf_counter()
        result["pgd"] = sections.pgd_section(net, x, y, eps, opts, seed, cs, cf)
        result["metrics"]["pgd_accuracy"] = result["pgd"]["accuracy"]
        timings["pgd_seconds"] = time.perf_counter() - t0
        finished.append("pgd")
    lip = result["lipschitz"] = {}  # filled bound by bound: a stop keeps those done
    try:
        sections.lipschitz_section(net, x, eps, opts, seed, lip)
    finally:
        for key in ("global_lb_seconds", "local_lb_seconds"):
            if key in lip:
                timings[key] = lip.pop(key)
    finished.append("lipschitz")
    if opts.cost:
        result["cost"]["certification"] = cost.measure_certification_cost(
            net, x, batch_size=min(opts.batch_size, 256), repeats=opts.cost_repeats
        )
        finished.append("cost")


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
        Interrupted: Ctrl-C or SIGTERM; the parts that finished were written (with
            ``write``), labelled partial, and are in its ``result``.
    """
    import torchgloro as tg
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
    spec = getattr(net.backbone, "gloro_spec", None) or {}
    facts = {
        "run": str(run_dir.name),
        "model_file": model_file.name,
        "weights": net.loaded_weights.text,  # final, best on validation, or picked on test
        "picked_on_test": net.loaded_weights.picked_on_test,
        "model": saved.arch or spec.get("name"),
        "dataset": name,
        "split": "test",
        "device": str(dev),
    }

    def finish(result: dict, arrays: dict | None) -> dict:
        result = {"format": result.pop("format"), **facts, **result}
        result["cost"]["training"] = cost.read_training_cost(run_dir)
        result["timings"]["total_seconds"] = time.perf_counter() - t_start
        if write:
            _write(run_dir, result, arrays, suffix)
        return result

    try:
        return finish(*evaluate_net(net, x, y, opts))
    except Interrupted as stop:
        if stop.result is not None:  # the parts it finished, written as a complete one would be
            stop.result = finish(stop.result, stop.arrays)
        raise


def _write(run_dir: Path, result: dict, arrays: dict | None, suffix: str) -> None:
    from torchgloro.evaluate import report

    try:
        report.write_outputs(run_dir, result, arrays, suffix=suffix)
    except OSError as e:
        raise GloroError(
            f"Evaluated, but cannot write the results into {run_dir}: {e}. Free space or "
            f"fix permissions, or use --no-write to only print them."
        ) from e
    result["files"]["folder"] = str(run_dir)


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
