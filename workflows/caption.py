"""The caption job: a Parquet manifest of images in, captions, reasoning traces and embeddings out.

    ovis-batch caption --manifest images.parquet --output out/ --model AIDC-AI/Ovis2.5-2B \
        --config configs/caption.yaml [--address auto] [--limit 1000] [thinking=true embedding=last_token]

The story, each step delegated to ovis_batch:
1. read and validate the settings (unknown keys and impossible values stop here);
2. plan: check the manifest (columns, unique ids), the model files and the output folder, and find the
   ids already committed by an earlier run (resume) - all before any work starts;
3. run on Ray Data: decode on CPU workers, caption on one resident model per replica, commit shards
   atomically; a progress line counts the committed rows (Ray's own logs go to its log folder); a fault
   stops the run with one line saying what failed and how many rows are committed (a rerun resumes);
4. verify that every manifest id is committed exactly once and write the summary `_run.json`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from ovis_batch.config import CaptionConfig, load_config
from ovis_batch.faults import faults_in_one_line
from ovis_batch.pipeline.job import (
    CaptionPlan,
    check_cluster,
    committed_note,
    finish_caption_job,
    format_summary,
    plan_caption_job,
    reserved_cpus,
    run_caption_job,
)
from ovis_batch.progress import DEFAULT_INTERVAL_S, live_progress
from ovis_batch.ray_session import ray_session


def run_caption(
    manifest: str,
    output: str,
    model: str,
    *,
    config: str | os.PathLike | None = None,
    overrides: list[str] = (),
    address: str | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    verbose: bool = False,
    progress_interval_s: float = DEFAULT_INTERVAL_S,
    print_summary: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the caption job; returns the summary that is also saved as `_run.json`.

    Prints, unless `quiet`: where Ray's logs are, a progress line on stderr (redrawn in place on a
    terminal, else a line every `progress_interval_s`), the summary on stdout (unless `print_summary` is
    false: a caller that reports on its own). `verbose`: Ray's own logs and progress bars too.
    """
    started = time.perf_counter()
    settings: CaptionConfig = load_config(CaptionConfig, config, list(overrides))
    plan = plan_caption_job(
        manifest, output, model, settings, limit=limit, overwrite=overwrite, address=address
    )
    if plan.remaining == 0:  # everything already committed: nothing to start
        totals = {
            "rows": 0,
            "ok": 0,
            "errors": {},
            "output_tokens": 0,
            "decode_s": 0.0,
            "infer_s": 0.0,
            "shards": 0,
            "wall_s": 0.0,
        }
    else:
        with ray_session(
            address, num_cpus=reserved_cpus(settings), verbose=verbose, announce=not quiet
        ) as log_folder:
            check_cluster(plan)
            totals = _run(plan, log_folder, None if quiet else sys.stderr, progress_interval_s, verbose)
    summary = finish_caption_job(plan, totals, started)
    if not quiet and print_summary:
        print(format_summary(summary))
    return summary


def _run(
    plan: CaptionPlan,
    log_folder: str | None,
    stream: TextIO | None,
    progress_interval_s: float,
    verbose: bool,
) -> dict[str, Any]:
    """The work itself, under a progress line on `stream`; a fault leaves as one line (`JobFault`)."""
    with (
        live_progress(
            plan.remaining,
            stream,
            interval_s=progress_interval_s,
            in_place=False if verbose else None,  # Ray's own bars would fight a line redrawn in place
        ) as progress,
        faults_in_one_line(lambda: committed_note(plan, progress), log_folder),
    ):
        return run_caption_job(plan, progress)
