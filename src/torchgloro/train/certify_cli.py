"""``gloro certify RUN [--epsilon E] [--dataset NAME] [--data-dir D] [--mode sound|fast]``"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torchgloro._errors import CheckpointError, ConfigError

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", help="a run folder or a .safetensors model file")
    p.add_argument("--epsilon", type=float, help="radius (default: the run's gloro.epsilon_test)")
    p.add_argument("--dataset", help="dataset name (default: the run's data.name)")
    p.add_argument("--data-dir", metavar="DIR", help="data root (default: the run's data.root)")
    p.add_argument(
        "--mode", choices=("sound", "fast"), default="sound",
        help="sound: proven bounds; fast: converged power iteration (not a proof)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=_positive_int, default=1000, help="batch size")
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:

    import torchgloro as tg
    from torchgloro.io import resolve_model_file
    from torchgloro.train._runtime import resolve_device
    from torchgloro.train.build import evaluate
    from torchgloro.train.saved_run import read_saved_run

    path = Path(args.run_dir)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a run folder or a model file.")
    model_file = resolve_model_file(path)  # first: a folder of runs is named as such
    saved = read_saved_run(path)
    name = args.dataset or saved.dataset
    if not name:
        raise ConfigError(f"No config.toml next to {path}: pass --dataset NAME.")
    root = args.data_dir if args.data_dir is not None else saved.root
    device = str(resolve_device(args.device))
    net = tg.load(model_file, map_location=device, warn=False)  # its weights line says it
    eps = args.epsilon
    if eps is None:
        eps = saved.epsilon_test if saved.epsilon_test is not None else net.epsilon
    split = tg.data.get_dataset(name, "test", root=root, download=args.download).to(device)
    split.require_model(net.num_classes, net.in_shape)
    r = evaluate(net, split, eps, args.mode, args.batch_size)
    print(f"{path}: {split.info.name} test split ({r['n']} images), epsilon = {eps:g}, "
          f"mode = {args.mode}")  # fmt: skip
    print(f"  weights         {net.loaded_weights.text}")
    print(f"  clean accuracy  {100 * r['clean']:.2f}%")
    print(f"  VRA             {100 * r['vra']:.2f}%")
    print(f"  rejection rate  {100 * r['rejection']:.2f}%")
    sys.stdout.flush()
    return 0
