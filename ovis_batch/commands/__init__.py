"""The `ovis-batch` subcommands, one module each: its arguments (`add_parser`) and its handler (`run`),
which turns the parsed arguments into plain values and calls a workflow or a library function.

Handlers import torch, Ray and the workflows inside the function, so `ovis-batch --help` stays instant.
`ovis_batch.cli` only assembles these modules into one parser.
"""

from __future__ import annotations

import argparse

from ovis_batch.progress import DEFAULT_INTERVAL_S


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text}")
    return value


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """`--verbose`, `--progress-interval` and `--wait-for-lease`, for the commands that run the caption job."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's own logs, worker output and progress bars (default: in Ray's log folder)",
    )
    parser.add_argument(
        "--progress-interval",
        type=_seconds,
        default=DEFAULT_INTERVAL_S,
        metavar="SECONDS",
        help=f"when stderr is not a terminal, one progress line every SECONDS (default {DEFAULT_INTERVAL_S:g})",
    )
    parser.add_argument(
        "--wait-for-lease",
        action="store_true",
        help="when another job holds the output folder, wait for it instead of stopping at once",
    )
