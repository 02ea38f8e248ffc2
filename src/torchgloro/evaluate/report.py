"""Reports: ``evaluation.json``, ``evaluation.md`` (tables laid out like Figure 3a/3b/3c of the
paper), the certified-accuracy curve (CSV + PNG) and the radius histogram (PNG), and the
side-by-side table of ``gloro compare``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = [
    "write_outputs",
    "markdown_report",
    "summary_tables",
    "metrics_table",
    "stopped_line",
    "lower_bounds_line",
    "tightness_table",
    "cost_table",
    "compare_table",
    "FILES",
    "files_for",
]

FILES = {
    "json": "evaluation.json",
    "md": "evaluation.md",
    "curve_csv": "certified_accuracy.csv",
    "curve_png": "certified_accuracy.png",
    "hist_png": "radius_histogram.png",
}


def files_for(suffix: str = "") -> dict[str, str]:
    """The output file names, with ``suffix`` before each extension (``evaluation-first100.json``
    for an evaluation of the first 100 test points, so that it never replaces a full one)."""
    out = {}
    for key, name in FILES.items():
        stem, ext = name.rsplit(".", 1)
        out[key] = f"{stem}{suffix}.{ext}"
    return out


def num(v, digits: int = 3) -> str:
    """A compact number: ``–`` for missing, scientific for very large/small values."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    v = float(v)
    if math.isinf(v):
        return "∞"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def pct(v) -> str:
    """A fraction as a percentage with one decimal, like the paper."""
    return "–" if v is None else f"{100.0 * float(v):.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _get(d: dict, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d or d[p] is None:
            return default
        d = d[p]
    return d


def metrics_table(results: list[dict], names: list[str] | None = None) -> str:
    """Figure 3a: Clean, PGD, VRA (sound, fast, gap), rejection, sec/epoch, epochs, memory."""
    header = [
        "run",
        "model",
        "ε",
        "Clean (%)",
        "PGD (%)",
        "VRA sound (%)",
        "VRA fast (%)",
        "gap (pp)",
        "Rejected (%)",
        "Sec./epoch",
        "# Epochs",
        "Mem. (MB/inst)",
    ]
    rows = []
    for k, r in enumerate(results):
        m, tr = r.get("metrics", {}), _get(r, "cost", "training", default={})
        rows.append(
            [
                names[k] if names else str(r.get("run", "")),
                str(r.get("model") or "–"),
                num(r.get("epsilon")),
                pct(m.get("clean_accuracy")),
                pct(m.get("pgd_accuracy")),
                pct(m.get("vra_sound")),
                pct(m.get("vra_fast")),
                "–" if m.get("vra_gap") is None else f"{100 * m['vra_gap']:+.1f}",
                pct(m.get("rejection_sound")),
                num(tr.get("sec_per_epoch")),
                str(tr.get("epochs") or "–"),
                num(tr.get("mem_mb_per_instance")),
            ]
        )
    return _table(header, rows)


def tightness_table(results: list[dict], names: list[str] | None = None) -> str:
    """Figure 3c: global upper bound (sound, fast), global and local lower bounds."""
    header = [
        "run",
        "global UB (sound)",
        "global UB (fast)",
        "UB gap",
        "global LB",
        "local LB (mean)",
        "global LB / UB",
        "local LB / UB",
    ]
    rows = []
    for k, r in enumerate(results):
        lip = r.get("lipschitz", {})
        lg, ll = lip.get("global_lb_over_ub"), lip.get("local_lb_over_ub")
        rows.append(
            [
                names[k] if names else str(r.get("run", "")),
                num(lip.get("global_ub_sound"), 4),
                num(lip.get("global_ub_fast"), 4),
                num(lip.get("ub_gap")),
                num(lip.get("global_lb")),
                num(lip.get("local_lb")),
                "–" if lg is None else f"{100 * lg:.0f}%",
                "–" if ll is None else f"{100 * ll:.0f}%",
            ]
        )
    return _table(header, rows)


def cost_table(result: dict) -> str:
    """Figure 3b: time and memory to certify the test set, next to plain inference of f."""
    c = _get(result, "cost", "certification")
    if not c:
        return "(certification cost not measured: pass --cost)"
    header = ["pass", "Time (sec.)", "Mem. (MB/inst)", "time × inference", "mem × inference"]
    labels = {
        "inference": "inference of f",
        "certify_fast": "certify (fast, frozen K)",
        "certify_sound": "certify (sound)",
        "certify_sound_float64": "certify (sound, all float64)",
    }
    rows = []
    for key, label in labels.items():
        e = c.get(key, {})
        rows.append(
            [
                label,
                num(e.get("seconds")),
                num(e.get("mem_mb_per_instance")),
                num(e.get("time_ratio")),
                num(e.get("mem_ratio")),
            ]
        )
    note = (
        f"\n\n{c['n']} points, batch {c['batch_size']}, median of {c['repeats']} interleaved "
        f"repeats on {c['device']} (memory: {c['memory_method']}); one-time setup: fast "
        f"{num(c.get('fast_setup_seconds'))} s, sound {num(c.get('sound_setup_seconds'))} s."
    )
    return _table(header, rows) + note


def summary_tables(result: dict) -> str:
    """The three tables of one evaluation, in markdown (after what was stopped, if it was)."""
    parts = [
        "## Accuracy (Figure 3a)",
        metrics_table([result]),
        "## Lipschitz tightness (Figure 3c)",
        tightness_table([result]),
        "## Certification cost (Figure 3b)",
        cost_table(result),
    ]
    lower = lower_bounds_line(result)
    if lower:
        parts.insert(4, lower)
    fallback = fallback_line(result)
    if fallback:
        parts.insert(2, fallback)
    stopped = stopped_line(result)
    if stopped:
        parts.insert(0, stopped)
    return "\n\n".join(parts) + "\n"


def stopped_line(result: dict) -> str | None:
    """What a stopped evaluation finished, and how far the part in progress got; None for a
    complete one."""
    stop = result.get("stopped")
    if not stop:
        return None
    done = ", ".join(stop["finished"]) or "nothing"
    text = f"**Stopped by {stop['signal']}: partial results.** Finished: {done}."
    phase = stop.get("in_progress")
    if phase:
        figures = ", ".join(
            f"{k.replace('_', ' ')} {num(v, 4)}"
            for k, v in phase.items()
            if k not in ("phase", "done", "total", "unit", "partial")
        )
        text += (
            f" In progress (partial): {phase['phase']}, {phase['done']} of {phase['total']} "
            f"{phase['unit']}s done{f' ({figures})' if figures else ''}."
        )
    return text + " Figures of parts not finished are missing (–)."


def lower_bounds_line(result: dict) -> str | None:
    """The size of the empirical lower bounds, and the flag that changes it; None without."""
    lip = result.get("lipschitz") or {}
    g, loc = lip.get("global_lb_settings"), lip.get("local_lb_settings")
    if not g:  # the global bound is computed first
        return None
    local = f"; local: {loc['points']} points, {loc['steps']} steps" if loc else ""
    return (
        f"Lower bounds on {g['pairs']} points of {g['of_points']} (global: {g['pairs']} "
        f"pairs, {g['steps']} steps{local}); --lower-bounds-points to change."
    )


def fallback_line(result: dict) -> str | None:
    """One sentence on the local-bound fallback (``--fallback``), or None without one."""
    fb = result.get("fallback")
    if not fb:
        return None
    return (
        f"Local-bound fallback: VRA {pct(fb['vra'])}% ({100 * fb['vra_added']:+.2f} pp; "
        f"{fb['points_added']} of {fb['points_tried']} ⊥ points certified, "
        f"{1000 * fb['seconds_per_point_tried']:.1f} ms per point tried)."
    )


def markdown_report(result: dict) -> str:
    """The full ``evaluation.md``."""
    m = result.get("metrics", {})
    pgd = result.get("pgd")
    lines = [
        f"# Evaluation of {result.get('run', '')}",
        "",
        f"Dataset `{result.get('dataset')}` ({result.get('split', 'test')}, {result['n']} "
        f"points), ε = {num(result['epsilon'], 4)}, seed {result['seed']}, device "
        f"`{result.get('device')}`.",
        "",
        f"Weights: {result.get('weights', result.get('model_file'))}.",
        "",
        summary_tables(result),
    ]
    if pgd:
        lines += [
            f"PGD: ℓ2, {pgd['steps']} steps of {num(pgd['step_size'])}, {pgd['restarts']} "
            f"restart(s), random start, inputs clamped to [0, 1]; largest perturbation "
            f"{num(pgd['max_perturbation_norm'], 6)}. Soundly certified points flipped: "
            f"{pgd['certified_flipped_sound']}; fast-certified points flipped: "
            f"{pgd['certified_flipped_fast']}.",
            "",
        ]
    lines += [
        f"VRA sound {pct(m.get('vra_sound'))}% vs fast {pct(m.get('vra_fast'))}%: sound mode "
        f"uses proven bounds and a proven round-off allowance, fast mode converged power "
        f"iteration.",
        "",
    ]
    files = result.get("files") or FILES
    if "curve_png" not in files:  # stopped before certification finished: no plots
        return "\n".join(lines)
    lines += [
        "## Certified accuracy vs ε",
        "",
        f"![certified accuracy]({files['curve_png']})",
        "",
        f"Data: [{files['curve_csv']}]({files['curve_csv']}) (fraction of test points both "
        f"correct and certified with radius > ε).",
        "",
        "## Certified radii",
        "",
        f"![radius histogram]({files['hist_png']})",
        "",
        f"Mean certified radius {num(_get(result, 'radius', 'mean'))}, median "
        f"{num(_get(result, 'radius', 'median'))}.",
        "",
    ]
    return "\n".join(lines)


def write_outputs(
    run_dir: str | os.PathLike, result: dict, arrays: dict | None, suffix: str = ""
) -> dict[str, Path]:
    """Writes the JSON, markdown, CSV and PNGs into ``run_dir``; returns their paths.

    Args:
        run_dir: Folder to write into.
        result: The evaluation; its ``files`` entry is set to the names written.
        arrays: The curve, radii and correctness arrays the CSV and plots need; None (an
            evaluation stopped before certification finished) writes the JSON and markdown.
        suffix: Inserted before each extension (see :func:`files_for`).
    """
    from torchgloro.evaluate.plots import plot_curve, plot_radius_histogram, write_curve_csv
    from torchgloro.io import atomic_write_bytes

    run_dir = Path(run_dir)
    names = files_for(suffix)
    if arrays is None:
        names = {k: names[k] for k in ("json", "md")}
    paths = {k: run_dir / v for k, v in names.items()}
    result["files"] = dict(names)
    if arrays is not None:
        write_curve_csv(paths["curve_csv"], arrays["grid"], arrays["curve"])
        plot_curve(paths["curve_png"], arrays["grid"], arrays["curve"], result["epsilon"])
        plot_radius_histogram(paths["hist_png"], arrays["radius"], arrays["correct"],
                              result["epsilon"])  # fmt: skip
    atomic_write_bytes(paths["md"], markdown_report(result).encode())
    atomic_write_bytes(paths["json"], (json.dumps(result, indent=2) + "\n").encode())
    return paths


def compare_table(results: list[dict], names: list[str] | None = None) -> str:
    """Side-by-side markdown of several evaluations (e.g. standard vs GloRo vs GloRo-T)."""
    names = names or [str(r.get("run", f"run{k}")) for k, r in enumerate(results)]
    header = [
        "run",
        "dataset",
        "model",
        "ε",
        "n",
        "Clean (%)",
        "PGD (%)",
        "VRA sound (%)",
        "VRA fast (%)",
        "Rejected (%)",
        "Sec./epoch",
        "Mem. (MB/inst)",
        "global UB",
        "global LB",
        "local LB",
        "certify s",
        "× inference",
    ]
    rows = []
    for name, r in zip(names, results):
        m = r.get("metrics", {})
        lip = r.get("lipschitz", {})
        tr = _get(r, "cost", "training", default={})
        cs = _get(r, "cost", "certification", "certify_sound", default={})
        if r.get("stopped"):  # a stopped evaluation: its missing figures show –
            name = f"{name} (stopped: partial)"
        rows.append(
            [
                name,
                str(r.get("dataset") or "–"),
                str(r.get("model") or "–"),
                num(r.get("epsilon")),
                str(r.get("n", "–")),
                pct(m.get("clean_accuracy")),
                pct(m.get("pgd_accuracy")),
                pct(m.get("vra_sound")),
                pct(m.get("vra_fast")),
                pct(m.get("rejection_sound")),
                num(tr.get("sec_per_epoch")),
                num(tr.get("mem_mb_per_instance")),
                num(lip.get("global_ub_sound")),
                num(lip.get("global_lb")),
                num(lip.get("local_lb")),
                num(cs.get("seconds")),
                num(cs.get("time_ratio")),
            ]
        )
    return _table(header, rows)
