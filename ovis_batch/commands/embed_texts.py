"""`ovis-batch embed-texts`: embed reference captions, the text side of retrieval scoring."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `embed-texts` to the subcommands."""
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
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Embed the captions and print what was written."""
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
