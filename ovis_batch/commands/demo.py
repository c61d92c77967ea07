"""`ovis-batch demo`: the caption job on the bundled sample images with a tiny random-weight model."""

from __future__ import annotations

import argparse

from ovis_batch.commands import add_output_arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `demo` to the subcommands."""
    p = sub.add_parser(
        "demo", help="caption the bundled sample images with a tiny random-weight model (local Ray, CPU)"
    )
    p.add_argument("--workdir", default="ovis-batch-demo", help="where the model and the output go")
    add_output_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; exit status 1 when some sample row is not committed."""
    from workflows.demo import run_demo

    summary = run_demo(
        args.workdir,
        verbose=args.verbose,
        progress_interval_s=args.progress_interval,
        wait_for_lease=args.wait_for_lease,
    )
    return 0 if summary["complete"] else 1
