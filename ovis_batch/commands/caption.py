"""`ovis-batch caption`: run or resume the caption job on a Parquet manifest of images."""

from __future__ import annotations

import argparse

from ovis_batch.commands import add_output_arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `caption` to the subcommands."""
    p = sub.add_parser(
        "caption",
        help="caption a Parquet manifest of images on Ray (captions, reasoning, embeddings -> Parquet)",
        description="Run or resume the caption job. Settings: --config YAML plus key=value overrides.",
    )
    p.add_argument(
        "--manifest", required=True, help="Parquet file, folder or glob (local, s3://, gs://, ...)"
    )
    p.add_argument("--output", required=True, help="output folder (local or URI)")
    p.add_argument("--model", required=True, help="checkpoint folder, training checkpoint or hub id")
    p.add_argument("--config", help="YAML settings (see configs/caption.yaml)")
    p.add_argument("--address", help="Ray cluster address (auto, ray://host:port); default: a local Ray")
    p.add_argument("--limit", type=int, help="process only the first N manifest rows")
    p.add_argument("--overwrite", action="store_true", help="start afresh: delete this job's earlier output")
    add_output_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the config file")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the job; exit status 1 when some manifest row is not committed."""
    from workflows.caption import run_caption

    summary = run_caption(
        args.manifest,
        args.output,
        args.model,
        config=args.config,
        overrides=args.overrides,
        address=args.address,
        limit=args.limit,
        overwrite=args.overwrite,
        verbose=args.verbose,
        progress_interval_s=args.progress_interval,
        wait_for_lease=args.wait_for_lease,
    )
    return 0 if summary["complete"] else 1
