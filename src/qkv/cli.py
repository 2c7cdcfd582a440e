"""The ``qkv`` command: argument parsing only.

Each subcommand has its own ``_add_<name>`` function below; the code it runs lives in :mod:`qkv.apps`
(:func:`qkv.apps.run_command`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train attention models end to end and show what they learned")
    p.add_argument("--out", default="qkv-demo", help="report folder (default: qkv-demo)")
    p.add_argument("--quick", action="store_true", help="a small run of about a minute")
    p.add_argument("--seed", type=int, default=0)

    def run(args: argparse.Namespace) -> int:
        from .apps import run_command

        return run_command("demo", out=args.out, quick=args.quick, seed=args.seed)

    p.set_defaults(func=run)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time and memory of the backends against PyTorch SDPA and FlexAttention")
    p.add_argument("--out", default="bench-out", help="folder for the table and plot")
    p.add_argument("--quick", action="store_true", help="a few sizes only")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype of q, k, v (default float32)",
    )

    def run(args: argparse.Namespace) -> int:
        from .apps import run_command

        return run_command("bench", out=args.out, quick=args.quick, dtype=args.dtype)

    p.set_defaults(func=run)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="capture, measure and draw the attention of a real pretrained model")
    p.add_argument("text", nargs="?", default=None, help="the text to run through the model (none with --syntax)")
    p.add_argument("--model", default="minilm", help="model name (default: minilm)")
    p.add_argument("--out", default="qkv-inspect", help="report folder (default: qkv-inspect)")
    p.add_argument(
        "--faithfulness",
        action="store_true",
        help="also compare token importance by attention, gradients and leave-one-out (faithfulness.csv, importance.png)",
    )
    p.add_argument(
        "--syntax",
        action="store_true",
        help="score every head on template sentences with known relations (determiner->noun, verb->subject, ...)"
        " against the best fixed-offset baseline (syntax.json)",
    )
    p.add_argument("--sentences", type=int, default=500, help="template sentences for --syntax (default: 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of the template sentences for --syntax (default: 0)")

    def run(args: argparse.Namespace) -> int:
        from .apps import run_command

        return run_command(
            "inspect",
            args.text,
            model=args.model,
            out=args.out,
            faithfulness=args.faithfulness,
            syntax=args.syntax,
            sentences=args.sentences,
            seed=args.seed,
        )

    p.set_defaults(func=run)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a small attention model on one task (a module of qkv.apps.tasks; an unknown name lists them)"
    )
    p.add_argument("task", help="which task (e.g. lm, vit, molecule; an unknown name lists every task)")
    p.add_argument("--out", default=None, help="folder for the task's outputs")
    p.add_argument("--quick", action="store_true", help="a few steps only")
    p.add_argument("--seed", type=int, default=0)

    def run(args: argparse.Namespace) -> int:
        from .apps import run_command

        return run_command("train", args.task, out=args.out, quick=args.quick, seed=args.seed)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qkv", description="qkv: the attention mechanism behind one call.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_bench, _add_inspect, _add_train):
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
