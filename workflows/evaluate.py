"""Score what the batch job wrote against references, and write a report folder people and machines read.

    ovis-batch evaluate --predictions out/ --references refs.parquet --report report/ \\
        [--task captions|vqa|mcq|retrieval|auto] [--compare previous_report/] [--allow-partial]

The story: read the prediction shards and the references; decide the task; make sure both sides cover
the same ids; score the ok rows (error rows are counted, never scored); measure the run's reasoning
health; compare with a previous report if asked; write plots, scores.parquet, report.md and, last,
metrics.json. For retrieval, `--references` is the text embeddings Parquet (see
`ovis_batch.eval.retrieval`).
"""

from __future__ import annotations

from typing import Any

from ovis_batch.eval.data import load_predictions, load_references, match_ids, require_unique_ids
from ovis_batch.eval.health import run_health
from ovis_batch.eval.options import EvaluateOptions
from ovis_batch.eval.report import build_metrics, check_report_folder, load_previous, write_report
from ovis_batch.eval.tasks import (
    resolve_task,
    score_captions_task,
    score_mcq_task,
    score_retrieval_task,
    score_vqa_task,
)


def evaluate(options: EvaluateOptions) -> dict[str, Any]:
    """Run one evaluation and return the metrics.json document it wrote."""
    # 1. Inputs. Retrieval references are text embeddings: several rows (captions) per image id.
    references = load_references(options.references, options.id_column)
    task, task_reason = resolve_task(options.task, references.table.column_names)
    if task != "retrieval":
        require_unique_ids(references, options.references)
    predictions = load_predictions(
        options.predictions, options.id_column, with_embeddings=task == "retrieval"
    )
    previous = load_previous(options.compare) if options.compare else None  # fail early on a bad path
    check_report_folder(options.report_dir)  # an unwritable report folder is refused before scoring

    # 2. Both sides must cover the same ids, unless the user accepts scoring the overlap.
    match = match_ids(
        predictions.frame["id"], references.table.column("id").to_pylist(), options.allow_partial
    )

    # 3. Score the task on the ok rows.
    if task == "captions":
        result = score_captions_task(predictions, references, match, options.tokenizer, options.meteor)
    elif task == "vqa":
        result = score_vqa_task(predictions, references, match)
    elif task == "mcq":
        result = score_mcq_task(predictions, references, match)
    else:
        result = score_retrieval_task(predictions, references, match, options.block_mib * 2**20)

    # 4. How the run itself went: errors, reasoning traces, truncated thinking, lengths.
    health = run_health(predictions.frame)

    # 5. Report: plots, per-item scores, report.md, then metrics.json (its presence marks completion).
    inputs = {
        "predictions": options.predictions,
        "prediction_files": len(predictions.files),
        "prediction_metadata": predictions.metadata,
        "references": options.references,
        "reference_files": len(references.files),
        "id_column": options.id_column,
        "allow_partial": options.allow_partial,
    }
    document = build_metrics(result, health, inputs, task_reason, previous, options.compare)
    return write_report(options.report_dir, document, result, health)
