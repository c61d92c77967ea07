"""Benchmark evaluation: published benchmark files in, scores comparable with the published ones out.

    ovis-batch bench run --config configs/bench.yaml --model AIDC-AI/Ovis2.5-9B --output runs/bench/ \\
        [--compare runs/bench-yesterday/] [--address auto] [--overwrite] [key=value ...]
    ovis-batch bench prepare MMBench_DEV_EN.tsv prepared/MMBench_DEV_EN/ [--task mcq] [--scoring ...]

The story of `bench run`, each step delegated to ovis_batch:
1. read the suite and each benchmark's caption settings, identify the model's weights, read the
   `--compare` report, check that the output folder can be written: everything that can fail does so
   before any work;
2. for each benchmark, in the suite's order: prepare its folder from the benchmark file (manifest with
   one prompt per question, references), unless it is prepared from the same file already; skip it if
   it is scored already with these weights and settings; else run or resume the caption job on its
   manifest (one Ray session for the whole suite) and score its predictions into its report folder;
3. write the suite report (report.md, then metrics.json) and print its scores table.
A killed run, rerun with the same command, resumes: prepared folders are kept, the caption job commits
only the missing questions, finished benchmarks are not run again. Every location (the output, the
benchmark files, `--compare`) is a local path or a URI (s3://, gs://, ...), read and written through
`ovis_batch.storage`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from ovis_batch.bench.prepare import PrepareOptions, write_prepared
from ovis_batch.bench.settings import BenchConfig
from ovis_batch.bench.source import read_benchmark_file
from ovis_batch.bench.suite import (
    BenchmarkFolder,
    load_previous_suite,
    score_benchmark_folder,
    scores_table,
    suite_document,
    write_suite_report,
)
from ovis_batch.checkpoints import model_identity
from ovis_batch.config import CaptionConfig, load_config
from ovis_batch.pipeline.job import reserved_cpus
from ovis_batch.pipeline.output import OutputError
from ovis_batch.progress import DEFAULT_INTERVAL_S
from ovis_batch.ray_session import ray_session
from ovis_batch.storage import location
from workflows.caption import run_caption


def bench_prepare(source: str, out: str | os.PathLike, options: PrepareOptions) -> dict[str, Any]:
    """Prepare one benchmark file into `out`; returns what prepared.json records.

    The file is read, then `out` is checked (a folder that cannot be written is refused before the
    questions are built), then the manifest, the references and prepared.json are written.
    """
    table = read_benchmark_file(source, options.columns)
    location(out).check_writable("prepared folder")
    return write_prepared(table, out, options)


def bench_run(
    config: str | os.PathLike,
    model: str,
    output: str | os.PathLike,
    *,
    overrides: list[str] = (),
    address: str | None = None,
    compare: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    verbose: bool = False,
    progress_interval_s: float = DEFAULT_INTERVAL_S,
) -> dict[str, Any]:
    """Run (or resume) every benchmark of the suite `config` with `model`; returns the suite's metrics.json.

    `overrides`: caption settings (`key=value`) over the suite's, for every benchmark; `overwrite`: start
    each benchmark afresh; `quiet`: print nothing (else a progress line per captioned benchmark on
    stderr, then the scores table).
    """
    # 1. Everything that can be refused, before any work.
    suite: BenchConfig = load_config(BenchConfig, config)
    settings = {
        b.name: load_config(CaptionConfig, None, suite.caption_overrides(b, list(overrides)))
        for b in suite.benchmarks
    }
    previous = load_previous_suite(compare) if compare else None
    weights = model_identity(model)["weights_sha256"]
    output = location(output)
    output.check_writable("output folder")

    # 2. Each benchmark: prepared, then captioned (or resumed) and scored, unless finished before.
    reports, log_folder = {}, None
    with contextlib.ExitStack() as ray_scope:
        for benchmark in suite.benchmarks:
            folder = BenchmarkFolder(output.join(benchmark.name))
            folder.prepare(benchmark.file, suite.prepare_options(benchmark), overwrite=overwrite)
            stamp = folder.stamp(weights, settings[benchmark.name])
            if folder.is_scored(stamp):
                reports[benchmark.name] = folder.report()
                continue
            if log_folder is None and not folder.captions_complete():  # else nothing is left to caption
                cpus = max(reserved_cpus(s) for s in settings.values())
                log_folder = ray_scope.enter_context(
                    ray_session(address, num_cpus=cpus, verbose=verbose, announce=False)
                )
            summary = run_caption(
                str(folder.manifest),
                str(folder.predictions),
                model,
                overrides=suite.caption_overrides(benchmark, list(overrides)),
                address=address,
                quiet=quiet,
                verbose=verbose,
                progress_interval_s=progress_interval_s,
                print_summary=False,
                progress_label=benchmark.name,
            )
            if not summary["complete"]:
                raise OutputError(
                    f"the caption job over {benchmark.name} did not commit every question "
                    f"({folder.predictions}/_run.json); rerun the same command to resume it"
                )
            reports[benchmark.name] = score_benchmark_folder(folder, stamp, compare)

    # 3. The suite report, metrics.json last.
    document = write_suite_report(output, suite_document(output, model, reports, previous, compare))
    if not quiet:
        print("\n".join(scores_table(document)))
        print(f"report: {output.join('report.md')}" + (f"  (Ray logs: {log_folder})" if log_folder else ""))
    return document
