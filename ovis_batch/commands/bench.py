"""`ovis-batch bench prepare|run`: benchmark files to a manifest and references; a suite to one report."""

from __future__ import annotations

import argparse
import posixpath

from ovis_batch.commands import add_output_arguments

TASKS = ["auto", "mcq", "yes_no", "short_answer"]
SCORINGS = ["auto", "accuracy", "mmbench-circular", "hallusionbench", "pope", "mme", "vqa"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `bench` (with `prepare` and `run`) to the subcommands."""
    p = sub.add_parser(
        "bench",
        help="benchmark evaluation: published benchmark files (VLMEvalKit's TSV layout) to comparable scores",
        description="Prepare benchmark files and run a suite of benchmarks (configs/bench.yaml) end to end.",
    )
    actions = p.add_subparsers(dest="bench_command", required=True, metavar="ACTION")

    prepare = actions.add_parser(
        "prepare",
        help="write a benchmark's manifest (one prompt per question) and references",
        description="Read a benchmark file and write OUT/manifest.parquet, OUT/references.parquet and "
        "OUT/prepared.json (what was prepared, and how).",
    )
    prepare.add_argument(
        "bench_file", metavar="BENCH_FILE", help=".tsv (VLMEvalKit's layout) or .parquet; path or URI"
    )
    prepare.add_argument("out", metavar="OUT", help="the prepared folder to write; path or URI")
    prepare.add_argument("--name", help="the benchmark's name (default: the file name without extension)")
    prepare.add_argument("--task", choices=TASKS, default="auto", help="default: from the columns")
    prepare.add_argument(
        "--scoring", choices=SCORINGS, default="auto", help="default: from the task and name"
    )
    prepare.add_argument(
        "--instruction", help="closing instruction of every prompt (default: Ovis2.5's upstream one)"
    )
    prepare.add_argument(
        "--yes-no-request",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="append ' Please answer yes or no.' to yes/no questions (default: HallusionBench only)",
    )
    prepare.add_argument(
        "--column",
        dest="columns",
        action="append",
        default=[],
        metavar="NAME=FILE_COLUMN",
        help="map a benchmark column (index, image, image_path, question, hint, answer, options, category, ...) "
        "onto the file's own column; repeatable",
    )
    prepare.set_defaults(handler=run_prepare)

    run = actions.add_parser(
        "run",
        help="prepare, caption and score every benchmark of a suite; one report",
        description="Resumable: rerun the same command after a crash; finished benchmarks are not run again.",
    )
    run.add_argument("--config", required=True, help="the suite (see configs/bench.yaml)")
    run.add_argument("--model", required=True, help="checkpoint folder, training checkpoint or hub id")
    run.add_argument(
        "--output", required=True, help="output folder (one subfolder per benchmark, report.md); path or URI"
    )
    run.add_argument(
        "--compare",
        metavar="PREVIOUS_OUTPUT",
        help="a previous bench run's output (another night, another checkpoint), path or URI: deltas",
    )
    run.add_argument("--address", help="Ray cluster address (auto, ray://host:port); default: a local Ray")
    run.add_argument("--overwrite", action="store_true", help="start every benchmark afresh")
    add_output_arguments(run)
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="caption settings over the suite's, for every benchmark",
    )
    run.set_defaults(handler=run_suite)


def run_prepare(args: argparse.Namespace) -> int:
    """Prepare one file; print what was written."""
    from ovis_batch.bench.prepare import PrepareOptions
    from ovis_batch.bench.source import BenchmarkFileError
    from workflows.bench import bench_prepare

    columns = {}
    for pair in args.columns:
        name, sep, column = pair.partition("=")
        if not sep or not name or not column:
            raise BenchmarkFileError(f"--column {pair!r} is not NAME=FILE_COLUMN")
        columns[name] = column
    name = args.name or posixpath.basename(args.bench_file.rstrip("/")).rsplit(".", 1)[0]
    options = PrepareOptions(
        name=name,
        task=args.task,
        scoring=args.scoring,
        instruction=args.instruction,
        yes_no_request=args.yes_no_request,
        columns=columns,
    )
    prepared = bench_prepare(args.bench_file, args.out, options)
    print(
        f"{prepared['name']}: {prepared['questions']} questions, task {prepared['task']} "
        f"({prepared['task_reason']}), scoring {prepared['scoring']} ({prepared['scoring_reason']})"
    )
    skipped = prepared["skipped_without_image"]["count"]
    several = prepared["images"]["questions_with_several"]
    if skipped or several:
        print(
            f"skipped without an image: {skipped}; questions with several images (composed into one): {several}"
        )
    print(f"prompt instruction: {prepared['prompt']['instruction']}")
    print(f"written: {args.out}/ (manifest.parquet, references.parquet, prepared.json)")
    return 0


def run_suite(args: argparse.Namespace) -> int:
    """Run the suite; the workflow prints the progress and the scores table."""
    from workflows.bench import bench_run

    bench_run(
        args.config,
        args.model,
        args.output,
        overrides=args.overrides,
        address=args.address,
        compare=args.compare,
        overwrite=args.overwrite,
        verbose=args.verbose,
        progress_interval_s=args.progress_interval,
    )
    return 0
