"""`ovis-batch checkpoint inspect|consolidate`: Trainer and DeepSpeed ZeRO checkpoints as model sources."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `checkpoint` and its actions to the subcommands."""
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
        help="weight precision (default: as stored; ZeRO checkpoints: the 16-bit weights the model ran with); "
        "fp32 of a bf16/fp16 DeepSpeed run reads the fp32 master weights of its optimizer partitions, "
        "as DeepSpeed's zero_to_fp32 does (`checkpoint inspect` says what each precision reads)",
    )
    c.add_argument(
        "--from-optimizer",
        action="store_true",
        help="take the fp32 master weights from the ZeRO optimizer partitions whatever --dtype asks",
    )
    c.add_argument(
        "--layout",
        choices=["official", "native"],
        default="official",
        help="official: AIDC-AI's release layout (llm_config / vit_config); native: transformers' ovis2_5 "
        "layout (text_config / vision_config, its tokenizer tokens and image processor), for tools that "
        "expect converted Ovis2.5 checkpoints. The same weights either way",
    )
    c.add_argument("--max-shard-gib", type=float, default=5.0, help="largest safetensors shard (GiB)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    c.set_defaults(handler=_checkpoint_errors(_consolidate))
    i = actions.add_parser(
        "inspect",
        help="kind, training step, loss, weights and what is for inference and what only for resuming",
    )
    i.add_argument("dir", help="checkpoint folder")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(handler=_checkpoint_errors(_inspect))


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


def _consolidate(args: argparse.Namespace) -> int:
    from ovis_batch.checkpoints import consolidate_checkpoint

    path = consolidate_checkpoint(
        args.src,
        args.dst,
        dtype=args.dtype,
        from_optimizer=args.from_optimizer,
        overwrite=args.overwrite,
        max_shard_bytes=int(args.max_shard_gib * 1024**3),
        output_layout=args.layout,
    )
    print(f"wrote an inference checkpoint ({args.layout} layout) to {path}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from ovis_batch.checkpoints import describe_checkpoint, format_layout, layout_summary

    layout = describe_checkpoint(args.dir)
    print(json.dumps(layout_summary(layout), indent=2) if args.json else format_layout(layout))
    return 0
