"""The ``gloro`` command line: ``gloro {train,certify,evaluate,compare} ...``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together (imported lazily, so
``gloro --help`` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from torchgloro._errors import GloroError

__all__ = ["main", "build_parser"]

# name -> (module, one-line help)
_COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("torchgloro.train.cli", "train a GloRo net from a recipe or config"),
    "certify": ("torchgloro.train.certify_cli", "certify a trained run on its test split"),
    "evaluate": ("torchgloro.evaluate.cli", "full evaluation: VRA, PGD, bounds, cost"),
    "compare": ("torchgloro.evaluate.compare_cli", "side-by-side table of several runs"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gloro", description="Train and certify globally-robust (GloRo) neural networks."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=_DefaultsFormatter,
        )
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless it names its default already or
    has none worth showing (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchgloro")
    except PackageNotFoundError:  # a source checkout that was not installed
        return "(not installed)"


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _peer_failed(e: RuntimeError) -> bool:
    """Whether ``e`` is a collective that failed because another torchrun rank exited."""
    if not _under_torchrun():
        return False
    # What gloo says when the other end of a collective has exited. Anything else (this
    # rank's own NCCL error, a watchdog timeout) keeps its traceback.
    gone = ("Connection closed by peer", "Connection reset by peer")
    return any(g in str(e) for g in gone)


def console(argv: list[str] | None = None) -> None:
    """The ``gloro`` console script: :func:`main`, then exit with its status.

    Under torchrun a rank that failed leaves at once (``os._exit`` after flushing): its
    interpreter's shutdown could wait on the process group's threads while the other ranks
    wait on it (seen in ~1 of 6 runs of tests/train/test_train_ddp.py), and torchrun stops
    the others only once it exits.
    """
    code = main(argv)
    if code and _under_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gloro`` command; returns its exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]  # the main job: train the embedded default
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    try:
        if args.command != "train" and _under_torchrun():
            raise GloroError(
                f"gloro {args.command} runs in one process; under torchrun every rank would "
                f"repeat the whole job and write the same files. Run it without torchrun."
            )
        return int(args._run(args) or 0)
    except GloroError as e:
        print(f"gloro {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, a path gone: no traceback to read
        print(
            f"gloro {args.command}: error: {e} (an operating-system error: check that path, "
            f"the free space and the permissions).",
            file=sys.stderr,
        )
        return 1
    except RuntimeError as e:
        if not _peer_failed(e):
            raise
        first = str(e).splitlines()[0][:300]
        print(
            f"gloro {args.command} (rank {os.environ.get('RANK', '?')}): stopped, as another "
            f"rank stopped first; that rank's error is above. (This rank saw: {first})",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:  # outside training's own handler (loading data, evaluating)
        hint = " (`gloro train --resume RUN` finishes a run)" if args.command == "train" else ""
        print(f"\ngloro {args.command}: interrupted{hint}.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    console()
