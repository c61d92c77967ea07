"""Fine-tune Ovis2.5 on (image, caption) pairs, writing Trainer checkpoints that the evaluation reads back.

    ovis-batch finetune --data pairs.parquet --model AIDC-AI/Ovis2.5-2B --output runs/ft \\
        [--config configs/finetune.yaml] [--freeze top:4] [--loss both] [--address auto] \\
        [--resume | --overwrite] [--set learning_rate=2e-5 ...]
    ovis-batch eval-checkpoints runs/ft --manifest bench.parquet --references refs.parquet --report reports/ft

The story, each step delegated to ovis_batch.train:
1. read and validate the settings (unknown keys and impossible values stop here);
2. plan: the run folder (another run there is refused unless --overwrite; --resume continues this one
   from its newest checkpoint, with the same settings and data), the model files, the freeze spec
   against the model's layers, then a check of every pair (no caption, unreadable image: skipped and
   counted) - all before training; print what trains;
3. train: here with the Hugging Face Trainer, or on Ray Train workers when --address is given;
   checkpoints `RUN_DIR/checkpoint-N` in the official layout;
4. write the run summary `RUN_DIR/finetune_summary.json` (last) and print it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ovis_batch.config import load_config
from ovis_batch.train.job import finish_finetune, format_summary, plan_finetune
from ovis_batch.train.settings import FinetuneConfig


def finetune(
    data: str,
    model: str,
    output: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    overrides: list[str] = (),
    freeze: str | None = None,
    loss: str | None = None,
    address: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run (or resume) a fine-tuning run; returns the summary also saved as finetune_summary.json."""
    started = time.perf_counter()
    # 1. Settings: the file, then --set overrides, then the --freeze / --loss flags.
    flags = [f"freeze={freeze}"] * (freeze is not None) + [f"loss={loss}"] * (loss is not None)
    settings: FinetuneConfig = load_config(FinetuneConfig, config, [*overrides, *flags])

    # 2. Every check before training; the trainable share is printed before any step.
    plan = plan_finetune(data, model, output, settings, resume=resume, overwrite=overwrite)
    if not quiet:
        for note in plan.notes:
            print(f"note: {note}")
        print(plan.trainable.describe())
        pairs = plan.scan.summary()
        print(f"pairs: {pairs['used']} usable of {pairs['pairs']}, skipped {pairs['skipped_by_reason'] or 0}")
        if plan.resume_from is not None:
            print(f"resuming from {plan.resume_from}")

    # 3. Train: in this process, or on Ray Train workers of a cluster.
    if address is None:
        from ovis_batch.train.session import run_training

        run_training(plan)
    else:
        from ovis_batch.ray_session import ray_session
        from ovis_batch.train.ray_train import train_on_ray

        # verbose: the training workers' own reports (loss, steps) are the progress of a Ray Train run.
        with ray_session(address, verbose=True, announce=False):
            train_on_ray(plan)

    # 4. The summary, written last.
    summary = finish_finetune(plan, started)
    if not quiet:
        print(format_summary(summary))
    return summary
