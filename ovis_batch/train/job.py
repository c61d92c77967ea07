"""Planning and summarising a fine-tuning run: the run folder, the checks before training, the summary.

`plan_finetune` does every check that can fail before training starts (the run folder, the model
files, the freeze spec against the model's shape, the pairs columns, a resumed run's settings, then the
scan of every pair, which a resumed run reloads) and only then touches the folder. `finish_finetune`
writes the run summary.

The run folder (RUN_DIR):

    finetune_run.json        what the run is: model, data (files, sizes, times), settings; written first
    finetune_pairs.parquet   the usable pairs (rows of the data) and the skip counts; fixed for the run
    checkpoint-N/            Trainer checkpoints in the official Ovis2.5 layout (see trainer.py)
    trainer_state.json       the Trainer's final state (log history)
    finetune_summary.json    the run summary; written last, so it marks a finished run

A folder holding anything else, or another run, is refused unless `overwrite`; `resume` continues the
run in the folder from its newest complete checkpoint, and refuses settings or data that changed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ovis_batch.checkpoints.layout import TRAINER_STATE, training_run_checkpoints
from ovis_batch.errors import UsageError
from ovis_batch.storage import Location, local_path, location
from ovis_batch.train.data import (
    ExampleBuilder,
    PairImages,
    Pairs,
    PairScan,
    PairsError,
    read_pairs,
    scan_pairs,
)
from ovis_batch.train.freeze import TrainablePlan, plan_trainable
from ovis_batch.train.settings import FinetuneConfig

RUN_FORMAT = "ovis-batch-finetune/1"
RUN_RECORD = "finetune_run.json"
PAIRS_SCAN = "finetune_pairs.parquet"
SUMMARY = "finetune_summary.json"
# Settings that may change when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = frozenset({"scan_workers", "dataloader_workers", "save_total_limit", "logging_steps"})


class RunFolderError(UsageError, ValueError):
    """The run folder cannot be used as asked (holds another run, settings changed on resume, ...)."""


@dataclass
class FinetunePlan:
    """Everything a training process needs, as plain values (picklable for Ray Train workers)."""

    run_dir: Path
    data: str
    model_source: str
    model_dir: Path
    settings: FinetuneConfig
    trainable: TrainablePlan
    scan: PairScan | None = None  # the usable pairs, fixed for the run
    resume_from: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def start_step(self) -> int:
        return int(self.resume_from.name.split("-")[-1]) if self.resume_from else 0


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest `checkpoint-N` whose save completed (the Trainer writes trainer_state.json last)."""
    complete = [path for _, path in training_run_checkpoints(run_dir) if (path / TRAINER_STATE).is_file()]
    return complete[-1] if complete else None


def _meta_model(model_dir: Path):
    """The model's module on the meta device: names, shapes and tying without reading a weight."""
    import torch

    from ovis_batch.model.layouts import read_ovis2_5_config
    from ovis_batch.model.ovis2_5 import Ovis2_5ForConditionalGeneration

    config = read_ovis2_5_config(model_dir)  # either layout
    with torch.device("meta"):
        return Ovis2_5ForConditionalGeneration(config)


def _model_identity(source: str) -> tuple[Path, dict[str, Any]]:
    from ovis_batch.checkpoints import model_identity
    from ovis_batch.model.checkpoint import CheckpointError

    identity = model_identity(source)
    folder = Path(identity["folder"])
    if identity["model_type"] != "ovis2_5":
        raise CheckpointError(
            f"{folder}: fine-tuning supports Ovis2.5 checkpoints; model_type is {identity['model_type']!r}"
        )
    local = Path(source).expanduser()  # a URI was refused by model_identity
    name = str(local.resolve()) if local.exists() else source
    return folder, {"source": name, "weights_sha256": identity["weights_sha256"]}


def _run_record(data: str, pairs: Pairs, model: dict[str, Any], settings: FinetuneConfig) -> dict[str, Any]:
    return {
        "format": RUN_FORMAT,
        "model": model,
        "data": {"uri": location(data).uri, "files": pairs.fingerprint},
        "settings": settings.model_dump(mode="json"),
    }


def _differences(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    changed = []
    if previous.get("model") != current["model"]:
        changed.append("the model (source or weights)")
    if previous.get("data") != current["data"]:
        changed.append("the pairs data (files, sizes or times)")
    old, new = previous.get("settings", {}), current["settings"]
    for key in sorted(set(old) | set(new)):
        if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key):
            changed.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changed


def _folder_state(run_dir: Path) -> str:
    """ "empty" (missing or empty), "run" (holds a fine-tuning run record) or "other"."""
    if not run_dir.exists():
        return "empty"
    if not run_dir.is_dir():
        return "other"
    if not any(run_dir.iterdir()):
        return "empty"
    return "run" if (run_dir / RUN_RECORD).is_file() else "other"


def plan_finetune(
    data: str,
    model: str,
    output: str | os.PathLike,
    settings: FinetuneConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> FinetunePlan:
    """Check everything that can be checked before training; then prepare the run folder."""
    if resume and overwrite:
        raise RunFolderError("--resume continues the run in the folder and --overwrite deletes it: pick one")
    # The Trainer and DeepSpeed write checkpoints as local files: an object-store URI is refused here.
    run_dir = Path(local_path(output, "run folder", "the Trainer writes its checkpoints as local files"))
    state = _folder_state(run_dir)
    if state == "other" and not overwrite:
        raise RunFolderError(
            f"{run_dir} is not empty and holds no fine-tuning run ({RUN_RECORD} is missing); choose an "
            "empty folder, or pass --overwrite to delete what is there"
        )
    if state == "run" and not resume and not overwrite:
        raise RunFolderError(
            f"{run_dir} already holds a fine-tuning run; pass --resume to continue it or --overwrite to "
            "start afresh (deleting it), or choose another folder"
        )

    model_dir, identity = _model_identity(model)
    meta = _meta_model(model_dir)
    llm_config = meta.config.llm_config
    trainable = plan_trainable(
        meta.named_parameters(),
        settings.freeze_spec,
        num_layers=llm_config.num_hidden_layers,
        tied_embeddings=bool(llm_config.tie_word_embeddings),
        loss=settings.loss,
        embedding=settings.embedding,
        train_visual_head=settings.train_visual_head,
        train_lm_head=settings.train_lm_head,
    )
    pairs = read_pairs(
        data,
        id_column=settings.id_column,
        image_column=settings.image_column,
        caption_column=settings.caption_column,
    )
    record = _run_record(data, pairs, identity, settings)

    plan = FinetunePlan(run_dir, data, model, model_dir, settings, trainable)
    if state == "run" and resume:
        previous = json.loads((run_dir / RUN_RECORD).read_text())
        changed = _differences(previous, record)
        if changed:
            raise RunFolderError(
                f"cannot resume {run_dir}: it was started with other inputs or settings ("
                + "; ".join(changed)
                + "). Resume with the original ones, or start a new run in another folder"
            )
        plan.resume_from = newest_checkpoint(run_dir)
        if plan.resume_from is None:
            plan.notes.append(f"{run_dir} has no complete checkpoint yet: training starts from step 0")
        saved = run_dir / PAIRS_SCAN
        plan.scan = PairScan.load(saved) if saved.is_file() else _scan(plan, pairs)
        if not saved.is_file():
            plan.scan.save(saved)
        (run_dir / SUMMARY).unlink(missing_ok=True)  # the run is not finished any more
        return plan
    if resume:
        plan.notes.append(f"{run_dir} holds no run to resume: starting a new one")
    plan.scan = _scan(plan, pairs)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir) if run_dir.is_dir() else run_dir.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / RUN_RECORD, record)
    plan.scan.save(run_dir / PAIRS_SCAN)
    return plan


def _scan(plan: FinetunePlan, pairs: Pairs) -> PairScan:
    """Check every pair; too few usable pairs is an error before training."""
    from ovis_batch.model.checkpoint import chat_template
    from ovis_batch.model.runtime import load_tokenizer

    settings = plan.settings
    builder = example_builder(settings, load_tokenizer(plan.model_dir), chat_template(plan.model_dir))
    scan = scan_pairs(pairs, pair_images(settings, pairs.root), builder, workers=settings.scan_workers)
    if not scan.rows:
        raise PairsError(
            f"none of the {scan.total} pairs in {plan.data} can be used "
            f"({scan.summary()['skipped_by_reason']}); check the caption and image columns"
        )
    needed = settings.batch_size if settings.uses_contrastive else 1
    if len(scan.rows) < needed:
        raise PairsError(
            f"only {len(scan.rows)} usable pairs in {plan.data}, fewer than one batch of {needed}: the "
            "contrastive loss takes its negatives from a full batch; add pairs or lower batch_size"
        )
    return scan


def pair_images(settings: FinetuneConfig, root: Location) -> PairImages:
    return PairImages(
        image_column=settings.image_column,
        root=root,
        min_pixels=settings.min_pixels,
        max_pixels=settings.max_pixels,
        pixel_ceiling=settings.pixel_ceiling,
        fast=settings.decode == "fast",
    )


def example_builder(settings: FinetuneConfig, tokenizer, chat_template: str) -> ExampleBuilder:
    return ExampleBuilder(
        tokenizer,
        chat_template,
        prompt=settings.prompt,
        max_caption_tokens=settings.max_caption_tokens,
        generation=settings.uses_generation,
        contrastive=settings.uses_contrastive,
        embedding=settings.embedding,
    )


def finish_finetune(plan: FinetunePlan, started_at: float) -> dict[str, Any]:
    """The run summary from the run folder's files; written to finetune_summary.json (last)."""
    state_file = plan.run_dir / TRAINER_STATE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    history = state.get("log_history", [])
    steps = [e for e in history if "loss" in e]
    final = next((e for e in reversed(history) if "train_runtime" in e), {})
    global_step = int(state.get("global_step", 0))
    trained = global_step - plan.start_step
    runtime = final.get("train_runtime")
    summary = {
        "format": RUN_FORMAT,
        "run_dir": str(plan.run_dir),
        "model": plan.model_source,
        "data": plan.data,
        "freeze": str(plan.trainable.spec),
        "loss": plan.settings.loss,
        "embedding": plan.settings.embedding if plan.settings.uses_contrastive else None,
        "trainable_parameters": plan.trainable.trainable_count,
        "total_parameters": plan.trainable.total_count,
        "trainable_share": plan.trainable.share,
        "pairs": plan.scan.summary(),
        "resumed_from": str(plan.resume_from) if plan.resume_from else None,
        "global_step": global_step,
        "steps_this_run": trained,
        "train_runtime_s": runtime,
        "steps_per_second": trained / runtime if runtime else None,
        "first_logged": _losses(steps[0]) if steps else None,
        "last_logged": _losses(steps[-1]) if steps else None,
        "checkpoints": [p.name for _, p in training_run_checkpoints(plan.run_dir)],
        "wall_s": time.perf_counter() - started_at,
    }
    _write_json(plan.run_dir / SUMMARY, summary)
    return summary


def _losses(entry: dict[str, Any]) -> dict[str, Any]:
    keys = ("step", "loss", "generation_loss", "contrastive_loss", "temperature")
    return {k: entry[k] for k in keys if k in entry}


def format_summary(summary: dict[str, Any]) -> str:
    pairs = summary["pairs"]
    lines = [
        f"fine-tuned {summary['model']} -> {summary['run_dir']} (freeze {summary['freeze']}, "
        f"loss {summary['loss']})",
        f"pairs: {pairs['used']} used of {pairs['pairs']}, {pairs['skipped']} skipped"
        + (f" {pairs['skipped_by_reason']}" if pairs["skipped"] else "")
        + (f", {pairs['truncated_captions']} captions cut" if pairs["truncated_captions"] else ""),
        f"steps: {summary['global_step']} ({summary['steps_this_run']} in this run"
        + (f", {summary['steps_per_second']:.3g} steps/s" if summary["steps_per_second"] else "")
        + ")",
    ]
    for label in ("first_logged", "last_logged"):
        if summary[label]:
            parts = ", ".join(f"{k} {v:.4g}" for k, v in summary[label].items() if k != "step")
            lines.append(f"{label.replace('_', ' ')} (step {summary[label]['step']}): {parts}")
    lines.append(f"checkpoints: {', '.join(summary['checkpoints']) or 'none'}")
    return "\n".join(lines)


def _write_json(path: Path, document: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(document, indent=2) + "\n")
    partial.replace(path)
