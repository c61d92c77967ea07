"""`ovis-batch finetune`: fine-tune Ovis2.5 on (image, caption) pairs, writing Trainer checkpoints."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `finetune` to the subcommands."""
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
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Train; the workflow prints its own summary."""
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
