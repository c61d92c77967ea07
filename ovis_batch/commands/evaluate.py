"""`ovis-batch evaluate`: score the batch job's output against references and write a report folder."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `evaluate` to the subcommands."""
    p = sub.add_parser(
        "evaluate",
        help="score the batch job's output against references and write a report folder",
        description="Caption metrics (COCO), VQA and multiple-choice accuracy, retrieval recall, run health.",
    )
    p.add_argument("--predictions", required=True, help="the batch job's output folder (or one Parquet file)")
    p.add_argument(
        "--references",
        required=True,
        help="Parquet keyed by the id column; for retrieval, the text embeddings",
    )
    p.add_argument("--report", required=True, help="report folder to write (metrics.json, report.md, plots/)")
    p.add_argument("--task", choices=["captions", "vqa", "mcq", "retrieval", "auto"], default="auto")
    p.add_argument(
        "--compare", metavar="PREVIOUS_REPORT", help="previous report folder: show deltas against it"
    )
    p.add_argument("--allow-partial", action="store_true", help="score only the ids both sides share")
    p.add_argument("--id-column", default="image_id", help="id column on both sides (default image_id)")
    p.add_argument(
        "--tokenizer", choices=["python", "java"], default="python", help="PTB tokenizer for captions"
    )
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs Java and takes a while)")
    p.add_argument("--block-mib", type=int, default=256, help="retrieval: similarity slab size in MiB")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print one line per metric and where the report is."""
    from ovis_batch.eval.options import EvaluateOptions
    from workflows.evaluate import evaluate

    options = EvaluateOptions(
        predictions=args.predictions,
        references=args.references,
        report_dir=args.report,
        task=args.task,
        compare=args.compare,
        allow_partial=args.allow_partial,
        id_column=args.id_column,
        tokenizer=args.tokenizer,
        meteor=not args.no_meteor,
        block_mib=args.block_mib,
    )
    document = evaluate(options)  # bad inputs raise EvalInputError, a UsageError: main prints it, exit 2
    for name, entry in document["metrics"].items():
        value = "skipped" if entry["value"] is None else f"{entry['value']:.4f}"
        print(f"{name:>24}  {value}")
    print(f"report: {args.report}/report.md")
    return 0
