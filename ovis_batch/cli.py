"""The `ovis-batch` command line: parses arguments into plain values and calls a workflow.

Each subcommand is a pair (`add_<name>_parser`, the workflow function it calls). Heavy imports (torch,
Ray) happen inside the handlers, so `ovis-batch --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _make_tiny_model(args: argparse.Namespace) -> int:
    from ovis_batch.model.tiny import make_tiny_model

    path = make_tiny_model(args.dir, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote a tiny RANDOM-WEIGHT Ovis2.5 checkpoint (outputs are meaningless) to {path}")
    return 0


def _add_make_tiny_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-tiny-model",
        help="write a tiny random-weight Ovis2.5 checkpoint in the official layout (for tests and demos)",
    )
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(handler=_make_tiny_model)


# Each entry adds one subcommand. Keep the list sorted by command name.
PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_make_tiny_model,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovis-batch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
