"""A fine-tuning run under DeepSpeed ZeRO in its own process (DeepSpeed keeps process-wide state).

    python tests/train/ft_deepspeed_child.py --base TINY --pairs PAIRS --run RUN_DIR [--resume] -- KEY=VALUE ...

On a CPU machine DeepSpeed would compile its shared-memory allreduce kernel (about 100 s of C++) on
first use; a one-process run never needs it, so the test process skips that build, as
tests/checkpoints/ckpt_training.py does. Everything else is the product's own DeepSpeed path.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # workflows/ beside ovis_batch/


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--freeze", required=True)
    parser.add_argument("--loss", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    from workflows.finetune import finetune

    finetune(
        args.pairs,
        args.base,
        args.run,
        overrides=args.overrides,
        freeze=args.freeze,
        loss=args.loss,
        resume=args.resume,
        quiet=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
