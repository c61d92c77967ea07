"""Scoring one task end to end: matched prediction rows and references in, metrics and breakdowns out.

Tasks: `captions` (COCO caption metrics), `vqa` (short answers and yes/no), `mcq` (multiple choice) and
`retrieval` (image<->text recall). `resolve_task` picks one from the reference columns for `auto`.

Only rows with status `ok` are scored. Error rows are counted and reported, never scored as empty
answers: an empty caption from an `ok` row is a real (bad) answer, an error row is no answer at all.
Unparseable answers (no letter, no yes/no) are scored as wrong and counted. Reading files and writing
reports live in `data` and `report`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ovis_batch.eval import answers as ans
from ovis_batch.eval.caption_metrics import corpus_bleu, score_captions
from ovis_batch.eval.data import EvalInputError, IdMatch, ParquetSource, Predictions, embedding_matrix
from ovis_batch.eval.ptb_tokenizer import (
    JAVA_TOKENIZER,
    PYTHON_TOKENIZER,
    java_ptb_tokenize,
    ptb_tokenize_many,
)
from ovis_batch.eval.retrieval import DEFAULT_BLOCK_BYTES, RECALL_KS, retrieval_recall

TASKS = ("captions", "vqa", "mcq", "retrieval")
UNIT_SCALE = "0-1"
CIDER_SCALE = "0-10 (CIDEr-D x10, as COCO reports it)"
VQA_TOKENIZER = "vqa-normalization"
CHOICE_TOKENIZER = "choice-extraction"
NO_TOKENIZER = "none (cosine of embeddings)"
NO_CATEGORY = "(none)"


@dataclass(frozen=True)
class Metric:
    """One headline score, tagged with how it was computed."""

    name: str
    value: float | None
    scale: str
    tokenizer: str
    n: int
    higher_is_better: bool = True
    note: str | None = None  # why the value is missing, or a caveat


@dataclass(frozen=True)
class TaskResult:
    """Everything a report shows about one task."""

    task: str
    metrics: list[Metric]
    category_metrics: list[str]  # the metric names the per-category table shows
    categories: dict[str, dict[str, float | int | None]]  # category -> {"n": ..., metric: value}
    items: pd.DataFrame  # one row per scored item (id, category, its scores)
    counts: dict[str, int]
    breakdowns: dict[str, dict[str, dict[str, float | int | None]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def resolve_task(requested: str, reference_columns: Sequence[str]) -> tuple[str, str]:
    """The task to run and why: `requested` itself, or for `auto` the first task whose columns exist."""
    if requested != "auto":
        if requested not in TASKS:
            raise EvalInputError(f"unknown task {requested!r}; choose one of {[*TASKS, 'auto']}")
        return requested, "requested"
    columns = set(reference_columns)
    for task, needed in (
        ("retrieval", {"embedding"}),
        ("mcq", {"choices"}),
        ("vqa", {"answers"}),
        ("vqa", {"answer"}),
        ("captions", {"references"}),
    ):
        if needed <= columns:
            return task, f"auto: references have {sorted(needed)}"
    raise EvalInputError(
        f"cannot tell the task from the reference columns {sorted(columns)}: expected `references` (captions), "
        "`answers`/`answer` (vqa), `choices` + `answer` (mcq) or `embedding` (retrieval); or pass --task"
    )


# --------------------------------------------------------------------------------------------------
# shared row selection
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rows:
    ok: pd.DataFrame  # matched ok prediction rows joined with their references, sorted by id
    error_rows: int


def _matched_rows(predictions: Predictions, references: pd.DataFrame, match: IdMatch) -> _Rows:
    frame = predictions.frame[predictions.frame["id"].isin(match.shared)]
    is_error = frame["status"] == "error"
    ok = frame[~is_error].drop(columns=[c for c in ("category",) if c in references.columns], errors="ignore")
    ok = ok.merge(references, on="id", how="inner", suffixes=("", "_reference")).sort_values(
        "id", kind="stable"
    )
    if "category" not in ok:
        ok["category"] = NO_CATEGORY
    ok["category"] = ok["category"].where(ok["category"].notna(), NO_CATEGORY).astype(str)
    # the answer text with any inline <think> trace removed (`answer` may be a reference column)
    ok["model_answer"] = [ans.split_reasoning(c if isinstance(c, str) else "")[0] for c in ok["caption"]]
    return _Rows(ok.reset_index(drop=True), int(is_error.sum()))


def _counts(match: IdMatch, rows: _Rows, **extra: int) -> dict[str, int]:
    return {
        "shared_ids": len(match.shared),
        "unmatched_prediction_ids": len(match.only_predictions),
        "unmatched_reference_ids": len(match.only_references),
        "error_rows_excluded": rows.error_rows,
        "scored": len(rows.ok),
        **extra,
    }


def _require_caption_column(predictions: Predictions) -> None:
    if "caption" not in predictions.frame:
        raise EvalInputError("predictions have no `caption` column, which holds the answers to score")


def _bad_ids(ids: Sequence[str], what: str, fix: str, side: str = "references") -> EvalInputError:
    shown = ", ".join(repr(i) for i in list(ids)[:10]) + (
        f" and {len(ids) - 10} more" if len(ids) > 10 else ""
    )
    return EvalInputError(f"{len(ids)} {side} {what}: {shown}. {fix}")


def category_table(
    items: pd.DataFrame, metrics: dict[str, Callable[[pd.DataFrame], float]]
) -> dict[str, dict[str, float | int | None]]:
    """{category: {"n": rows, metric: value}} over the groups of `items["category"]`, in sorted order."""
    table = {}
    for category, group in items.groupby("category", sort=True):
        row: dict[str, float | int | None] = {"n": len(group)}
        for name, compute in metrics.items():
            row[name] = compute(group)
        table[str(category)] = row
    return table


# --------------------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------------------


def score_captions_task(
    predictions: Predictions,
    references: ParquetSource,
    match: IdMatch,
    tokenizer: str = "python",
    with_meteor: bool = True,
) -> TaskResult:
    """COCO caption metrics of the matched ok rows against their `references` lists."""
    _require_caption_column(predictions)
    reference_frame = _reference_frame(references, ["references"])
    rows = _matched_rows(predictions, reference_frame, match)
    ok = rows.ok
    bad = [i for i, refs in zip(ok["id"], ok["references"], strict=True) if not _valid_text_list(refs)]
    if bad:
        raise _bad_ids(
            bad, "have an empty or missing `references` list", "Every image needs at least one caption."
        )
    if ok.empty:
        raise EvalInputError("no ok prediction row is left to score (all matched rows are errors)")

    hypotheses = list(ok["model_answer"])
    ref_lists = [list(refs) for refs in ok["references"]]
    flat_refs = [r for refs in ref_lists for r in refs]
    if tokenizer == "java":
        try:
            tokenized = java_ptb_tokenize(hypotheses + flat_refs)
        except RuntimeError as err:
            raise EvalInputError(
                f"--tokenizer java: {err}; the default python tokenizer needs no Java"
            ) from err
        tokenizer_name = JAVA_TOKENIZER
    elif tokenizer == "python":
        tokenized = ptb_tokenize_many(hypotheses + flat_refs)
        tokenizer_name = PYTHON_TOKENIZER
    else:
        raise EvalInputError(f"unknown tokenizer {tokenizer!r}: use 'python' or 'java'")
    hyp_tok = tokenized[: len(hypotheses)]
    ref_tok, pos = [], len(hypotheses)
    for refs in ref_lists:
        ref_tok.append(tokenized[pos : pos + len(refs)])
        pos += len(refs)

    scores = score_captions(hyp_tok, ref_tok, with_meteor=with_meteor)
    n = len(hyp_tok)
    metrics = []
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"):
        scale = CIDER_SCALE if name == "CIDEr-D" else UNIT_SCALE
        metrics.append(
            Metric(name, scores.corpus.get(name), scale, tokenizer_name, n, note=scores.skipped.get(name))
        )
    items = pd.DataFrame(
        {"id": ok["id"], "category": ok["category"], "caption": hypotheses, "tokenized": hyp_tok}
    )
    for name, values in scores.per_image.items():
        items[name] = values
    stats = scores.bleu_stats
    categories = category_table(
        items,
        {
            "BLEU-4": lambda g: corpus_bleu(stats.subset(g.index.to_numpy()))[3],
            "ROUGE-L": lambda g: float(g["ROUGE-L"].mean()),
            "CIDEr-D": lambda g: float(g["CIDEr-D"].mean()),
        },
    )
    notes = [
        f"captions tokenised with {tokenizer_name}; CIDEr-D document frequencies come from the references "
        f"of the {n} scored images; per-category BLEU-4 is corpus BLEU over the category, per-category "
        "ROUGE-L and CIDEr-D are means of per-image scores"
    ]
    return TaskResult(
        "captions",
        metrics,
        ["BLEU-4", "ROUGE-L", "CIDEr-D"],
        categories,
        items,
        _counts(match, rows),
        notes=notes,
    )


def _valid_text_list(value: object) -> bool:
    if value is None or isinstance(value, (str, bytes)):
        return False
    try:
        items = list(value)
    except TypeError:
        return False
    return len(items) > 0 and all(isinstance(x, str) for x in items)


# --------------------------------------------------------------------------------------------------
# VQA (short answers, yes/no)
# --------------------------------------------------------------------------------------------------


def score_vqa_task(predictions: Predictions, references: ParquetSource, match: IdMatch) -> TaskResult:
    """VQA accuracy, exact match and unparseable rate, overall, by answer type and by category."""
    _require_caption_column(predictions)
    columns = references.table.column_names
    answer_column = "answers" if "answers" in columns else "answer"
    rows = _matched_rows(predictions, _reference_frame(references, [answer_column]), match)
    ok = rows.ok
    gold = []
    bad = []
    for item_id, value in zip(ok["id"], ok[answer_column], strict=True):
        refs = [value] if isinstance(value, str) else value
        if not _valid_text_list(refs) or not any(r.strip() for r in refs):
            bad.append(item_id)
            gold.append([])
        else:
            gold.append([ans.normalize_vqa_answer(r) for r in refs])
    if bad:
        raise _bad_ids(bad, f"have an empty or missing `{answer_column}`", "Every question needs an answer.")
    if ok.empty:
        raise EvalInputError("no ok prediction row is left to score (all matched rows are errors)")

    scored = [
        ans.score_vqa_answer(answer, refs) for answer, refs in zip(ok["model_answer"], gold, strict=True)
    ]
    predicted = [s.extracted for s in scored]
    accuracy = [s.accuracy for s in scored]
    exact = [s.exact_match for s in scored]
    unparseable = [s.unparseable for s in scored]
    answer_types = [s.answer_type for s in scored]
    items = pd.DataFrame(
        {
            "id": ok["id"],
            "category": ok["category"],
            "answer_type": answer_types,
            "answer": ok["model_answer"],
            "extracted": predicted,
            "references": [" | ".join(r) for r in gold],
            "vqa_accuracy": accuracy,
            "exact_match": exact,
            "unparseable": unparseable,
        }
    )
    n = len(items)
    metrics = [
        Metric("VQA accuracy", float(items["vqa_accuracy"].mean()), UNIT_SCALE, VQA_TOKENIZER, n),
        Metric("exact match", float(items["exact_match"].mean()), UNIT_SCALE, VQA_TOKENIZER, n),
        Metric(
            "unparseable rate",
            float(items["unparseable"].mean()),
            UNIT_SCALE,
            VQA_TOKENIZER,
            n,
            higher_is_better=False,
        ),
    ]
    per_group = {
        "VQA accuracy": lambda g: float(g["vqa_accuracy"].mean()),
        "exact match": lambda g: float(g["exact_match"].mean()),
        "unparseable rate": lambda g: float(g["unparseable"].mean()),
    }
    by_type = category_table(items.assign(category=items["answer_type"]), per_group)
    notes = [
        "answers normalised as the official VQA evaluation does, on both sides; accuracy is min(1, matches/3) "
        "averaged over leave-one-annotator-out subsets (exact match when there is one reference answer); "
        "yes/no questions read yes or no from the answer and number questions its one number (else the answer "
        "is unparseable); exact match compares with the most common answer"
    ]
    return TaskResult(
        "vqa",
        metrics,
        list(per_group),
        category_table(items, per_group),
        items,
        _counts(match, rows, unparseable=int(items["unparseable"].sum())),
        breakdowns={"answer type": by_type},
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------
# multiple choice
# --------------------------------------------------------------------------------------------------


def score_mcq_task(predictions: Predictions, references: ParquetSource, match: IdMatch) -> TaskResult:
    """Multiple-choice accuracy and unparseable rate, overall and by category."""
    _require_caption_column(predictions)
    rows = _matched_rows(predictions, _reference_frame(references, ["choices", "answer"]), match)
    ok = rows.ok
    bad_choices = [
        i
        for i, c in zip(ok["id"], ok["choices"], strict=True)
        if not _valid_text_list(c) or not 2 <= len(c) <= 26
    ]
    if bad_choices:
        raise _bad_ids(bad_choices, "have malformed `choices`", "Give 2 to 26 option texts per question.")
    gold = [
        ans.resolve_reference_choice(a, list(c)) for a, c in zip(ok["answer"], ok["choices"], strict=True)
    ]
    bad_answers = [i for i, g in zip(ok["id"], gold, strict=True) if g is None]
    if bad_answers:
        raise _bad_ids(
            bad_answers,
            "have an `answer` that names no option",
            "Use a letter (A, B, ...), a 0-based index, or the exact text of one option.",
        )
    if ok.empty:
        raise EvalInputError("no ok prediction row is left to score (all matched rows are errors)")
    chosen = [ans.extract_choice(a, list(c)) for a, c in zip(ok["model_answer"], ok["choices"], strict=True)]
    items = pd.DataFrame(
        {
            "id": ok["id"],
            "category": ok["category"],
            "answer": ok["model_answer"],
            "chosen": [ans.LETTERS[c] if c is not None else None for c in chosen],
            "correct_choice": [ans.LETTERS[g] for g in gold],
            "correct": [float(c == g) for c, g in zip(chosen, gold, strict=True)],
            "unparseable": [c is None for c in chosen],
        }
    )
    n = len(items)
    per_group = {
        "accuracy": lambda g: float(g["correct"].mean()),
        "unparseable rate": lambda g: float(g["unparseable"].mean()),
    }
    metrics = [
        Metric("accuracy", float(items["correct"].mean()), UNIT_SCALE, CHOICE_TOKENIZER, n),
        Metric(
            "unparseable rate",
            float(items["unparseable"].mean()),
            UNIT_SCALE,
            CHOICE_TOKENIZER,
            n,
            higher_is_better=False,
        ),
    ]
    notes = [
        "the chosen option is read from the answer with reasoning stripped; unparseable answers count as wrong"
    ]
    return TaskResult(
        "mcq",
        metrics,
        list(per_group),
        category_table(items, per_group),
        items,
        _counts(match, rows, unparseable=int(items["unparseable"].sum())),
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------------


def score_retrieval_task(
    predictions: Predictions,
    text_embeddings: ParquetSource,
    match: IdMatch,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> TaskResult:
    """Image->text and text->image Recall@1/5/10 over the shared ids' ok rows."""
    if predictions.embeddings is None:
        raise EvalInputError("retrieval needs the predictions' `embedding` column")
    table = text_embeddings.table
    if "embedding" not in table.column_names:
        raise EvalInputError("the text embeddings Parquet has no `embedding` column")
    provenance_note = _same_embedding_space(predictions.metadata, text_embeddings.metadata)
    frame = predictions.frame
    keep = frame["id"].isin(match.shared).to_numpy() & (frame["status"] == "ok").to_numpy()
    image_ids = frame["id"].to_numpy()[keep]
    image_vectors = predictions.embeddings[keep]
    missing = image_ids[~np.isfinite(image_vectors).all(axis=1)]
    if len(missing):
        raise _bad_ids(
            list(missing),
            "have no embedding",
            "Re-run them with embeddings enabled.",
            side="ok prediction rows",
        )
    order = np.argsort(image_ids, kind="stable")
    image_ids, image_vectors = image_ids[order], image_vectors[order]

    text_ids = np.asarray(table.column("id").to_pylist(), dtype=object).astype(str)
    text_vectors = embedding_matrix(table.column("embedding"), what="text embeddings")
    bad = np.unique(text_ids[~np.isfinite(text_vectors).all(axis=1)])
    if len(bad):
        raise _bad_ids(
            list(bad), "have a text with a null or non-finite embedding", "Re-embed those captions."
        )
    if text_vectors.shape[1] != image_vectors.shape[1]:
        raise EvalInputError(
            f"image embeddings have {image_vectors.shape[1]} dims and text embeddings {text_vectors.shape[1]}: "
            "they must come from the same model and strategy"
        )
    in_gallery = np.isin(text_ids, image_ids)
    text_ids, text_vectors = text_ids[in_gallery], text_vectors[in_gallery]
    text_order = np.argsort(text_ids, kind="stable")
    text_ids, text_vectors = text_ids[text_order], text_vectors[text_order]
    text_image = np.searchsorted(image_ids, text_ids)

    result = retrieval_recall(image_vectors, text_vectors, text_image, RECALL_KS, block_bytes)
    metrics = []
    for direction, recalls, n in (
        ("image->text", result.image_to_text, len(image_ids)),
        ("text->image", result.text_to_image, len(text_ids)),
    ):
        for k in RECALL_KS:
            metrics.append(Metric(f"{direction} R@{k}", recalls[k], UNIT_SCALE, NO_TOKENIZER, n))
    mean_recall = float(np.mean([m.value for m in metrics]))
    metrics.append(Metric("mean recall", mean_recall, UNIT_SCALE, NO_TOKENIZER, len(image_ids)))
    items = pd.DataFrame({"id": image_ids, "category": NO_CATEGORY, "image_to_text_rank": result.image_ranks})
    notes = [
        f"exact cosine search over {len(image_ids)} images and {len(text_ids)} captions; "
        "ties broken by candidate order (images by id, captions by image id then file order)",
        provenance_note,
    ]
    rows = _Rows(
        pd.DataFrame({"id": image_ids}),
        int((frame["id"].isin(match.shared) & (frame["status"] == "error")).sum()),
    )
    return TaskResult(
        "retrieval", metrics, [], {}, items, _counts(match, rows, texts=len(text_ids)), notes=notes
    )


def _same_embedding_space(image_metadata: dict, text_metadata: dict) -> str:
    """Refuse image and text embeddings from different models or strategies; say what was checked."""
    image_job, text_job = image_metadata.get("ovis_batch"), text_metadata.get("ovis_batch")
    if not isinstance(image_job, dict) or not isinstance(text_job, dict):
        missing = "predictions" if not isinstance(image_job, dict) else "text embeddings"
        return f"model and embedding strategy not checked: the {missing} carry no ovis_batch metadata"
    sides = {}
    for side, job in (("images", image_job), ("texts", text_job)):
        sides[side] = (
            (job.get("model") or {}).get("weights_sha256"),
            (job.get("embedding") or {}).get("strategy"),
        )
    if sides["images"] != sides["texts"]:
        raise EvalInputError(
            "image and text embeddings come from different models or strategies (weights sha256, strategy): "
            f"images {sides['images']}, texts {sides['texts']}. Embed the captions with the model and "
            "strategy of the batch job (ovis-batch embed-texts --model ... --strategy ...)"
        )
    return f"image and text embeddings share model weights and strategy ({sides['images'][1]})"


def _reference_frame(references: ParquetSource, needed: Sequence[str]) -> pd.DataFrame:
    missing = [c for c in needed if c not in references.table.column_names]
    if missing:
        raise EvalInputError(
            f"references lack column(s) {missing} needed by this task; they have {references.table.column_names}"
        )
    wanted = ["id", *needed] + (["category"] if "category" in references.table.column_names else [])
    frame = references.table.select(wanted).to_pandas()
    for column in needed:
        frame[column] = [_plain(v) for v in frame[column]]
    return frame


def _plain(value: object) -> object:
    """A Parquet cell as plain Python: lists for list cells, int for integers, else as is."""
    if value is None or isinstance(value, str | bytes | float):
        return value
    if isinstance(value, np.integer | int):
        return int(value)
    try:
        return list(value)
    except TypeError:
        return value
