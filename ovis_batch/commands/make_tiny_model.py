"""`ovis-batch make-tiny-model DIR`: a tiny random-weight Ovis2.5 checkpoint in the official layout."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `make-tiny-model` to the subcommands."""
    p = sub.add_parser(
        "make-tiny-model",
        help="write a tiny random-weight Ovis2.5 checkpoint in the official layout (for tests and demos)",
    )
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument(
        "--official-vocab",
        action="store_true",
        help="Qwen3's vocabulary size and special-token ids (what vLLM's Ovis2.5 needs)",
    )
    p.add_argument(
        "--head-dim",
        type=int,
        default=16,
        help="the language model's attention head size (vLLM's CPU build needs 32, 64, 80, ...; default 16)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Write the checkpoint and say, loudly, that its outputs mean nothing."""
    from ovis_batch.model.tiny import make_tiny_model

    path = make_tiny_model(
        args.dir,
        seed=args.seed,
        overwrite=args.overwrite,
        official_vocab=args.official_vocab,
        head_dim=args.head_dim,
    )
    print(f"wrote a tiny RANDOM-WEIGHT Ovis2.5 checkpoint (outputs are meaningless) to {path}")
    return 0
