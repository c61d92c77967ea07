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


def _index_logging() -> None:
    """Progress of the index commands on stderr (library loggers only; FAISS's loader stays quiet)."""
    import logging

    for name in ("ovis_batch.index", "workflows.build_index"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)


def _index_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print an index error's message (it says what to do) instead of a traceback; exit status 2."""

    def run(args: argparse.Namespace) -> int:
        from ovis_batch.index.errors import RetrievalIndexError

        _index_logging()
        try:
            return handler(args)
        except RetrievalIndexError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return run


@_index_errors
def _index_build(args: argparse.Namespace) -> int:
    from ovis_batch.index.report import format_run_summary
    from ovis_batch.index.settings import load_index_settings
    from workflows.build_index import build_index

    settings = load_index_settings(args.config, kind=args.kind, id_column=args.id_column)
    manifest = build_index(args.embeddings, args.index, settings, overwrite=args.overwrite)
    print(format_run_summary("built", args.index, manifest))
    return 0


@_index_errors
def _index_add(args: argparse.Namespace) -> int:
    from ovis_batch.index.report import format_run_summary
    from ovis_batch.index.settings import load_index_settings
    from workflows.build_index import add_to_index

    manifest = add_to_index(args.embeddings, args.index, load_index_settings(args.config))
    print(format_run_summary("updated", args.index, manifest))
    return 0


@_index_errors
def _index_search(args: argparse.Namespace) -> int:
    from ovis_batch.index.report import format_hits
    from workflows.build_index import search_index

    hits = search_index(
        args.index,
        text=args.text,
        image=args.image,
        item_id=args.id,
        k=args.k,
        model=args.model,
        device=args.device,
    )
    asked = {"text": args.text, "image": args.image, "id": args.id}
    print(format_hits(hits, args.format, {key: str(value) for key, value in asked.items() if value}))
    return 0


@_index_errors
def _index_info(args: argparse.Namespace) -> int:
    from ovis_batch.index.report import describe_index, format_index_info

    print(format_index_info(describe_index(args.index), args.format))
    return 0


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build, grow, search and describe a FAISS retrieval index")
    actions = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    build = actions.add_parser("build", help="build a new index from the batch job's embedding Parquet")
    build.add_argument("--embeddings", required=True, help="output folder (or file) of the batch job")
    build.add_argument("--index", required=True, help="index folder to create")
    build.add_argument("--kind", choices=["auto", "flat", "ivf", "hnsw"], help="default: auto, or --config's")
    build.add_argument("--id-column", help="id column of the embeddings (default image_id)")
    build.add_argument("--config", help="index settings YAML (see configs/index.yaml)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing index at --index")
    build.set_defaults(handler=_index_build)

    add = actions.add_parser("add", help="add new embeddings to an index; ids already there are replaced")
    add.add_argument("--embeddings", required=True, help="output folder (or file) of the batch job")
    add.add_argument("--index", required=True, help="existing index folder")
    add.add_argument("--config", help="index settings YAML (reading, workers and recall settings apply)")
    add.set_defaults(handler=_index_add)

    search = actions.add_parser("search", help="nearest items to a text, an image or a stored id")
    search.add_argument("--index", required=True, help="index folder")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="text query, embedded with the index's model and strategy")
    query.add_argument("--image", help="image file query, embedded with the index's model and strategy")
    query.add_argument("--id", help="id of an indexed item: search with its stored vector")
    search.add_argument("--k", type=int, default=10, help="number of results (default 10)")
    search.add_argument("--model", help="model source for --text/--image (default: the index's model name)")
    search.add_argument("--device", help="device for the query model (default: cuda when available)")
    search.add_argument("--format", choices=["table", "json"], default="table")
    search.set_defaults(handler=_index_search)

    info = actions.add_parser("info", help="what an index holds: model, kind, count, recall, history")
    info.add_argument("--index", required=True, help="index folder")
    info.add_argument("--format", choices=["table", "json"], default="table")
    info.set_defaults(handler=_index_info)


def _checkpoint_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A checkpoint that cannot be used is a one-line error naming the file (exit 2), not a traceback."""

    def run(args: argparse.Namespace) -> int:
        from ovis_batch.model.checkpoint import CheckpointError

        try:
            return handler(args)
        except (CheckpointError, FileExistsError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return run


def _checkpoint_consolidate(args: argparse.Namespace) -> int:
    from ovis_batch.checkpoints import consolidate_checkpoint

    path = consolidate_checkpoint(
        args.src,
        args.dst,
        dtype=args.dtype,
        from_optimizer=args.from_optimizer,
        overwrite=args.overwrite,
        max_shard_bytes=int(args.max_shard_gib * 1024**3),
    )
    print(f"wrote an inference checkpoint to {path}")
    return 0


def _checkpoint_inspect(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ovis_batch.checkpoints import describe_checkpoint, format_layout, layout_summary

    layout = describe_checkpoint(Path(args.dir))
    print(json.dumps(layout_summary(layout), indent=2) if args.json else format_layout(layout))
    return 0


def _add_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "checkpoint",
        help="training checkpoints (Trainer checkpoint-N, DeepSpeed ZeRO): inspect, consolidate",
    )
    actions = p.add_subparsers(dest="checkpoint_action", required=True, metavar="ACTION")
    c = actions.add_parser(
        "consolidate",
        help="write a clean inference checkpoint (sharded safetensors, config, tokenizer; no training state)",
    )
    c.add_argument("src", help="checkpoint folder (released, Trainer checkpoint-N, DeepSpeed ZeRO)")
    c.add_argument("dst", help="output folder (written atomically)")
    c.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        help="weight precision (default: as stored; ZeRO-3 partitions: the precision the model trained in)",
    )
    c.add_argument(
        "--from-optimizer",
        action="store_true",
        help="take the fp32 master weights from the ZeRO optimizer partitions",
    )
    c.add_argument("--max-shard-gib", type=float, default=5.0, help="largest safetensors shard (GiB)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    c.set_defaults(handler=_checkpoint_errors(_checkpoint_consolidate))
    i = actions.add_parser(
        "inspect",
        help="kind, training step, loss, weights and what is for inference and what only for resuming",
    )
    i.add_argument("dir", help="checkpoint folder")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(handler=_checkpoint_errors(_checkpoint_inspect))


def _eval_checkpoints(args: argparse.Namespace) -> int:
    from ovis_batch.config import ConfigError
    from ovis_batch.eval.data import EvalInputError
    from ovis_batch.model.checkpoint import CheckpointError
    from ovis_batch.pipeline.manifest import ManifestError
    from ovis_batch.pipeline.output import OutputError
    from workflows.eval_checkpoints import eval_checkpoints

    try:
        eval_checkpoints(
            args.run_dir,
            manifest=args.manifest,
            references=args.references,
            report=args.report,
            config=args.config,
            overrides=args.overrides,
            address=args.address,
            limit=args.limit,
            task=args.task,
            tokenizer=args.tokenizer,
            meteor=not args.no_meteor,
        )
    except (CheckpointError, ConfigError, EvalInputError, ManifestError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _add_eval_checkpoints(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval-checkpoints",
        help="run the batch job and the evaluation on every checkpoint-N of a training run; trend report",
        description="Checkpoints scored before (and unchanged since) are skipped. Settings of the batch job: "
        "--config YAML plus --set key=value overrides (the keys of `caption`).",
    )
    p.add_argument("run_dir", help="the training run (Trainer output_dir holding checkpoint-N folders)")
    p.add_argument("--manifest", required=True, help="Parquet manifest of the benchmark images")
    p.add_argument("--references", required=True, help="references Parquet (see `evaluate`)")
    p.add_argument("--report", required=True, help="report folder: trend.md, plots/, checkpoints/")
    p.add_argument("--config", help="YAML settings of the batch job (see configs/caption.yaml)")
    p.add_argument("--address", help="Ray cluster address (auto, ray://host:port); default: a local Ray")
    p.add_argument("--limit", type=int, help="caption only the first N manifest rows (scores those only)")
    p.add_argument("--task", choices=["captions", "vqa", "mcq", "retrieval", "auto"], default="auto")
    p.add_argument("--tokenizer", choices=["python", "java"], default="python", help="PTB tokenizer")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs Java and takes a while)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a batch-job setting overriding --config (repeatable; after RUN_DIR, so not positional)",
    )
    p.set_defaults(handler=_eval_checkpoints)


def _caption(args: argparse.Namespace) -> int:
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
    )
    return 0 if summary["complete"] else 1


def _add_caption(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the config file")
    p.set_defaults(handler=_caption)


def _evaluate(args: argparse.Namespace) -> int:
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


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(handler=_evaluate)


def _demo(args: argparse.Namespace) -> int:
    from workflows.demo import run_demo

    return 0 if run_demo(args.workdir)["complete"] else 1


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="caption the bundled sample images with a tiny random-weight model (local Ray, CPU)"
    )
    p.add_argument("--workdir", default="ovis-batch-demo", help="where the model and the output go")
    p.set_defaults(handler=_demo)


def _embed_texts(args: argparse.Namespace) -> int:
    from ovis_batch.pipeline.embed_texts import embed_texts_to_parquet

    summary = embed_texts_to_parquet(
        args.references,
        args.output,
        args.model,
        strategy=args.strategy,
        id_column=args.id_column,
        column=args.column,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(
        f"embedded {summary['rows']} captions of {summary['images']} images "
        f"({summary['strategy']}, dim {summary['dim']}) -> {summary['path']}"
    )
    return 0


def _add_embed_texts(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed-texts",
        help="embed reference captions with a model and strategy (text side of retrieval scoring)",
    )
    p.add_argument(
        "--references", required=True, help="Parquet file or folder: id + references (list) or caption"
    )
    p.add_argument("--output", required=True, help="folder for text_embeddings.parquet")
    p.add_argument("--model", required=True, help="the model that embedded the images")
    p.add_argument("--strategy", default="last_token", choices=["last_token", "vte_mean"])
    p.add_argument("--id-column", default="image_id")
    p.add_argument("--column", help="caption column (default: references, caption or captions)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="default: cuda when available")
    p.set_defaults(handler=_embed_texts)


def _finetune(args: argparse.Namespace) -> int:
    from workflows.finetune import finetune

    finetune(
        args.data,
        args.model,
        args.output,
        config=args.config,
        overrides=args.overrides,
        freeze=args.freeze,
        loss=args.loss,
        address=args.address,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    return 0


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune Ovis2.5 on (image, caption) pairs; Trainer checkpoints that eval-checkpoints scores",
        description="Settings: --config YAML (see configs/finetune.yaml) plus --set key=value overrides; "
        "--freeze and --loss override the settings of the same name.",
    )
    p.add_argument("--data", required=True, help="Parquet file, folder or glob of (id, image, caption) pairs")
    p.add_argument("--model", required=True, help="checkpoint folder, training checkpoint or hub id")
    p.add_argument("--output", required=True, help="run folder (checkpoint-N folders, summary)")
    p.add_argument("--config", help="YAML settings (see configs/finetune.yaml)")
    p.add_argument("--freeze", metavar="SPEC", help="vte | top:K | vision+top:K | bottom:K | all")
    p.add_argument("--loss", choices=["generation", "contrastive", "both"])
    p.add_argument("--address", help="Ray cluster address (auto, ray://host:port, local): train on Ray Train")
    p.add_argument("--resume", action="store_true", help="continue the run in --output (newest checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="delete what --output holds and start afresh")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting overriding --config (repeatable)",
    )
    p.set_defaults(handler=_finetune)


# Each entry adds one subcommand. Keep the list sorted by command name.
PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_caption,
    _add_checkpoint,
    _add_demo,
    _add_embed_texts,
    _add_eval_checkpoints,
    _add_evaluate,
    _add_finetune,
    _add_index,
    _add_make_tiny_model,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ovis-batch",
        description="Batch captions, reasoning traces and retrieval embeddings with Ovis on Ray; scoring, "
        "retrieval indexes and training checkpoints. Run `ovis-batch demo` for a first look.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ovis_batch.errors import UsageError

    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:  # the message says what was wrong and what to do: no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
