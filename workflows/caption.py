"""The caption job: a Parquet manifest of images in, captions, reasoning traces and embeddings out.

    ovis-batch caption --manifest images.parquet --output out/ --model AIDC-AI/Ovis2.5-2B \
        --config configs/caption.yaml [--address auto] [--limit 1000] [--wait-for-lease] \
        [thinking=true embedding=last_token]

The story, each step delegated to ovis_batch:
1. read and validate the settings (unknown keys and impossible values stop here), check the manifest
   (columns, unique ids), the model files and the settings against the model's tokenizer and context;
2. take the output folder's lease (one job per folder: a second one stops, naming the first, or waits
   with --wait-for-lease) and remove what an interrupted run left in `_tmp/`;
   plan: check the output folder and find the ids already committed by an earlier run (resume) - all
   before any work starts;
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
    check_caption_inputs,
    check_cluster,
    committed_note,
    empty_totals,
    finish_caption_job,
    format_summary,
    plan_caption_job,
    reserved_cpus,
    run_caption_job,
)
from ovis_batch.pipeline.output import OutputFolder
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
    wait_for_lease: bool = False,
    progress_label: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) the caption job; returns the summary that is also saved as `_run.json`.

    Prints, unless `quiet`: where Ray's logs are, a progress line on stderr (redrawn in place on a
    terminal, else a line every `progress_interval_s`), the summary on stdout (unless `print_summary` is
    false: a caller that reports on its own). `verbose`: Ray's own logs and progress bars too. Another
    job running on `output` stops this one at once, naming it, unless `wait_for_lease` (then this one
    waits for it). `progress_label`: shown at the start of the progress line (a caller that runs several
    jobs in a row says which one the line counts).
    """
    started = time.perf_counter()
    settings: CaptionConfig = load_config(CaptionConfig, config, list(overrides))
    inputs = check_caption_inputs(manifest, model, settings, limit=limit, address=address)
    # One job per output folder: the lease is held from the plan to the summary (renewed meanwhile).
    with OutputFolder.open(output).hold(
        timeout_s=settings.lease_timeout_s, wait=wait_for_lease, notify=None if quiet else _to_stderr
    ) as lease:
        plan = plan_caption_job(
            manifest, output, model, settings, overwrite=overwrite, address=address, inputs=inputs
        )
        totals = empty_totals()
        if plan.remaining:  # else everything is committed already: nothing to start
            with ray_session(
                address, num_cpus=reserved_cpus(settings), verbose=verbose, announce=not quiet
            ) as log_folder:
                check_cluster(plan)
                stream = None if quiet else sys.stderr
                totals = _run(plan, log_folder, stream, progress_interval_s, verbose, progress_label)
        lease.ensure_held()
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
    label: str | None,
) -> dict[str, Any]:
    """The work itself, under a progress line on `stream`; a fault leaves as one line (`JobFault`)."""
    with (
        live_progress(
            plan.remaining,
            stream,
            interval_s=progress_interval_s,
            in_place=False if verbose else None,  # Ray's own bars would fight a line redrawn in place
            label=label,
        ) as progress,
        faults_in_one_line(lambda: committed_note(plan, progress), log_folder),
    ):
        return run_caption_job(plan, progress)


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
