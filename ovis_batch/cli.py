"""The `ovis-batch` command line: one parser assembled from the subcommands in `ovis_batch/commands/`.

Each subcommand lives in its own module there (its arguments and the handler that calls a workflow), so a
command reads in one place. Heavy imports (torch, Ray) happen inside the handlers, so
`ovis-batch --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ovis_batch.commands import (
    bench,
    caption,
    checkpoint,
    demo,
    embed_texts,
    eval_checkpoints,
    evaluate,
    finetune,
    index,
    make_tiny_model,
)

# Each module adds one subcommand. Keep the list sorted by command name: it is the order of `--help`.
COMMANDS = [
    bench,
    caption,
    checkpoint,
    demo,
    embed_texts,
    eval_checkpoints,
    evaluate,
    finetune,
    index,
    make_tiny_model,
]


def build_parser() -> argparse.ArgumentParser:
    """The `ovis-batch` parser with every subcommand; each sets `handler` to the function it runs."""
    parser = argparse.ArgumentParser(
        prog="ovis-batch",
        description="Batch captions, reasoning traces and retrieval embeddings with Ovis on Ray; scoring, "
        "retrieval indexes and training checkpoints. Run `ovis-batch demo` for a first look.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: the process's), run the subcommand, return its exit status.

    Errors the user can fix and faults that stop a run print one line (`error: ...`) instead of a
    traceback; a fault's traceback is in the file its line names (printed too with `--verbose`).
    """
    args = build_parser().parse_args(argv)
    from ovis_batch.errors import EXIT_INTERRUPTED, EXIT_USAGE, JobFault, UsageError

    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:  # the message says what was wrong and what to do: no traceback
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except JobFault as exc:
        if getattr(args, "verbose", False) and exc.traceback_file:
            with open(exc.traceback_file, encoding="utf-8") as fh:
                sys.stderr.write(fh.read())
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # before or after a job's own handling (which says how far it got)
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
