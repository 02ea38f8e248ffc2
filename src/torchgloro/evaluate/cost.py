"""Training and certification cost (Figure 3a/3b, Appendix D).

* Training cost is read from the run's ``metrics.csv`` (whatever columns exist).
* Certification cost is measured here: the time and peak memory to certify the whole test
  set (fast mode with the frozen K, and sound mode), next to plain inference of f on the same
  data in the same process, with interleaved repeats and medians. Memory is per instance:
  the peak CUDA allocation above the baseline divided by the batch size, or on CPU the peak
  RSS growth (sampled) divided by the batch size.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import resource
import statistics
import threading
import time
from pathlib import Path

import torch

from torchgloro.evaluate import progress

__all__ = ["read_training_cost", "measure_certification_cost", "PeakMemory", "pick_column"]

_MB = 2.0**20


def pick_column(columns: list[str], include: tuple[str, ...], exclude: tuple[str, ...] = ()):
    """First column whose lower-cased name contains any of ``include`` and none of
    ``exclude``, or ``None``."""
    for c in columns:
        low = c.lower()
        if any(s in low for s in include) and not any(s in low for s in exclude):
            return c
    return None


def _to_mb(column: str, value: float) -> float:
    low = column.lower()
    if "gib" in low or "gb" in low:
        return value * 1024.0
    if "kib" in low or "kb" in low:
        return value / 1024.0
    if "mib" in low or "mb" in low:
        return value
    if "byte" in low:
        return value / _MB
    return value  # assume MB


def _floats(rows: list[dict], column: str | None) -> list[float]:
    out = []
    if column is None:
        return out
    for r in rows:
        try:
            v = float(r.get(column, ""))
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            out.append(v)
    return out


def read_training_cost(run_dir: str | os.PathLike) -> dict | None:
    """Seconds per epoch (median) and peak memory per instance (max, MB) from
    ``metrics.csv``; ``None`` when the file is absent or unreadable. Missing columns give
    ``None`` values; the column names used are recorded."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return None
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError):
        return None
    columns = list(rows[0].keys()) if rows else []
    sec_col = pick_column(columns, ("sec", "epoch_time", "time_s", "duration"), ("eval", "cert"))
    mem_inst = pick_column(columns, ("per_instance", "per_inst", "instance", "per_sample"))
    mem_col = mem_inst if mem_inst and "mem" in mem_inst.lower() else None
    if mem_col is None:
        mem_col = pick_column(columns, ("mem",))
    secs = _floats(rows, sec_col)
    mems = _floats(rows, mem_col)
    return {
        "epochs": len(rows),
        "sec_per_epoch": statistics.median(secs) if secs else None,
        "total_train_seconds": sum(secs) if secs else None,
        "mem_mb_per_instance": max(_to_mb(mem_col, m) for m in mems) if mems else None,
        "mem_is_per_instance": bool(mem_col and mem_col == mem_inst),
        "columns": {"seconds": sec_col, "memory": mem_col},
    }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Context manager measuring the peak memory growth (bytes) of the code inside it:
    CUDA max allocated above the starting allocation, or sampled RSS growth on CPU."""

    def __init__(self, device: torch.device | str, interval: float = 5e-4) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._base = _rss_bytes()
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(torch.cuda.max_memory_allocated(self.device) - self._base, 0)
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss_bytes())
            self.peak = max(self._max - self._base, 0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_certification_cost(
    net, x: torch.Tensor, batch_size: int = 256, repeats: int = 3
) -> dict:
    """Times plain inference of f, fast certification (frozen K) and sound certification of
    all of ``x`` (on the net's device), interleaved ``repeats`` times; medians and ratios.

    The one-time setup (power iteration to convergence; the sound constants and float64
    copy) is timed separately and excluded from the per-pass times.
    """
    device = x.device
    n = x.shape[0]
    # One-time setup, timed on copies so the net's own caches are left as they are.
    setup = {}
    probe = copy.deepcopy(net)
    t0 = time.perf_counter()
    probe.refresh()
    _sync(device)
    setup["fast_setup_seconds"] = time.perf_counter() - t0
    probe._sound_cache = None
    t0 = time.perf_counter()
    probe.lipschitz_constant("sound")
    _sync(device)
    setup["sound_setup_seconds"] = time.perf_counter() - t0
    del probe
    if net.is_stale:
        net.refresh()
    net.lipschitz_constant("sound")  # K is precomputed before the timed passes

    passes = {
        "inference": lambda xb: net.backbone(xb).argmax(1),
        "certify_fast": lambda xb: net.certify(xb, mode="fast").certified,
        "certify_sound": lambda xb: net.certify(xb, mode="sound").certified,
        "certify_sound_float64": lambda xb: net.certify(xb, precision="float64").certified,
    }
    times: dict[str, list[float]] = {k: [] for k in passes}
    mems: dict[str, list[int]] = {k: [] for k in passes}
    bs = max(1, min(batch_size, n))
    for fn in passes.values():  # warm-up (allocator, kernels)
        fn(x[:bs])
    with progress.bar("certification cost", max(1, repeats) * len(passes), "pass") as shown:
        for _ in range(max(1, repeats)):
            for name, fn in passes.items():
                _sync(device)
                t0 = time.perf_counter()
                with PeakMemory(device) as pm:
                    for i in range(0, n, bs):
                        fn(x[i : i + bs])
                    _sync(device)
                times[name].append(time.perf_counter() - t0)
                mems[name].append(pm.peak)
                shown.update(1)
    out: dict = {"n": n, "batch_size": bs, "repeats": max(1, repeats), "device": str(device)}
    out.update(setup)
    base_t = statistics.median(times["inference"])
    base_m = statistics.median(mems["inference"]) / bs / _MB
    for name in passes:
        t = statistics.median(times[name])
        m = statistics.median(mems[name]) / bs / _MB
        out[name] = {
            "seconds": t,
            "mem_mb_per_instance": m,
            "time_ratio": t / base_t if base_t > 0 else None,
            "mem_ratio": m / base_m if base_m > 0 else None,
        }
    out["memory_method"] = "cuda_max_allocated" if device.type == "cuda" else "rss_growth_sampled"
    return out
