"""Shared plumbing for the benchmarks: CLI flags, provenance, timing, memory, JSON output.

Every benchmark interleaves the two things it compares in one process (A, B, A, B, ...) and
reports medians and ratios, because the machines they run on are shared and noisy.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
MNIST_ROOT = Path(os.environ.get("BENCH_MNIST") or REPO.parent / "shared" / "data" / "mnist")

__all__ = [
    "REPO",
    "RESULTS",
    "MNIST_ROOT",
    "parser",
    "setup",
    "provenance",
    "write_result",
    "sync",
    "interleave",
    "median",
    "endless",
    "RssSampler",
    "peak_bytes_block",
    "saved_activation_bytes",
    "load_mnist",
    "synthetic_split",
]


# ---- CLI and provenance --------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny run (seconds), for tests/CI")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads (default 1: least noisy on a shared machine)",
    )  # fmt: skip
    p.add_argument("--out-dir", default=str(RESULTS), help="where the JSON (and PNG) go")
    p.add_argument("--seed", type=int, default=0)
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Sets threads and seed; returns the device (raises if CUDA is asked for but absent)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available on this machine.")
    return torch.device(args.device)


def _git_commit() -> str:
    if os.environ.get("GIT_COMMIT"):  # set by device_checks.sh where no .git travels
        return os.environ["GIT_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_string(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({os.cpu_count()} logical CPUs visible)"


def provenance(
    args: argparse.Namespace, device: torch.device, threads: int | list[int] | None = None
) -> dict[str, Any]:
    """Command, commit, device, versions, date; ``threads`` defaults to torch's count (a
    benchmark whose worker processes run at other counts names those)."""
    return {
        "command": " ".join([Path(sys.executable).name, "-m", _module_name(), *sys.argv[1:]]),
        "git_commit": _git_commit(),
        "device": device_string(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads() if threads is None else threads,
        "quick": bool(args.quick),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def result_path(name: str, args: argparse.Namespace, suffix: str = ".json") -> Path:
    tag = args.device + ("-quick" if args.quick else "")
    return Path(args.out_dir) / f"{name}-{tag}{suffix}"


def write_result(name: str, args, device, payload: dict[str, Any], threads=None) -> Path:
    """Writes ``{"provenance": ..., **payload}`` to ``<out>/<name>-<device>[-quick].json``."""
    path = result_path(name, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "provenance": provenance(args, device, threads), **payload}
    path.write_text(json.dumps(_clean(data), indent=2) + "\n")
    print(f"wrote {path}")
    return path


def _clean(obj):
    """JSON-safe: NaN/inf become null, tuples lists, floats rounded to 6 significant digits."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if math.isfinite(obj) else None
    return obj


# ---- timing --------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def train_steps(net, opt, loss_fn, batches, n: int) -> None:
    """``n`` plain optimizer steps of ``loss_fn(net(x), y)`` on the next batches."""
    for _ in range(n):
        x, y = next(batches)
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def endless(batches):
    """Yields from ``batches`` forever, starting a new pass (a new shuffle) when one ends."""
    while True:
        yield from batches


def interleave(
    fns: dict[str, Callable[[], None]], reps: int, device: torch.device, warmup: int = 1
) -> dict[str, list[float]]:
    """Runs each callable ``warmup`` times, then ``reps`` rounds of A, B, ... (order rotated
    every round so neither always goes first); returns the wall seconds of every call."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
        sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            sync(device)
            t0 = time.perf_counter()
            fns[n]()
            sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


# ---- memory --------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler:
    """Samples this process's RSS every ``interval`` s in a thread; ``peak`` is the max seen.

    Torch releases the GIL inside ops, so the thread keeps sampling during them; a spike
    shorter than the interval can still be missed (the figure is a lower bound on the peak).
    """

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def peak_bytes_block(fn: Callable[[], None], device: torch.device) -> int:
    """Peak memory growth while ``fn`` runs, over the live memory just before it.

    CUDA: ``max_memory_allocated`` − ``memory_allocated`` (exact, allocator level).
    CPU: peak sampled RSS − RSS after ``gc.collect()`` + ``malloc_trim(0)`` (so freed heap
    is returned to the OS first); process-level, sampled, hence approximate.
    """
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    _malloc_trim()
    base = _rss_bytes()
    with RssSampler() as s:
        fn()
    return int(max(s.peak - base, 0))


def saved_activation_bytes(
    step_forward: Callable[[], torch.Tensor], exclude: list[torch.Tensor]
) -> int:
    """Bytes autograd saves for backward in one forward (distinct storages, parameters and
    ``exclude`` left out): the dominant per-instance training memory, counted exactly."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step_forward()
    del out
    return int(sum(seen.values()))


# ---- data ----------------------------------------------------------------------------------


def load_mnist(split: str, n: int | None = None):
    """Real MNIST from ``<repo>/../shared/data/mnist`` when present, else synthetic.

    Returns ``(Split, source)`` with ``source`` ``"mnist"`` or ``"synthetic (...)"``.
    """
    from torchgloro.data import get_dataset

    try:
        if MNIST_ROOT.exists():
            s = get_dataset("mnist", split, root=str(MNIST_ROOT))
            return (s.subset(n) if n is not None and n < len(s) else s), "mnist"
    except Exception as e:  # noqa: BLE001 - fall back to synthetic, and say why
        print(f"note: real MNIST unavailable ({e}); using synthetic data")
    size = n or (60_000 if split == "train" else 10_000)
    return synthetic_split(size, (1, 28, 28)), "synthetic (MNIST files not found)"


def synthetic_split(n: int, in_shape: tuple[int, int, int], seed: int = 0):
    """Uniform [0, 1) images and uniform labels: timing depends on shapes only."""
    from torchgloro.data import DatasetInfo, Split

    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *in_shape), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    info = DatasetInfo("synthetic", tuple(str(i) for i in range(10)), in_shape, 0.3)
    return Split(x, y, info)


def run_per_model(name: str, doc: str, models, run_model, notes: list[str], targets, argv=None):
    """The shared ``main`` of the per-model benchmarks: parse args, run each model, write JSON.

    Args:
        name: Result name (``benchmarks/results/<name>-<device>.json``).
        doc: The benchmark module's docstring (its first line is the CLI description).
        models: Argument tuples, one per model, passed to ``run_model(*m, args, device)``.
        run_model: Measures one model and returns its JSON-able result.
        notes: How to read the figures.
        targets: The issue's targets, recorded with the results.
    """
    args = parser(doc.splitlines()[0]).parse_args(argv)
    device = setup(args)
    results = [run_model(*m, args, device) for m in models]
    payload = {"targets": targets, "results": results, "notes": notes}
    write_result(name, args, device, payload)
    return payload
