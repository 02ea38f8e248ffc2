"""One training run's state and the phases :func:`torchgloro.train.loop.train` takes it
through: open (a new run folder, or a resumed checkpoint), train an epoch, end the epoch
(reduce metrics, converge the bound, certify the test split, log), checkpoint, finish (the
fast and sound final evaluations). The hot loop keeps everything on the device and syncs with
the host only every ``SYNC_EVERY`` steps (progress bar, NaN check, stop requests).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from torchgloro import io, schedules
from torchgloro._errors import CheckpointError
from torchgloro.data import Augment, DeviceBatches
from torchgloro.gloro import GloroNet
from torchgloro.train import checkpoint as ckpt_io
from torchgloro.train import distributed as ddp
from torchgloro.train._rng import restore_rng, rng_tensors
from torchgloro.train._runtime import (
    RunLock,
    StopFlag,
    diverged,
    new_run_dir,
    peak_bytes,
    reset_peak,
)
from torchgloro.train._selection import Selection, epoch_metrics
from torchgloro.train._step import TrainStep
from torchgloro.train.build import (
    LOSSES,
    Splits,
    TrainModule,
    build_net,
    build_optimizer,
    final_evaluation,
    load_splits,
    parse_lr,
    resolve_epsilons,
)
from torchgloro.train.config import TrainConfig, config_to_dict, dump_config
from torchgloro.train.report import (
    MetricsLog,
    epoch_line,
    has_final_results,
    summary_text,
    write_report,
)

SYNC_EVERY = 20  # steps between host syncs (progress bar, NaN check, DDP stop flag)


class Run:
    """One training run's state, and the phases :func:`torchgloro.train.loop.train` runs.

    ``splits`` and ``net`` are the data and the model when given (``tg.train``); by default
    they are the config's ``[data]`` and ``[model]``.
    """

    def __init__(
        self, cfg: TrainConfig, env: ddp.DistEnv, device: torch.device,
        splits: Splits | None = None, net: GloroNet | None = None,
    ) -> None:  # fmt: skip
        self.cfg, self.env, self.device = cfg, env, device
        self.resumable = net is None  # `gloro train --resume` rebuilds the config's model
        self.say = print if env.is_main else (lambda *a, **k: None)
        splits = splits if splits is not None else load_splits(cfg, env)
        self.train_split, self.info = splits.train, splits.train.info
        resolve_epsilons(cfg, self.info.default_epsilon)
        g, o = cfg.gloro, cfg.optim

        # -- model, optimizer, schedules, RNG --
        torch.manual_seed(cfg.run.seed)
        if net is not None:
            self.net = net.to(device)
        else:  # built in place: no .to() copy of the power-iteration state
            with torch.device(device):
                self.net = build_net(cfg, self.info.in_shape, self.info.num_classes)
        if cfg.run.channels_last:  # convolutions then run NHWC: the same values, faster on CPUs
            self.net.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(cfg, self.net, device)
        self.loss_fn = LOSSES[cfg.loss.name](cfg).to(device)  # λ lives on the device
        if hasattr(self.loss_fn, "bind"):  # margin-aware losses read K and ε from the net
            self.loss_fn.bind(self.net)
        self.eps_sched = schedules.parse_epsilon_schedule(g.epsilon_schedule)
        self.lam_sched = schedules.parse_lambda_schedule(cfg.loss.lam_schedule)
        self.lr_sched = parse_lr(o.lr_schedule, o.warmup_lr_epochs, o.decay_start)
        self.data_gen = torch.Generator().manual_seed(cfg.run.seed)
        self.aug_gen = torch.Generator().manual_seed(cfg.run.seed + 7919 * (env.rank + 1))
        self.augment = Augment(generator=self.aug_gen).to(device) if cfg.data.augment else None
        self.batches = DeviceBatches(
            self.train_split, cfg.run.batch_size, True, self.data_gen, device=device,
            rank=env.rank, world_size=env.world_size,
        )  # fmt: skip
        val = splits.val.to(device) if splits.val is not None else None
        test = splits.test.to(device) if splits.test is not None else None
        self.splits = Splits(splits.train, val, test, splits.val_indices)
        self.test_split = self.splits.test
        self.num_batches = len(self.batches)
        module = TrainModule(self.net, amp=cfg.run.amp == "bf16" and device.type == "cuda")
        if cfg.run.amp != "off" and device.type != "cuda":
            self.say(f"warning: run.amp = {cfg.run.amp!r} applies on CUDA only; on {device} "
                     f"the run trains in float32.")  # fmt: skip
        self.model = ddp.wrap(module, env, device)
        compile_options = {"mode": cfg.run.compile_mode, "backend": cfg.run.compile_backend}
        if cfg.run.compile and env.enabled:  # DDP reduces in backward hooks: the module only
            self.model = torch.compile(self.model, **compile_options)
        self.acc = torch.zeros(4, dtype=torch.float64, device=device)  # loss·n, clean, vra, n
        self.train_step = TrainStep(
            self.model, self.net, self.optimizer, self.loss_fn, self.acc,
            self.info.num_classes, o.grad_clip,
            compile_options if cfg.run.compile and not env.enabled else None,
        )  # fmt: skip

        self.start_epoch, self.start_step, self.last_good = 0, 0, 0
        self.selection = Selection(self.splits)
        self.run_dir: Path | None = None
        self.history: list[dict[str, float]] = []
        self.epoch_start_state = self.data_gen.get_state()
        self.sched_now = (float("nan"),) * 3  # ε, λ, lr of the last step
        self.rss0 = 0
        self.train_peak = 0
        self.epoch_t0 = 0.0  # when this process started the current epoch
        self.carried_seconds = 0.0  # the current epoch's time before a resume
        self.lock: RunLock | None = None
        self.log: MetricsLog | None = None

    # -- run folder / resume --

    def open(self, resume: str | Path | None) -> bool:
        """Creates the run folder, or restores ``resume``; False if it had already finished."""
        cfg, env, device, total = self.cfg, self.env, self.device, self.cfg.run.epochs
        if resume is not None:
            run_dir = self.run_dir = Path(resume)
            if env.is_main and run_dir.is_dir():  # before reading: a writer may be mid-write
                self.lock = RunLock(run_dir)
            ck = ckpt_io.read_checkpoint(run_dir, settle=self.lock is not None and self.lock.held)
            ckpt_io.check_same_run(config_to_dict(cfg), ck.info["config"], run_dir)
            changed = ckpt_io.arithmetic_changes(config_to_dict(cfg), ck.info["config"])
            if changed:
                self.say(
                    f"warning: {', '.join(changed)} differ(s) from the checkpoint's: the same "
                    f"math, rounded differently (another split of the sums, other kernels), "
                    f"so the result will not match an uninterrupted run exactly."
                )
            ckpt_io.restore_model(self.net, ck, run_dir / ckpt_io.TENSORS_FILE)
            ckpt_io.restore_optimizer(self.optimizer, ck)
            self.start_epoch, self.start_step = ck.epoch, ck.step
            ckpt_io.check_val_indices(ck, self.splits.val_indices, run_dir)
            self.selection, self.last_good = Selection(self.splits, ck.info["best"]), ck.epoch
            restore_rng(ck, self.data_gen, self.aug_gen, env.rank, device)
            if self.start_step and env.is_main:  # partial-epoch sums (all ranks') live on rank 0
                self.acc.copy_(ck.tensors["state.acc"].to(self.acc))
            if self.start_step:
                self.carried_seconds = float(ck.info.get("partial_seconds", 0.0))
            if self.start_epoch >= total:
                if has_final_results(run_dir):
                    self.say(f"{run_dir} already finished its {total} epochs; nothing to resume.")
                    return False
                self.say(f"{run_dir} finished its {total} epochs but not its final evaluation.")
            self.say(f"Resuming {run_dir} at epoch {self.start_epoch + 1}, step {self.start_step}.")
            if env.is_main:  # the resolved config, with the keys a resume may change
                io.atomic_write_bytes(run_dir / "config.toml", dump_config(cfg).encode())
            ranks = ck.info.get("world_size", env.world_size)
            if ranks != env.world_size:
                self.say(
                    f"warning: the checkpoint was written by {ranks} process(es), this run has "
                    f"{env.world_size}: each rank's share of a batch, its augmentation stream "
                    f"and the order of the gradient sums differ, so the result will not match an "
                    f"uninterrupted run exactly."
                )
        elif env.is_main:
            self.run_dir = new_run_dir(cfg)
            self.lock = RunLock(self.run_dir)
            (self.run_dir / "config.toml").write_text(dump_config(cfg))
        self.log = (
            MetricsLog(self.run_dir, self.start_epoch, cfg.run.tensorboard) if env.is_main else None
        )
        self.history = list(self.log.rows) if self.log else []
        g, val, split = cfg.gloro, self.splits.val, self.selection.split
        self.say(
            f"Training {cfg.model.arch} on {self.info.name} ({len(self.train_split)} train / "
            f"{len(val) if val is not None else 'no'} validation / "
            f"{len(self.test_split) if self.test_split is not None else 'no'} test)"
            f" for {total} epochs on {device}"
            f"{f' x {env.world_size} ranks' if env.enabled else ''}; eps_train "
            f"{g.epsilon_train:g}, eps_test {g.epsilon_test:g}; best.safetensors: "
            f"{f'the best VRA on the {split} split' if split else 'none (no held-out data)'}"
            f"; run folder {self.run_dir}"
        )
        if g.robust and cfg.optim.warmup_epochs >= total:
            self.say(
                f"warning: optim.warmup_epochs ({cfg.optim.warmup_epochs}) >= run.epochs "
                f"({total}): the whole run is standard training, and the net will certify "
                f"little; lower optim.warmup_epochs (or use --epochs N, which scales it)."
            )
        reset_peak(device)  # the baseline: the resident set now, data and model loaded
        self.rss0 = peak_bytes(device)
        return True

    def save_checkpoint(self, epoch, step, epoch_start_state, fresh: bool, acc_now=None) -> None:
        """Writes the checkpoint (rank 0; a collective: every rank calls it)."""
        # Each rank augments with its own generator: keep every rank's state.
        aug_states = ddp.gather_states(self.aug_gen.get_state(), self.env, self.device)
        if not self.env.is_main:
            return
        opt_tensors, opt_info = ckpt_io.optimizer_tensors(self.optimizer)
        tensors = {
            **opt_tensors,
            **rng_tensors(self.data_gen, self.aug_gen, epoch_start_state, self.device),
            **{f"rng.augment.r{k}": t for k, t in enumerate(aug_states) if k > 0},
            "state.acc": self.acc if acc_now is None else acc_now,
        }
        if len(self.splits.val_indices):  # the validation split, for resuming (data.val_size)
            tensors["data.val_indices"] = self.splits.val_indices
        meta = {
            "epoch": epoch,
            "step": step,
            "total_epochs": self.cfg.run.epochs,
            "best": self.selection.best,
            "optim": opt_info,
            "config": config_to_dict(self.cfg),
            "world_size": self.env.world_size,
            # A mid-epoch stop: the time the epoch has taken so far, for its metrics row.
            "partial_seconds": self.carried_seconds + time.time() - self.epoch_t0 if step else 0.0,
        }
        try:
            ckpt_io.write_checkpoint(self.run_dir, self.net, tensors, meta, fresh_bound=fresh)
        except CheckpointError:
            raise
        except OSError as e:  # disk full, permissions: the files in place are whole (atomic)
            where = f"epoch {epoch + 1}, step {step}" if step else f"epoch {epoch}"
            raise CheckpointError(
                f"Could not write the checkpoint of {where} in {self.run_dir}: {e}. The "
                f"checkpoint already there (if any) is intact, as writes are atomic. Free space "
                f"or fix the permissions, then continue with: gloro train --resume {self.run_dir}"
            ) from e

    def save_mid_epoch(self, epoch: int, step: int) -> None:
        """Checkpoints a stopped epoch at ``step``, with every rank's partial sums."""
        loss_sum = self.acc[0].item()
        if not math.isfinite(loss_sum):
            raise diverged(f"epoch {epoch + 1}, step {step}", loss_sum, self.run_dir,
                            self.last_good)  # fmt: skip
        acc_all = ddp.all_reduce_sum(self.acc.clone(), self.env)  # rank 0 keeps the sums
        # The file is also a model (tg.load): it certifies at ε_test, as the epoch-end ones
        # do, not at the ε of the schedule's last step (each step sets its own on resume).
        eps_now, self.net.epsilon = self.net.epsilon, self.cfg.gloro.epsilon_test
        try:
            self.save_checkpoint(epoch, step, self.epoch_start_state, fresh=False, acc_now=acc_all)
        finally:
            self.net.epsilon = eps_now

    # -- one epoch --

    def train_epoch(self, epoch: int, stop: StopFlag, stop_after, progress: bool) -> int:
        """Trains one epoch (from the resumed step, if any); returns the steps done."""
        cfg, g, o, device = self.cfg, self.cfg.gloro, self.cfg.optim, self.device
        net, loss_fn, acc = self.net, self.loss_fn, self.acc
        total, num_batches = cfg.run.epochs, self.num_batches
        robust = g.robust and epoch >= o.warmup_epochs
        self.epoch_start_state = self.data_gen.get_state()
        skip = self.start_step if epoch == self.start_epoch else 0
        self.epoch_t0 = time.time()
        if not skip:
            acc.zero_()
            self.carried_seconds = 0.0
        reset_peak(device)
        net.train()
        bar = tqdm(
            total=num_batches, initial=skip, desc=f"epoch {epoch + 1}/{total}",
            leave=False, disable=not (progress and self.env.is_main), dynamic_ncols=True,
        )  # fmt: skip
        step = skip
        for b, (x, y) in enumerate(self.batches):
            if b < skip:
                continue
            t = epoch + b / num_batches
            eps = self.eps_sched.value(t, total, g.epsilon_train)
            lam = self.lam_sched.value(t, total)
            lr = self.lr_sched.value(t, total, o.lr)
            self.sched_now = (eps, lam, lr)
            net.epsilon = eps
            if hasattr(loss_fn, "lam"):
                loss_fn.lam = lam
            self.train_step.set_lr(lr)
            if self.augment is not None:
                x = self.augment(x)
            self.train_step(x, y, robust)  # forward, loss, update; adds the batch's sums to acc
            step = b + 1
            bar.update(1)
            if stop_after is not None and epoch + step / num_batches >= stop_after - 1e-9:
                stop.request("--stop-after")
            if step % SYNC_EVERY == 0 or step == num_batches:
                vals = acc.tolist()
                if not math.isfinite(vals[0]):
                    bar.close()
                    raise diverged(f"epoch {epoch + 1}, step {step}", vals[0], self.run_dir,
                                    self.last_good)  # fmt: skip
                bar.set_postfix({  # the epoch so far, on the training batches, at ε_train
                    "loss": f"{vals[0] / vals[3]:.4f}", "train acc": f"{vals[1] / vals[3]:.3f}",
                    "train VRA@ε_t": f"{vals[2] / vals[3]:.3f}" if robust else "-",
                    "ε_t": f"{eps:.3g}",
                })  # fmt: skip
                ddp.agree_on_stop(stop, self.env, device)  # at the same step on every rank
            if stop.requested and (not self.env.enabled or step % SYNC_EVERY == 0):
                break
        bar.close()
        self.train_peak = peak_bytes(device)  # before the epoch's evaluation
        return step

    def end_epoch(self, epoch: int, t0: float) -> None:
        """Reduces the epoch's metrics, converges the bound, certifies the validation split
        (and the test split without one, or when asked), logs, keeps the best epoch."""
        cfg, env, device, net = self.cfg, self.env, self.device, self.net
        sums = ddp.all_reduce_sum(self.acc.clone(), env).tolist()
        train_loss = sums[0] / sums[3]
        if not math.isfinite(train_loss) or not all(
            bool(torch.isfinite(p).all()) for p in net.parameters()
        ):
            raise diverged(f"the end of epoch {epoch + 1}", train_loss, self.run_dir,
                            self.last_good)  # fmt: skip
        eps_test = cfg.gloro.epsilon_test
        net.eval()
        net.epsilon = eps_test
        net.refresh()
        lip = float(net.lipschitz_constant("fast").max())
        held_out = epoch_metrics(net, self.splits, eps_test, cfg.run.eval_batch_size, env,
                                 cfg.run.test_every_epoch)  # fmt: skip
        per_sample = max(self.train_peak - (0 if device.type == "cuda" else self.rss0), 0)
        per_sample /= cfg.run.batch_size / env.world_size  # this rank's share of a batch
        eps, lam, lr = self.sched_now
        robust = cfg.gloro.robust and epoch >= cfg.optim.warmup_epochs
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_clean_acc": sums[1] / sums[3],
            "train_vra": sums[2] / sums[3],
            **held_out,
            "epsilon": eps,
            "lam": lam if hasattr(self.loss_fn, "lam") and robust else float("nan"),
            "lr": lr,
            "lipschitz": lip,
            "seconds": self.carried_seconds + time.time() - t0,  # a resumed epoch: in all
            "peak_mem_mb_per_sample": per_sample / 1e6,
        }
        self.history.append(row)
        if env.is_main:
            self.log.append(row)
            tqdm.write(epoch_line(row, cfg.run.epochs, eps_test))
            self.selection.update(row, net, self.run_dir, cfg.run.epochs)
        self.acc.zero_()

    # -- the end --

    def report_stop(self, why: str) -> None:
        if self.env.is_main:
            write_report(self.run_dir, self.history, dump_config(self.cfg), None,
                         self.cfg.gloro.epsilon_test, self.selection.best)  # fmt: skip
            if not self.resumable:
                self.say(f"\nStopped ({why}) after {len(self.history)} epochs; the net keeps "
                         f"the weights it had then.")  # fmt: skip
                return
            again = (
                f"torchrun --nproc_per_node {self.env.world_size} -m torchgloro.cli train"
                if self.env.enabled
                else "gloro train"
            )
            self.say(
                f"\nStopped ({why}); checkpoint saved. Continue exactly where it left off "
                f"with:\n  {again} --resume {self.run_dir}"
            )

    def finish(self, t_start: float) -> dict[str, Any]:
        """Final evaluation: fast (converged power iteration) and sound (proven bounds)."""
        cfg, env, net = self.cfg, self.env, self.net
        if env.enabled and not ddp.buffers_in_sync(net, env):
            self.say("warning: power-iteration buffers differ across ranks (DDP broadcast failed?)")
        eps_test, batch = cfg.gloro.epsilon_test, cfg.run.eval_batch_size
        net.eval()
        net.epsilon = eps_test
        test = self.test_split
        final = {
            **(final_evaluation(net, test, eps_test, batch, env) if test is not None else {}),
            "seconds": time.time() - t_start,
            "best_epoch": self.selection.best["epoch"],
            "best_split": self.selection.best["split"],
        }
        if env.is_main:
            write_report(self.run_dir, self.history, dump_config(cfg), final, eps_test,
                         self.selection.best)  # fmt: skip
            self.say(f"\nFinished {cfg.run.epochs} epochs ({time.time() - t_start:.1f} s).")
            self.say(summary_text(final, self.run_dir))
            sys.stdout.flush()
        return final
