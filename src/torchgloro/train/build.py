"""Building blocks of training: loss/optimizer registries, model and optimizer
construction, extra LR schedules, the module DDP wraps, and test-split evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchgloro import schedules
from torchgloro._errors import ConfigError
from torchgloro.data import Split, get_dataset
from torchgloro.gloro import GloroNet
from torchgloro.losses import GloroCrossEntropy, GloroEMMA, GloroHinge, GloroTrades
from torchgloro.nn.models import create_model
from torchgloro.train import distributed as ddp
from torchgloro.train.config import TrainConfig

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "CosineLR",
    "WarmupLR",
    "parse_lr",
    "resolve_epsilons",
    "build_net",
    "wrap_backbone",
    "hold_out",
    "build_optimizer",
    "TrainModule",
    "evaluate",
    "load_splits",
    "final_evaluation",
    "Splits",
    "validation_indices",
]

# name -> factory(config) -> loss module on (B, C+1) logits. A loss with a ``lam``
# attribute gets λ from loss.lam_schedule at every batch.
LOSSES: dict[str, Callable[[TrainConfig], nn.Module]] = {
    "ce": lambda cfg: GloroCrossEntropy(),
    "trades": lambda cfg: GloroTrades(robust=cfg.loss.trades_robust),
    "emma": lambda cfg: GloroEMMA(),  # bound to the net by the loop (loss.bind(net))
    "hinge": lambda cfg: GloroHinge(),
    "certified-hinge": lambda cfg: GloroHinge(certified=True),
}

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "nadam": torch.optim.NAdam,
}


# ---- schedules the core module does not have -----------------------------------------------


@dataclass(frozen=True)
class CosineLR:
    """``cosine``: linear warm-up over ``warmup`` epochs, then cosine decay to 0."""

    warmup: float = 0.0

    def value(self, t: float, total: int, init_lr: float) -> float:
        if t < self.warmup:
            return init_lr * t / self.warmup
        frac = min((t - self.warmup) / max(total - self.warmup, 1e-12), 1.0)
        return init_lr * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass(frozen=True)
class WarmupLR:
    """Any schedule, multiplied by a linear ramp from 0 over ``warmup`` epochs."""

    base: Any
    warmup: float

    def value(self, t: float, total: int, init_lr: float) -> float:
        return self.base.value(t, total, init_lr) * min(1.0, t / self.warmup)


def parse_lr(text: str, warmup_lr_epochs: float = 0.0, decay_start: float = 0.5):
    """``constant``, ``decay_to_X`` (from ``decay_start`` of the epochs) or ``cosine``, with an
    optional linear warm-up."""
    if text.strip() == "cosine":
        return CosineLR(warmup_lr_epochs)
    base = schedules.parse_lr_schedule(text, decay_start)
    return WarmupLR(base, warmup_lr_epochs) if warmup_lr_epochs > 0 else base


# ---- building blocks ---------------------------------------------------------------------


def resolve_epsilons(cfg: TrainConfig, default_epsilon: float) -> None:
    """Fills ``epsilon_test = 0`` with the dataset default and ``epsilon_train = 0`` with it."""
    if cfg.gloro.epsilon_test <= 0:
        cfg.gloro.epsilon_test = float(default_epsilon)
    if cfg.gloro.epsilon_train <= 0:
        cfg.gloro.epsilon_train = cfg.gloro.epsilon_test


def build_net(cfg: TrainConfig, in_shape, num_classes: int) -> GloroNet:
    """The config's model (``[model]``) as a GloRo net (``[gloro]``)."""
    m = cfg.model
    backbone = create_model(m.arch, tuple(in_shape), num_classes, m.activation, m.init, **m.options)
    return wrap_backbone(cfg, backbone)


def wrap_backbone(cfg: TrainConfig, backbone: nn.Module, in_shape=None) -> GloroNet:
    """``backbone`` as a GloRo net with the config's ``[gloro]`` settings."""
    return GloroNet(
        backbone,
        cfg.gloro.epsilon_test if cfg.gloro.epsilon_test > 0 else 1.0,
        power_iterations=cfg.gloro.power_iterations,
        lipschitz=cfg.gloro.lipschitz,
        cuda_graphs=cfg.gloro.cuda_graphs,
        in_shape=None if in_shape is None else tuple(in_shape),
    )


def build_optimizer(cfg: TrainConfig, net: GloroNet, device: torch.device):
    """The optimizer; weight decay only on ≥2-d weights (never biases or buffers)."""
    o = cfg.optim
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps}
    cls = OPTIMIZERS[o.name]
    # auto: fused kernels on CUDA, unless the compiled step fuses the update itself.
    fused = o.fused == "on" or (o.fused == "auto" and device.type == "cuda" and not cfg.run.compile)
    if fused and "fused" in cls.__init__.__code__.co_varnames:
        kwargs["fused"] = True
    return cls([g for g in groups if g["params"]], **kwargs)


class TrainModule(nn.Module):
    """What DDP wraps: ``forward(x, robust)`` gives the GloRo logits or f's logits.

    With ``amp=True`` the backbone alone runs under CUDA bfloat16 autocast and its logits are
    cast back to float32, so the Lipschitz bound and ⊥ stay in float32. (No hooks on the
    backbone: a GloroNet refuses hooked layers, whose outputs its bounds cannot see.)
    """

    def __init__(self, net: GloroNet, amp: bool) -> None:
        super().__init__()
        self.net = net
        self._amp = amp

    def forward(self, x: torch.Tensor, robust: bool) -> torch.Tensor:
        if not self._amp:
            return self.net(x) if robust else self.net.backbone(x)
        self.net._check_input(x, check_finite=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = self.net.backbone(x)
        y = y.float()  # (B, C)
        return self.net._with_bottom(y) if robust else y


@torch.no_grad()
def evaluate(
    net: GloroNet,
    split: Split,
    epsilon: float,
    mode: str = "fast",
    batch_size: int = 1000,
    env: ddp.DistEnv | None = None,
) -> dict[str, float]:
    """Clean accuracy, VRA and rejection rate of ``net`` on ``split`` (sharded over ranks)."""
    env = env or ddp.DistEnv()
    idx = torch.tensor_split(torch.arange(len(split)), env.world_size)[env.rank]
    x, y = split.x[idx.to(split.x.device)], split.y[idx.to(split.y.device)]
    counts = torch.zeros(4, dtype=torch.float64, device=x.device)  # n, clean, vra, rejected
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        c = net.certify(xb, epsilon=epsilon, mode=mode)
        correct = c.pred.to(yb.device) == yb
        cert = c.certified.to(yb.device)
        counts += torch.stack(
            [
                torch.tensor(float(len(yb)), dtype=torch.float64, device=x.device),
                correct.sum().double(),
                (correct & cert).sum().double(),
                (~cert).sum().double(),
            ]
        )
    n, clean, vra, rej = ddp.all_reduce_sum(counts, env).tolist()
    n = max(n, 1.0)
    return {"clean": clean / n, "vra": vra / n, "rejection": rej / n, "n": int(n)}


_VAL_SEED_OFFSET = 7907  # the split's generator is not the data order's (also run.seed)


@dataclass(frozen=True)
class Splits:
    """The data of a run: ``val`` is None when ``data.val_size`` is 0."""

    train: Split
    val: Split | None
    test: Split | None  # None: no final test evaluation (tg.train without test data)
    val_indices: torch.Tensor  # into the full training split; recorded in the checkpoint


def absolute_npz(name: str) -> str:
    """``npz:PATH`` with PATH made absolute when it exists (so that the run's config.toml
    works from any folder); other names unchanged."""
    if name.startswith("npz:") and Path(name[4:]).expanduser().is_file():
        return "npz:" + str(Path(name[4:]).expanduser().resolve())
    return name


def final_evaluation(
    net: GloroNet, split: Split, epsilon: float, batch_size: int, env: ddp.DistEnv
) -> dict[str, float]:
    """The end-of-training figures on the test split: fast and sound VRA, clean accuracy."""
    fast = evaluate(net, split, epsilon, "fast", batch_size, env)
    sound = evaluate(net, split, epsilon, "sound", batch_size, env)
    return {
        "epsilon": epsilon,
        "n_test": fast["n"],
        "clean": fast["clean"],
        "vra_fast": fast["vra"],
        "rejection_fast": fast["rejection"],
        "vra_sound": sound["vra"],
        "rejection_sound": sound["rejection"],
    }


def validation_indices(n: int, size: int, seed: int) -> torch.Tensor:
    """The sorted indices of the ``size`` images held out of a training split of ``n``: the
    first ``size`` of a permutation drawn by a generator seeded with ``seed``."""
    if size >= n:
        raise ConfigError(
            f"data.val_size = {size} leaves no training images (the training split has {n}); "
            f"lower it, or set 0 for no validation split."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + _VAL_SEED_OFFSET))
    return perm[:size].sort().values


def load_splits(cfg: TrainConfig, env: ddp.DistEnv) -> Splits:
    """The train, validation and test splits; rank 0 loads (and may download) first.

    ``data.val_size`` training images (:func:`validation_indices`, seeded by ``run.seed``)
    are held out; ``data.train_subset`` then keeps the first N of the rest.
    """
    d = cfg.data
    if d.root and Path(d.root).expanduser().exists():  # config.toml works from any folder
        d.root = str(Path(d.root).expanduser().resolve())
    d.name = absolute_npz(d.name)
    for turn in (True, False):
        if env.is_main == turn:
            train_split = get_dataset(d.name, "train", d.root, download=d.download and turn)
            test_split = get_dataset(d.name, "test", d.root, download=d.download and turn)
        ddp.barrier(env)
    splits = hold_out(train_split, d.val_size, cfg.run.seed, test_split)
    if d.train_subset:
        kept = splits.train.subset(min(d.train_subset, len(splits.train)))
        splits = Splits(kept, splits.val, splits.test, splits.val_indices)
    return splits


def hold_out(split: Split, size: int, seed: int, test: Split | None) -> Splits:
    """``split`` less ``size`` images held out (:func:`validation_indices`) as the
    validation split (none for ``size`` 0), with ``test``."""
    if not size:
        return Splits(split, None, test, torch.empty(0, dtype=torch.long))
    val_idx = validation_indices(len(split), size, seed)
    keep = torch.ones(len(split), dtype=torch.bool)
    keep[val_idx] = False
    return Splits(split.subset(keep.nonzero().squeeze(1)), split.subset(val_idx), test, val_idx)
