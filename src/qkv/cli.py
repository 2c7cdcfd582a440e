"""The ``qkv`` command: argument parsing only; each subcommand calls library code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _tour(args: argparse.Namespace) -> int:
    from .tour import run_tour

    return run_tour(out=args.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qkv", description="qkv: the attention mechanism behind one call.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tour", help="a short tour of attention on a toy example")
    t.add_argument("--out", default=None, help="folder for the tour's pictures")
    t.set_defaults(func=_tour)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
