"""Evaluate a whole training run checkpoint by checkpoint, and report each metric against the global step.

    ovis-batch eval-checkpoints runs/ft --manifest bench.parquet --references bench_refs.parquet \\
        --report reports/ft [--config configs/caption.yaml] [--address auto] [--set max_new_tokens=64 ...]
    ovis-batch eval-checkpoints runs/ft --bench configs/bench.yaml --report reports/ft [--set ...]

The story, each step delegated to ovis_batch and the two jobs it chains:
1. find every `checkpoint-N` of the run and check each one (kind, weights, ZeRO files, trainer_state.json)
   before any work starts; read the caption settings once;
2. for each checkpoint not already scored: run the batch job with the checkpoint as the model (a ZeRO
   checkpoint is consolidated once, by `load_model`), then the evaluation, into
   `REPORT/checkpoints/checkpoint-N/`; with `--bench`, the benchmark suite instead (`bench run`, its
   suite report in `checkpoint-N/eval/`, one row of the trend per benchmark metric); a checkpoint scored
   before, whose files have not changed since, is skipped;
3. write the trend report: every metric and the training loss against the global step, as a table
   (trend.md, trend.csv), PNG plots, and trend.json last.
"""

from __future__ import annotations

import os
from typing import Any

from ovis_batch.bench.settings import BenchConfig
from ovis_batch.checkpoints.trend import checkpoint_scores, find_run_checkpoints, write_trend_report
from ovis_batch.config import CaptionConfig, load_config
from ovis_batch.eval.options import EvaluateOptions
from ovis_batch.pipeline.job import reserved_cpus
from ovis_batch.progress import DEFAULT_INTERVAL_S
from ovis_batch.ray_session import ray_session
from ovis_batch.storage import location
from workflows.bench import bench_run
from workflows.caption import run_caption
from workflows.evaluate import evaluate


def eval_checkpoints(
    run_dir: str | os.PathLike,
    *,
    manifest: str | None = None,
    references: str | None = None,
    bench: str | os.PathLike | None = None,
    report: str | os.PathLike,
    config: str | os.PathLike | None = None,
    overrides: list[str] = (),
    address: str | None = None,
    limit: int | None = None,
    task: str = "auto",
    tokenizer: str = "python",
    meteor: bool = True,
    verbose: bool = False,
    progress_interval_s: float = DEFAULT_INTERVAL_S,
    wait_for_lease: bool = False,
) -> dict[str, Any]:
    """Score every checkpoint of `run_dir` not scored yet, on `manifest` + `references` or on the benchmark
    suite `bench`; returns the trend.json document it wrote.

    `verbose`: Ray's own logs on the terminal too; `progress_interval_s`, `wait_for_lease`: see `run_caption`.
    """
    # 1. Every checkpoint and the settings are checked up front: a bad one stops the run before any work.
    checkpoints = find_run_checkpoints(run_dir, report)
    if bench is not None:
        suite = load_config(BenchConfig, bench)
        cpus = max(
            reserved_cpus(load_config(CaptionConfig, None, suite.caption_overrides(b, list(overrides))))
            for b in suite.benchmarks
        )
    else:
        cpus = reserved_cpus(load_config(CaptionConfig, config, list(overrides)))
        EvaluateOptions(
            predictions="", references=references, report_dir="", task=task, tokenizer=tokenizer
        )  # checks

    # 2. One Ray session for all the checkpoints; each is captioned, then scored.
    to_score = []
    for checkpoint in checkpoints:
        if checkpoint.is_scored():
            print(f"{checkpoint.path.name}: already scored, skipped ({checkpoint.eval_dir})")
        else:
            to_score.append(checkpoint)
    if to_score:
        with ray_session(address, num_cpus=cpus, verbose=verbose):
            for checkpoint in to_score:
                print(f"{checkpoint.path.name}: {checkpoint.layout.kind}, captioning and scoring")
                checkpoint.prepare()
                if bench is not None:
                    bench_run(
                        bench,
                        str(checkpoint.path),
                        str(checkpoint.eval_dir),
                        overrides=list(overrides),
                        address=address,
                        verbose=verbose,
                        progress_interval_s=progress_interval_s,
                    )
                    continue
                summary = run_caption(
                    manifest,
                    str(checkpoint.predictions),
                    str(checkpoint.path),
                    config=config,
                    overrides=list(overrides),
                    address=address,
                    limit=limit,
                    verbose=verbose,
                    progress_interval_s=progress_interval_s,
                    wait_for_lease=wait_for_lease,
                )
                if not summary["complete"]:
                    raise RuntimeError(
                        f"the batch job over {checkpoint.path} did not commit every row "
                        f"({checkpoint.predictions}/_run.json); rerun to resume it"
                    )
                evaluate(
                    EvaluateOptions(
                        predictions=str(checkpoint.predictions),
                        references=references,
                        report_dir=str(checkpoint.eval_dir),
                        task=task,
                        allow_partial=limit is not None,
                        tokenizer=tokenizer,
                        meteor=meteor,
                    )
                )

    # 3. The trend over every checkpoint, scored now or before.
    rows = [checkpoint_scores(c, report) for c in checkpoints]
    newest = checkpoints[-1].layout.trainer_state
    document = write_trend_report(report, run_dir, rows, newest.losses if newest else ())
    print(f"trend report: {location(report).join('trend.md')}")
    return document
