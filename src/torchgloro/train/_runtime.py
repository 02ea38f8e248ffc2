"""What a training run needs from its surroundings: the device, a run folder and its lock,
peak memory, stop signals, and the error raised when the loss diverges."""

from __future__ import annotations

import fcntl
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from torchgloro._errors import ConfigError, GloroError
from torchgloro.train import distributed as ddp
from torchgloro.train.config import TrainConfig


class TrainingDivergedError(GloroError, FloatingPointError):
    """The training loss became NaN or Inf; the last good checkpoint is kept."""


class StopFlag:
    """SIGINT/SIGTERM set ``requested``; the loop saves and exits after the current step."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def request(self, reason: str) -> None:
        self.requested = self.requested or reason

    def _handler(self, signum, frame) -> None:
        self.request(signal.Signals(signum).name)
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))  # a 2nd signal kills

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


class RunFolderBusyError(GloroError, RuntimeError):
    """Another process is training in the run folder."""


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock`` while a process trains in the folder.

    Two processes writing one run folder (a run resumed while it still trains, or resumed
    twice) would interleave checkpoints and metrics rows. The lock goes with the process,
    however it ends, so a killed run leaves nothing to clean up.
    """

    def __init__(self, run_dir: Path) -> None:
        path = Path(run_dir) / ".lock"
        self.held = False
        try:
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"Cannot write in the run folder {run_dir}: {e.strerror}.") from e
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 32).decode(errors="replace").strip() or "?"
            self.release()
            raise RunFolderBusyError(
                f"{run_dir} is in use by another training process (pid {holder}): wait for "
                f"it to finish, or stop it (Ctrl-C checkpoints it), then resume."
            ) from None
        except OSError as e:  # a file system without flock (ENOLCK, ENOSYS): run unlocked
            self.release()
            print(f"warning: cannot lock {path} ({e.strerror}); not guarding the run folder "
                  f"against a second training process.", file=sys.stderr)  # fmt: skip
            return
        self.held = True
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def reset_peak(device: torch.device) -> None:
    """Starts a new peak-memory window (CUDA: allocator stats; Linux CPU: the process's
    resident-set high-water mark, via /proc/self/clear_refs; elsewhere a no-op)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_bytes(device: torch.device) -> int:
    """Peak memory since :func:`reset_peak` (CUDA: allocated; CPU: resident set size)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def resolve_device(name: str | None, env: ddp.DistEnv | None = None) -> torch.device:
    """``auto`` (or None), ``cpu``, ``cuda`` (this rank's GPU under DDP) or ``cuda:N``.

    Raises:
        ConfigError: an unknown or unsupported device, or CUDA where there is none.
    """
    name = "cuda" if name in (None, "auto") and torch.cuda.is_available() else name
    name = "cpu" if name in (None, "auto") else name
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"Unknown device {name!r}: use auto, cpu, cuda or cuda:N.") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"Device {name!r} is not supported: use auto, cpu, cuda or cuda:N.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "The device is 'cuda' (run.device, or --device) but no CUDA device is "
            "available; use cpu (or auto)."
        )
    if dev.type == "cuda" and dev.index is None:
        local_rank = env.local_rank if env is not None else 0
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def new_run_dir(cfg: TrainConfig) -> Path:
    base = Path(cfg.run.out).expanduser() / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, k = base, 1
    while run_dir.exists():
        k += 1
        run_dir = base.with_name(f"{base.name}-{k}")
    try:
        run_dir.mkdir(parents=True)
    except OSError as e:
        raise ConfigError(
            f"Cannot create the run folder {run_dir} ({e.strerror}): pass --out (run.out) a "
            f"folder that exists or can be created, and is writable."
        ) from e
    return run_dir


def diverged(where: str, value: float, run_dir: Path | None, last_good: int) -> Exception:
    keep = (
        f"The last good checkpoint (epoch {last_good}) in {run_dir} is kept."
        if last_good > 0 and run_dir is not None
        else "No checkpoint had been written yet."
    )
    return TrainingDivergedError(
        f"Training diverged at {where}: the loss is {value}. {keep} Lower optim.lr (e.g. --set "
        f"optim.lr=1e-4) or set optim.grad_clip, then train again."
    )
