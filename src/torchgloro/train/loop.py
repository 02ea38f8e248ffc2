"""The training loop: :func:`train` runs a :class:`~torchgloro.train.TrainConfig`.

Per epoch: warm-up epochs train f with standard cross-entropy, then the GloRo loss; ε, λ and
the learning rate follow their schedules per batch (t = epoch + batch / batches); the power
iterations run inside ``GloroNet.forward``. After each epoch the bound is converged
(``net.refresh()``) and the test split is certified (``mode="fast"``); at the end also with
``mode="sound"``. The hot loop keeps everything on the device and syncs with the host only
every ``SYNC_EVERY`` steps (progress bar, NaN check, stop requests).
"""

from __future__ import annotations

import math
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchgloro import schedules
from torchgloro._errors import ConfigError, GloroError
from torchgloro.data import Augment, DeviceBatches, get_dataset
from torchgloro.train import checkpoint as ckpt_io
from torchgloro.train import distributed as ddp
from torchgloro.train.build import (
    LOSSES,
    OPTIMIZERS,
    TrainModule,
    build_net,
    build_optimizer,
    evaluate,
    parse_lr,
    resolve_epsilons,
)
from torchgloro.train.config import TrainConfig, config_to_dict, dump_config
from torchgloro.train.report import MetricsLog, epoch_line, summary_text, write_report

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "TrainingDivergedError",
    "TrainResult",
    "train",
    "evaluate",
    "build_net",
    "parse_lr",
    "resolve_epsilons",
]

SYNC_EVERY = 20  # steps between host syncs (progress bar, NaN check, DDP stop flag)


class TrainingDivergedError(GloroError, FloatingPointError):
    """The training loss became NaN or Inf; the last good checkpoint is kept."""


class _StopFlag:
    """SIGINT/SIGTERM set ``requested``; the loop saves and exits after the current step."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def request(self, reason: str) -> None:
        self.requested = self.requested or reason

    def _handler(self, signum, frame) -> None:
        self.request(signal.Signals(signum).name)
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))  # a 2nd signal kills

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


@dataclass
class TrainResult:
    run_dir: Path | None
    epochs_done: int
    interrupted: str | None = None  # why training stopped early, if it did
    final: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _resolve_device(name: str, env: ddp.DistEnv) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("run.device = 'cuda' but no CUDA device is available.")
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _new_run_dir(cfg: TrainConfig) -> Path:
    base = Path(cfg.run.out) / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, k = base, 1
    while run_dir.exists():
        k += 1
        run_dir = base.with_name(f"{base.name}-{k}")
    run_dir.mkdir(parents=True)
    return run_dir


def _diverged(where: str, value: float, run_dir: Path | None, last_good: int) -> Exception:
    keep = (
        f"The last good checkpoint (epoch {last_good}) in {run_dir} is kept."
        if last_good > 0 and run_dir is not None
        else "No checkpoint had been written yet."
    )
    return TrainingDivergedError(
        f"Training diverged at {where}: the loss is {value}. {keep} Lower optim.lr (e.g. --set "
        f"optim.lr=1e-4) or set optim.grad_clip, then train again."
    )


# ---- the loop ----------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    *,
    resume: str | Path | None = None,
    stop_after: float | None = None,
    progress: bool = True,
) -> TrainResult:
    """Trains a GloRo net as configured and writes a run folder (rank 0 only).

    Args:
        cfg: A validated config (for ``resume``, the run's own config).
        resume: A run folder to continue exactly from its checkpoint.
        stop_after: Stop (and checkpoint) once this many epochs are done (may be
            fractional); what a SIGINT does, at a chosen point. For tests.
        progress: Show the tqdm progress bar.

    Raises:
        TrainingDivergedError: the loss became NaN/Inf (the last good checkpoint is kept).
    """
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    env = ddp.detect()
    device = _resolve_device(cfg.run.device, env)
    ddp.setup(env, device)
    try:
        return _train(cfg, env, device, resume, stop_after, progress)
    finally:
        ddp.teardown(env)


def _train(cfg, env, device, resume, stop_after, progress) -> TrainResult:  # noqa: C901
    say = print if env.is_main else (lambda *a, **k: None)
    # -- data --
    d = cfg.data
    if d.root and Path(d.root).expanduser().exists():  # config.toml works from any folder
        d.root = str(Path(d.root).expanduser().resolve())
    for turn in (True, False):  # rank 0 first (it may download), then the others
        if env.is_main == turn:
            train_split = get_dataset(d.name, "train", d.root, download=d.download and turn)
            test_split = get_dataset(d.name, "test", d.root, download=d.download and turn)
        ddp.barrier(env)
    if d.train_subset:
        train_split = train_split.subset(min(d.train_subset, len(train_split)))
    info = train_split.info
    resolve_epsilons(cfg, info.default_epsilon)
    g, o, total = cfg.gloro, cfg.optim, cfg.run.epochs

    # -- model, optimizer, schedules, RNG --
    torch.manual_seed(cfg.run.seed)
    with torch.device(device):  # built in place: no .to() copy of the power-iteration state
        net = build_net(cfg, info.in_shape, info.num_classes)
    optimizer = build_optimizer(cfg, net, device)
    loss_fn = LOSSES[cfg.loss.name](cfg)
    if hasattr(loss_fn, "bind"):  # margin-aware losses read K and ε from the net
        loss_fn.bind(net)
    eps_sched = schedules.parse_epsilon_schedule(g.epsilon_schedule)
    lam_sched = schedules.parse_lambda_schedule(cfg.loss.lam_schedule)
    lr_sched = parse_lr(o.lr_schedule, o.warmup_lr_epochs, o.decay_start)
    data_gen = torch.Generator().manual_seed(cfg.run.seed)
    aug_gen = torch.Generator().manual_seed(cfg.run.seed + 7919 * (env.rank + 1))
    augment = Augment(generator=aug_gen).to(device) if d.augment else None
    batches = DeviceBatches(
        train_split, cfg.run.batch_size, True, data_gen, device=device,
        rank=env.rank, world_size=env.world_size,
    )  # fmt: skip
    test_split = test_split.to(device)
    num_batches = len(batches)
    module = TrainModule(net, amp=cfg.run.amp == "bf16" and device.type == "cuda")
    model = ddp.wrap(module, env, device)
    if cfg.run.compile:
        model = torch.compile(model, mode=cfg.run.compile_mode, backend=cfg.run.compile_backend)

    # -- run folder / resume --
    start_epoch, start_step = 0, 0
    best = {"vra": -1.0, "clean": -1.0, "epoch": 0}
    acc = torch.zeros(4, dtype=torch.float64, device=device)  # loss·n, clean, vra, n
    if resume is not None:
        run_dir = Path(resume)
        ck = ckpt_io.read_checkpoint(run_dir)
        ckpt_io.check_same_run(config_to_dict(cfg), ck.info["config"], run_dir)
        ckpt_io.restore_model(net, ck, run_dir / ckpt_io.TENSORS_FILE)
        ckpt_io.restore_optimizer(optimizer, ck)
        start_epoch, start_step, best = ck.epoch, ck.step, dict(ck.info["best"])
        torch.set_rng_state(ck.tensors["rng.torch_cpu"])
        if device.type == "cuda" and "rng.cuda" in ck.tensors:
            torch.cuda.set_rng_state(ck.tensors["rng.cuda"], device)
        data_gen.set_state(ck.tensors["rng.data_epoch_start"])
        aug_gen.set_state(ck.tensors["rng.augment"])
        if start_step and env.is_main:  # partial-epoch sums (all ranks') live on rank 0
            acc.copy_(ck.tensors["state.acc"].to(acc))
        if start_epoch >= total:
            say(f"{run_dir} already finished its {total} epochs; nothing to resume.")
            return TrainResult(run_dir, start_epoch)
        say(f"Resuming {run_dir} at epoch {start_epoch + 1}, step {start_step}.")
    else:
        run_dir = _new_run_dir(cfg) if env.is_main else None
        if env.is_main:
            (run_dir / "config.toml").write_text(dump_config(cfg))
    config_text = dump_config(cfg)
    log = MetricsLog(run_dir, keep_epochs=start_epoch) if env.is_main else None
    history = list(log.rows) if log else []
    last_good = start_epoch if resume is not None else 0

    def save_checkpoint(epoch, step, epoch_start_state, fresh: bool, acc_now=None) -> None:
        if not env.is_main:
            return
        opt_tensors, opt_info = ckpt_io.optimizer_tensors(optimizer)
        tensors = {
            **opt_tensors,
            **ckpt_io.rng_tensors(data_gen, aug_gen, epoch_start_state, device),
            "state.acc": acc if acc_now is None else acc_now,
        }
        meta = {
            "epoch": epoch,
            "step": step,
            "total_epochs": total,
            "best": best,
            "optim": opt_info,
            "config": config_to_dict(cfg),
            "world_size": env.world_size,
        }
        ckpt_io.write_checkpoint(run_dir, net, tensors, meta, fresh_bound=fresh)

    say(
        f"Training {cfg.model.arch} on {info.name} ({len(train_split)} train / "
        f"{len(test_split)} test) for {total} epochs on {device}"
        f"{f' x {env.world_size} ranks' if env.enabled else ''}; eps_train {g.epsilon_train:g}, "
        f"eps_test {g.epsilon_test:g}; run folder {run_dir}"
    )
    from tqdm.auto import tqdm

    rss0 = _peak_bytes(device)
    t_start = time.time()
    interrupted: str | None = None
    epoch = start_epoch
    eps = lam = lr = float("nan")
    with _StopFlag() as stop:
        for epoch in range(start_epoch, total):
            robust = g.robust and epoch >= o.warmup_epochs
            epoch_start_state = data_gen.get_state()
            skip = start_step if epoch == start_epoch else 0
            if not skip:
                acc.zero_()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            net.train()
            t0 = time.time()
            bar = tqdm(
                total=num_batches, initial=skip, desc=f"epoch {epoch + 1}/{total}",
                leave=False, disable=not (progress and env.is_main), dynamic_ncols=True,
            )  # fmt: skip
            step = skip
            for b, (x, y) in enumerate(batches):
                if b < skip:
                    continue
                t = epoch + b / num_batches
                eps = eps_sched.value(t, total, g.epsilon_train)
                lam = lam_sched.value(t, total)
                lr = lr_sched.value(t, total, o.lr)
                net.epsilon = eps
                if hasattr(loss_fn, "lam"):
                    loss_fn.lam = lam
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if augment is not None:
                    x = augment(x)

                out = model(x, robust)  # (B, C+1) GloRo logits, or (B, C) from f
                loss = loss_fn(out, y) if robust else F.cross_entropy(out, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if o.grad_clip > 0:
                    nn.utils.clip_grad_norm_(net.parameters(), o.grad_clip)
                optimizer.step()

                with torch.no_grad():
                    n = y.new_tensor(len(y), dtype=torch.float64)
                    clean = (out[:, : info.num_classes].argmax(1) == y).sum()
                    vra = (out.argmax(1) == y).sum() if robust else n * float("nan")
                    acc += torch.stack(
                        [loss.detach().double() * n, clean.double(), vra.double(), n]
                    )
                step = b + 1
                bar.update(1)
                if stop_after is not None and epoch + step / num_batches >= stop_after - 1e-9:
                    stop.request("--stop-after")
                if step % SYNC_EVERY == 0 or step == num_batches:
                    vals = acc.tolist()
                    if not math.isfinite(vals[0]):
                        bar.close()
                        raise _diverged(
                            f"epoch {epoch + 1}, step {step}", vals[0], run_dir, last_good
                        )
                    bar.set_postfix(
                        loss=f"{vals[0] / vals[3]:.4f}", acc=f"{vals[1] / vals[3]:.3f}",
                        vra=f"{vals[2] / vals[3]:.3f}" if robust else "-",
                    )  # fmt: skip
                    if env.enabled:  # agree on stopping, at the same step on every rank
                        flag = torch.tensor(float(stop.requested is not None), device=device)
                        if ddp.all_reduce_max(flag, env).item() > 0:
                            stop.request(stop.requested or "a signal on another rank")
                if stop.requested and (not env.enabled or step % SYNC_EVERY == 0):
                    break
            bar.close()

            if stop.requested and step < num_batches:  # mid-epoch: save exactly where we are
                loss_sum = acc[0].item()
                if not math.isfinite(loss_sum):
                    raise _diverged(f"epoch {epoch + 1}, step {step}", loss_sum, run_dir, last_good)
                acc_all = ddp.all_reduce_sum(acc.clone(), env)  # rank 0 keeps the sums
                save_checkpoint(epoch, step, epoch_start_state, fresh=False, acc_now=acc_all)
                interrupted = stop.requested
                break

            # -- end of epoch: reduce metrics, converge the bound, evaluate --
            sums = ddp.all_reduce_sum(acc.clone(), env).tolist()
            train_loss = sums[0] / sums[3]
            if not math.isfinite(train_loss) or not all(
                bool(torch.isfinite(p).all()) for p in net.parameters()
            ):
                raise _diverged(f"the end of epoch {epoch + 1}", train_loss, run_dir, last_good)
            net.eval()
            net.epsilon = g.epsilon_test
            net.refresh()
            lip = float(net.lipschitz_constant("fast").max())
            test = evaluate(net, test_split, g.epsilon_test, "fast", cfg.run.eval_batch_size, env)
            per_sample = max(_peak_bytes(device) - (0 if device.type == "cuda" else rss0), 0)
            row = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "train_clean_acc": sums[1] / sums[3],
                "train_vra": sums[2] / sums[3],
                "test_clean_acc": test["clean"],
                "test_vra": test["vra"],
                "test_rejection": test["rejection"],
                "epsilon": eps,
                "lam": lam if hasattr(loss_fn, "lam") and robust else float("nan"),
                "lr": lr,
                "lipschitz": lip,
                "seconds": time.time() - t0,
                "peak_mem_mb_per_sample": per_sample / cfg.run.batch_size / 1e6,
            }
            history.append(row)
            if env.is_main:
                log.append(row)
                tqdm.write(epoch_line(row, total))
                if (test["vra"], test["clean"]) > (best["vra"], best["clean"]):
                    best = {"vra": test["vra"], "clean": test["clean"], "epoch": epoch + 1}
                    net.save(run_dir / "best.safetensors")
            acc.zero_()
            done = epoch + 1
            if stop_after is not None and done >= stop_after - 1e-9:
                stop.request("--stop-after")
            if env.enabled:  # every rank must agree on stopping here
                flag = torch.tensor(float(stop.requested is not None), device=device)
                if ddp.all_reduce_max(flag, env).item() > 0:
                    stop.request(stop.requested or "a signal on another rank")
            if done % cfg.run.checkpoint_every == 0 or done == total or stop.requested:
                save_checkpoint(done, 0, data_gen.get_state(), fresh=True)
                last_good = done
            if stop.requested and done < total:
                interrupted = stop.requested
                break

    result = TrainResult(run_dir, len(history), interrupted, history=history)
    if interrupted:
        if env.is_main:
            write_report(run_dir, history, config_text, None)
            say(
                f"\nStopped ({interrupted}); checkpoint saved. Continue exactly where it left off "
                f"with:\n  gloro train --resume {run_dir}"
            )
        return result

    if env.enabled and not ddp.buffers_in_sync(net, env):
        say("warning: power-iteration buffers differ across ranks (DDP broadcast failed?)")
    # -- final evaluation: fast (converged power iteration) and sound (proven bounds) --
    net.eval()
    net.epsilon = g.epsilon_test
    fast = evaluate(net, test_split, g.epsilon_test, "fast", cfg.run.eval_batch_size, env)
    sound = evaluate(net, test_split, g.epsilon_test, "sound", cfg.run.eval_batch_size, env)
    result.final = {
        "epsilon": g.epsilon_test,
        "n_test": fast["n"],
        "clean": fast["clean"],
        "vra_fast": fast["vra"],
        "rejection_fast": fast["rejection"],
        "vra_sound": sound["vra"],
        "rejection_sound": sound["rejection"],
        "seconds": time.time() - t_start,
        "best_epoch": best["epoch"],
    }
    if env.is_main:
        write_report(run_dir, history, config_text, result.final)
        say(f"\nFinished {total} epochs ({time.time() - t_start:.1f} s).")
        say(summary_text(result.final, run_dir))
        sys.stdout.flush()
    return result
