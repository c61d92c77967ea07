"""`ovis-batch index build|add|search|info`: FAISS retrieval indexes over the batch job's embeddings."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `index` and its four actions to the subcommands."""
    p = sub.add_parser("index", help="build, grow, search and describe a FAISS retrieval index")
    actions = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    build = actions.add_parser("build", help="build a new index from the batch job's embedding Parquet")
    build.add_argument("--embeddings", required=True, help="output folder (or file) of the batch job")
    build.add_argument("--index", required=True, help="index folder to create")
    build.add_argument("--kind", choices=["auto", "flat", "ivf", "hnsw"], help="default: auto, or --config's")
    build.add_argument("--id-column", help="id column of the embeddings (default image_id)")
    build.add_argument("--config", help="index settings YAML (see configs/index.yaml)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing index at --index")
    build.set_defaults(handler=_build)

    add = actions.add_parser("add", help="add new embeddings to an index; ids already there are replaced")
    add.add_argument("--embeddings", required=True, help="output folder (or file) of the batch job")
    add.add_argument("--index", required=True, help="existing index folder")
    add.add_argument("--config", help="index settings YAML (reading, workers and recall settings apply)")
    add.set_defaults(handler=_add)

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
    search.set_defaults(handler=_search)

    info = actions.add_parser("info", help="what an index holds: model, kind, count, recall, history")
    info.add_argument("--index", required=True, help="index folder")
    info.add_argument("--format", choices=["table", "json"], default="table")
    info.set_defaults(handler=_info)


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
def _build(args: argparse.Namespace) -> int:
    from ovis_batch.index.report import format_run_summary
    from ovis_batch.index.settings import load_index_settings
    from workflows.build_index import build_index

    settings = load_index_settings(args.config, kind=args.kind, id_column=args.id_column)
    manifest = build_index(args.embeddings, args.index, settings, overwrite=args.overwrite)
    print(format_run_summary("built", args.index, manifest))
    return 0


@_index_errors
def _add(args: argparse.Namespace) -> int:
    from ovis_batch.index.report import format_run_summary
    from ovis_batch.index.settings import load_index_settings
    from workflows.build_index import add_to_index

    manifest = add_to_index(args.embeddings, args.index, load_index_settings(args.config))
    print(format_run_summary("updated", args.index, manifest))
    return 0


@_index_errors
def _search(args: argparse.Namespace) -> int:
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
def _info(args: argparse.Namespace) -> int:
    from ovis_batch.index.report import describe_index, format_index_info

    print(format_index_info(describe_index(args.index), args.format))
    return 0
