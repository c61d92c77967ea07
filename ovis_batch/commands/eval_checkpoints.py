"""`ovis-batch eval-checkpoints RUN_DIR`: caption and score every checkpoint-N of a run; trend report."""

from __future__ import annotations

import argparse
import sys

from ovis_batch.commands import add_output_arguments


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `eval-checkpoints` to the subcommands."""
    p = sub.add_parser(
        "eval-checkpoints",
        help="run the batch job and the evaluation on every checkpoint-N of a training run; trend report",
        description="Checkpoints scored before (and unchanged since) are skipped. Settings of the batch job: "
        "--config YAML plus --set key=value overrides (the keys of `caption`).",
    )
    p.add_argument("run_dir", help="the training run (Trainer output_dir holding checkpoint-N folders)")
    p.add_argument("--manifest", help="Parquet manifest of the benchmark images (with --references)")
    p.add_argument("--references", help="references Parquet (see `evaluate`)")
    p.add_argument(
        "--bench",
        metavar="SUITE",
        help="score each checkpoint on a benchmark suite instead (configs/bench.yaml; `bench run`)",
    )
    p.add_argument("--report", required=True, help="report folder: trend.md, plots/, checkpoints/")
    p.add_argument("--config", help="YAML settings of the batch job (see configs/caption.yaml)")
    p.add_argument("--address", help="Ray cluster address (auto, ray://host:port); default: a local Ray")
    p.add_argument("--limit", type=int, help="caption only the first N manifest rows (scores those only)")
    p.add_argument("--task", choices=["captions", "vqa", "mcq", "retrieval", "auto"], default="auto")
    p.add_argument("--tokenizer", choices=["python", "java"], default="python", help="PTB tokenizer")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs Java and takes a while)")
    add_output_arguments(p)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a batch-job setting overriding --config (repeatable; after RUN_DIR, so not positional)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Score the run's checkpoints; an unusable input is a one-line error (exit 2)."""
    from ovis_batch.config import ConfigError
    from ovis_batch.eval.data import EvalInputError
    from ovis_batch.model.checkpoint import CheckpointError
    from ovis_batch.pipeline.manifest import ManifestError
    from ovis_batch.pipeline.output import OutputError
    from workflows.eval_checkpoints import eval_checkpoints

    by_files = args.manifest is not None and args.references is not None
    mixed = args.bench is not None and (args.manifest or args.references or args.config)
    if (args.bench is None and not by_files) or mixed:
        print(
            "error: give either --manifest and --references (with --config), or --bench SUITE",
            file=sys.stderr,
        )
        return 2
    try:
        eval_checkpoints(
            args.run_dir,
            manifest=args.manifest,
            references=args.references,
            bench=args.bench,
            report=args.report,
            config=args.config,
            overrides=args.overrides,
            address=args.address,
            limit=args.limit,
            task=args.task,
            tokenizer=args.tokenizer,
            meteor=not args.no_meteor,
            verbose=args.verbose,
            progress_interval_s=args.progress_interval,
            wait_for_lease=args.wait_for_lease,
        )
    except (CheckpointError, ConfigError, EvalInputError, ManifestError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
