"""Benchmark scores by the field's rules: multiple choice (plain, and MMBench's CircularEval), yes/no
(accuracy, HallusionBench, POPE, MME) and short answers (VQA accuracy).

Each rule is VLMEvalKit's scoring without an LLM judge ("exact matching"), so the numbers compare with
the ones it publishes; they are on a 0-1 scale where VLMEvalKit prints percentages, and MME is in its
published points. The answer scored is the caption job's answer (reasoning stripped), cut after
"Final answer:" when the prompt asked for it (`answers.final_answer_tail`), then read with
`answers.infer_choice` (options) or `answers.yes_no_words` (yes/no); short answers are scored with the
project's VQA scoring (`answers.score_vqa_answer`).

Every question counts: a row the model failed on (an error row) scores as a wrong answer, as an
inference failure does in VLMEvalKit, and is counted apart from the unparseable answers.

The references are the frame `ovis_batch.bench` prepares (columns in `REFERENCE_COLUMNS`); reading
files and writing reports are the caller's.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from ovis_batch.eval import answers as ans
from ovis_batch.eval.data import EvalInputError, Predictions
from ovis_batch.eval.tasks import UNIT_SCALE, VQA_TOKENIZER, Metric, TaskResult, category_table

SCORINGS = ("accuracy", "mmbench-circular", "hallusionbench", "pope", "mme", "vqa")
TASK_TYPES = ("mcq", "yes_no", "short_answer")
# What each scoring needs to find in the references, beyond `REFERENCE_COLUMNS`.
REFERENCE_COLUMNS = (
    "id",  # the question's index, as a string
    "task",  # mcq | yes_no | short_answer
    "answer",  # the option letter, Yes / No, or the short answer
    "answers",  # short answers: every acceptable answer (annotators)
    "option_letters",  # mcq: the option letters, in order
    "options",  # mcq: their texts
    "final_answer",  # the prompt asked to end with "Final answer: "; the answer is read after it
    "category",
    "l2_category",
    "split",
    "group",  # mmbench-circular: the question's circular group (VLMEvalKit's g_index)
    "is_main",  # mmbench-circular: the group's unrotated question
    "image_key",  # mme: questions about one image share it
    "set_id",  # hallusionbench: the question set, its figure and its question
    "figure_id",
    "question_id",
)
EXACT_MATCHING = "VLMEvalKit exact matching"
MME_SCALE = "points: acc + acc+ per category (0-200 each), summed"
# MME's two super-categories, as MME and VLMEvalKit define them ("cognition" is VLMEvalKit's "reasoning").
MME_PERCEPTION = (
    "OCR",
    "artwork",
    "celebrity",
    "color",
    "count",
    "existence",
    "landmark",
    "position",
    "posters",
    "scene",
)
MME_COGNITION = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")
NO_CATEGORY = "(none)"


def score_benchmark(
    name: str, task: str, scoring: str, predictions: Predictions, references: pd.DataFrame
) -> TaskResult:
    """Score every question of one prepared benchmark; raises EvalInputError when a question has no
    prediction row (the caption job has not finished) or the scoring does not fit the task."""
    if scoring not in SCORINGS:
        raise EvalInputError(f"unknown scoring {scoring!r}; choose one of {list(SCORINGS)}")
    needs = {"mmbench-circular": "mcq", "hallusionbench": "yes_no", "pope": "yes_no", "mme": "yes_no"}
    needs |= {"vqa": "short_answer"}
    if scoring in needs and needs[scoring] != task:
        raise EvalInputError(f"{name}: scoring {scoring!r} is for {needs[scoring]} benchmarks, not {task}")
    items = _items(name, predictions, references)
    if scoring == "vqa":
        return _score_short_answers(name, items)
    if task == "mcq":
        items = read_choices(items)
        if scoring == "mmbench-circular":
            return _score_circular(name, items)
        return _score_accuracy(name, items, "options read by VLMEvalKit's rules (`infer_choice`)")
    if task == "yes_no":
        items = read_yes_no(items)
        if scoring == "hallusionbench":
            return _score_hallusion(name, items)
        if scoring == "pope":
            return _score_pope(name, items)
        if scoring == "mme":
            return _score_mme(name, items)
        return _score_accuracy(name, items, "yes/no read by VLMEvalKit's rule (`yes_no_words`)")
    raise EvalInputError(f"{name}: a short-answer benchmark is scored with 'vqa', not {scoring!r}")


# --------------------------------------------------------------------------------------------------
# the answers
# --------------------------------------------------------------------------------------------------


def _items(name: str, predictions: Predictions, references: pd.DataFrame) -> pd.DataFrame:
    """References joined with their prediction row: `status` and `model_answer` (None for error rows)."""
    frame = predictions.frame
    missing = references.loc[~references["id"].isin(frame["id"]), "id"]
    if len(missing):
        shown = ", ".join(repr(i) for i in missing[:5])
        raise EvalInputError(
            f"{name}: {len(missing)} of {len(references)} questions have no prediction row (e.g. {shown}); "
            "the caption job did not finish: rerun the same command to resume it"
        )
    columns = ["id", "status"] + (["caption"] if "caption" in frame else [])
    items = references.merge(frame[columns], on="id", how="left", validate="one_to_one")
    captions = items["caption"] if "caption" in items else pd.Series([None] * len(items))
    model_answers = []
    for status, caption, final in zip(items["status"], captions, items["final_answer"], strict=True):
        if status != "ok":
            model_answers.append(None)
            continue
        answer, _ = ans.split_reasoning(caption if isinstance(caption, str) else "")
        model_answers.append(ans.final_answer_tail(answer) if final else answer)
    items["model_answer"] = pd.Series(model_answers, index=items.index, dtype=object)  # None: no answer
    for column in ("category", "l2_category", "split"):
        values = items[column] if column in items else pd.Series([None] * len(items))
        items[column] = [str(v) if isinstance(v, str) and v else NO_CATEGORY for v in values]
    return items.sort_values("id", kind="stable").reset_index(drop=True)


def read_choices(items: pd.DataFrame) -> pd.DataFrame:
    """`extracted` (the letter read, or None), `rule`, `correct` and `unparseable` for each mcq item."""
    readings = [
        ans.infer_choice(answer, dict(zip(letters, texts, strict=True))) if isinstance(answer, str) else None
        for answer, letters, texts in zip(
            items["model_answer"], items["option_letters"], items["options"], strict=True
        )
    ]
    return _with_readings(
        items,
        [r.letter if r else None for r in readings],
        [r.rule if r else "error row" for r in readings],
    )


def read_yes_no(items: pd.DataFrame) -> pd.DataFrame:
    """`extracted` ("Yes", "No" or None), `rule`, `correct` and `unparseable` for each yes/no item."""
    extracted = [ans.yes_no_words(a) if isinstance(a, str) else None for a in items["model_answer"]]
    rules = [
        "error row" if not isinstance(a, str) else ("yes/no word" if e else "neither or both")
        for a, e in zip(items["model_answer"], extracted, strict=True)
    ]
    return _with_readings(items, extracted, rules)


def _with_readings(items: pd.DataFrame, extracted: list, rules: list[str]) -> pd.DataFrame:
    out = items.copy()
    out["extracted"] = pd.Series(extracted, index=out.index, dtype=object)
    out["rule"] = rules
    out["correct"] = [float(e is not None and e == a) for e, a in zip(extracted, out["answer"], strict=True)]
    out["unparseable"] = [e is None and s == "ok" for e, s in zip(extracted, out["status"], strict=True)]
    return out


# --------------------------------------------------------------------------------------------------
# the metrics, each a named function of the scored items
# --------------------------------------------------------------------------------------------------


def circular_hits(items: pd.DataFrame) -> pd.DataFrame:
    """MMBench CircularEval: one row per circular group (its unrotated question's row) with `circular`,
    1.0 only when every rotation of the group is answered correctly, and `vanilla`, the unrotated
    question's own `correct`."""
    every_rotation = items.groupby("group", sort=False)["correct"].min()
    main = items[items["is_main"]].copy()
    main["circular"] = main["group"].map(every_rotation).astype(float)
    main["vanilla"] = main["correct"]
    return main.reset_index(drop=True)


def hallusion_accuracies(items: pd.DataFrame) -> dict[str, float]:
    """HallusionBench: question accuracy (aAcc, every question), figure accuracy (fAcc: all questions
    about one figure right) and question-pair accuracy (qAcc: one question right on every figure it is
    asked about); figures and questions are keyed within their l2-category and question set."""
    figure = items.groupby(["l2_category", "set_id", "figure_id"], sort=False)["correct"].min()
    pair = items.groupby(["l2_category", "set_id", "question_id"], sort=False)["correct"].min()
    return {
        "question": float(items["correct"].mean()),
        "figure": float(figure.mean()),
        "pair": float(pair.mean()),
    }


def pope_metrics(answers: pd.Series, extracted: pd.Series) -> dict[str, float]:
    """POPE: accuracy, and precision, recall and F1 of "Yes" (an unparseable answer counts as "No", as in
    VLMEvalKit), and the yes ratio (the share of answers that say yes)."""
    truth = answers.to_numpy() == "Yes"
    said_yes = extracted.to_numpy() == "Yes"
    correct = extracted.to_numpy() == answers.to_numpy()
    tp = int((truth & said_yes).sum())
    fp = int((~truth & said_yes).sum())
    fn = int((truth & ~said_yes).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": float(correct.mean()),
        "precision": precision,
        "recall": recall,
        "F1": f1,
        "yes ratio": float(said_yes.mean()),
    }


def mme_category_scores(items: pd.DataFrame) -> pd.DataFrame:
    """MME per category: acc (% of questions right), acc+ (% of images whose questions are all right) and
    their sum, the category's score (0-200)."""
    rows = []
    for category, group in items.groupby("category", sort=True):
        acc = 100 * float(group["correct"].mean())
        acc_plus = 100 * float(group.groupby("image_key", sort=False)["correct"].min().mean())
        rows.append({"category": category, "n": len(group), "acc": acc, "acc+": acc_plus})
    table = pd.DataFrame(rows, columns=["category", "n", "acc", "acc+"])
    table["score"] = table["acc"] + table["acc+"]
    return table


def mme_totals(categories: pd.DataFrame) -> dict[str, float]:
    """MME's perception and cognition: the sums of the category scores of each super-category."""
    scores = dict(zip(categories["category"], categories["score"], strict=True))
    return {
        "perception": float(sum(scores.get(c, 0.0) for c in MME_PERCEPTION)),
        "cognition": float(sum(scores.get(c, 0.0) for c in MME_COGNITION)),
    }


# --------------------------------------------------------------------------------------------------
# one TaskResult per scoring
# --------------------------------------------------------------------------------------------------


def _mean(column: str) -> Callable[[pd.DataFrame], float]:
    return lambda group: float(group[column].mean())


def _part(compute: Callable[[pd.DataFrame], dict[str, float]], key: str) -> Callable[[pd.DataFrame], float]:
    """One figure of a metric function that computes several, as a per-group metric."""
    return lambda group: compute(group)[key]


def _counts(items: pd.DataFrame, **extra: int) -> dict[str, int]:
    errors = int((items["status"] != "ok").sum())
    return {
        "questions": len(items),
        "answered": len(items) - errors,
        "error_rows_scored_wrong": errors,
        "unparseable": int(items["unparseable"].sum()),
        **extra,
    }


def _breakdowns(
    items: pd.DataFrame, per_group: dict[str, Callable[[pd.DataFrame], float]], columns: tuple[str, ...]
) -> dict[str, dict]:
    """Tables by the other grouping columns (l2-category, split) when the benchmark has them."""
    out = {}
    for column in columns:
        if set(items[column]) != {NO_CATEGORY}:
            out[column.replace("_", "-")] = category_table(items.assign(category=items[column]), per_group)
    return out


def _metric(name: str, value: float, n: int, scale: str = UNIT_SCALE, up: bool = True) -> Metric:
    return Metric(name, value, scale, EXACT_MATCHING, n, higher_is_better=up)


def _item_frame(items: pd.DataFrame, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    columns = ["id", "category", "status", "model_answer", "answer", "extracted", "rule", "correct"]
    columns += ["unparseable", *extra]
    return items[columns].rename(columns={"model_answer": "answer_scored", "answer": "reference"})


def _score_accuracy(name: str, items: pd.DataFrame, how: str) -> TaskResult:
    n = len(items)
    per_group = {"accuracy": _mean("correct"), "unparseable rate": _mean("unparseable")}
    metrics = [
        _metric("accuracy", float(items["correct"].mean()), n),
        _metric("unparseable rate", float(items["unparseable"].mean()), n, up=False),
    ]
    return TaskResult(
        name,
        metrics,
        list(per_group),
        category_table(items, per_group),
        _item_frame(items),
        _counts(items),
        breakdowns=_breakdowns(items, per_group, ("l2_category", "split")),
        notes=[f"{how}; unparseable answers and error rows count as wrong"],
    )


def _score_circular(name: str, items: pd.DataFrame) -> TaskResult:
    groups = circular_hits(items)
    per_group = {"circular accuracy": _mean("circular"), "vanilla accuracy": _mean("vanilla")}
    metrics = [
        _metric("circular accuracy", float(groups["circular"].mean()), len(groups)),
        _metric("vanilla accuracy", float(groups["vanilla"].mean()), len(groups)),
        _metric("accuracy over all rotations", float(items["correct"].mean()), len(items)),
        _metric("unparseable rate", float(items["unparseable"].mean()), len(items), up=False),
    ]
    circular = dict(zip(groups["group"], groups["circular"], strict=True))
    scored = _item_frame(items, ("group", "is_main"))
    scored["group_correct"] = scored["group"].map(circular)
    notes = [
        "MMBench CircularEval: a question counts only if every rotation of its options is answered right "
        f"({len(groups)} groups, {len(items)} rotations); vanilla accuracy is over the unrotated questions; "
        "options read by VLMEvalKit's rules (`infer_choice`); unparseable answers and error rows count as wrong"
    ]
    return TaskResult(
        name,
        metrics,
        list(per_group),
        category_table(groups, per_group),
        scored,
        _counts(items, circular_groups=len(groups)),
        breakdowns=_breakdowns(groups, per_group, ("l2_category", "split")),
        notes=notes,
    )


def _score_hallusion(name: str, items: pd.DataFrame) -> TaskResult:
    labels = {
        "question": "question accuracy (aAcc)",
        "figure": "figure accuracy (fAcc)",
        "pair": "question-pair accuracy (qAcc)",
    }
    overall = hallusion_accuracies(items)
    metrics = [_metric(labels[k], v, len(items)) for k, v in overall.items()]
    metrics.append(_metric("unparseable rate", float(items["unparseable"].mean()), len(items), up=False))
    per_group = {label: _part(hallusion_accuracies, key) for key, label in labels.items()}
    notes = [
        "HallusionBench as VLMEvalKit scores it: figures are keyed by (l2-category, set, figure) and question "
        "pairs by (l2-category, set, question); yes/no read by `yes_no_words`; unparseable answers and error "
        "rows count as wrong"
    ]
    return TaskResult(
        name,
        metrics,
        list(per_group),
        category_table(items, per_group),
        _item_frame(items, ("l2_category", "set_id", "figure_id", "question_id")),
        _counts(items),
        breakdowns=_breakdowns(items, per_group, ("l2_category",)),
        notes=notes,
    )


def _score_pope(name: str, items: pd.DataFrame) -> TaskResult:
    # A question listed under several splits ("adversarial,popular") counts once in each, overall too.
    exploded = items.assign(split=[[s.strip() for s in c.split(",")] for c in items["category"]]).explode(
        "split"
    )
    overall = pope_metrics(exploded["answer"], exploded["extracted"])
    metrics = [_metric(key, value, len(exploded)) for key, value in overall.items() if key != "yes ratio"]
    # Neither more nor fewer yeses is better: POPE reads the ratio against the balanced 0.5 of its data.
    metrics.append(
        Metric(
            "yes ratio",
            overall["yes ratio"],
            UNIT_SCALE,
            EXACT_MATCHING,
            len(exploded),
            note="0.5 is balanced",
        )
    )
    per_group = {key: _part(lambda g: pope_metrics(g["answer"], g["extracted"]), key) for key in overall}
    notes = [
        "POPE as VLMEvalKit scores it: precision, recall and F1 of 'Yes'; an unparseable answer counts as 'No'; "
        "a question listed under several splits counts in each (overall too); the yes ratio is POPE's own"
    ]
    return TaskResult(
        name,
        metrics,
        list(per_group),
        {},
        _item_frame(items),
        _counts(items, split_rows=len(exploded)),
        breakdowns={"split": category_table(exploded.assign(category=exploded["split"]), per_group)},
        notes=notes,
    )


def _score_mme(name: str, items: pd.DataFrame) -> TaskResult:
    categories = mme_category_scores(items)
    totals = mme_totals(categories)
    present = set(categories["category"])
    metrics = [
        _metric("perception", totals["perception"], len(items), MME_SCALE),
        _metric("cognition", totals["cognition"], len(items), MME_SCALE),
        _metric("unparseable rate", float(items["unparseable"].mean()), len(items), up=False),
    ]
    table = {
        row["category"]: {"n": int(row["n"]), "acc": row["acc"], "acc+": row["acc+"], "score": row["score"]}
        for row in categories.to_dict("records")
    }
    notes = [
        "MME: per category, acc is the % of questions right and acc+ the % of images with every question right; "
        "perception and cognition sum the category scores (acc + acc+); yes/no read by `yes_no_words`"
    ]
    for label, names in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        absent = [c for c in names if c not in present]
        if absent:
            notes.append(
                f"{label} sums {len(names) - len(absent)} of MME's {len(names)} categories (absent: {absent})"
            )
    other = sorted(present - set(MME_PERCEPTION) - set(MME_COGNITION))
    if other:
        notes.append(f"categories in neither sum: {other}")
    return TaskResult(
        name,
        metrics,
        ["acc", "acc+", "score"],
        table,
        _item_frame(items, ("image_key",)),
        _counts(items),
        notes=notes,
    )


def _score_short_answers(name: str, items: pd.DataFrame) -> TaskResult:
    scored = []
    for answer, refs in zip(items["model_answer"], items["answers"], strict=True):
        gold = [ans.normalize_vqa_answer(r) for r in refs]
        scored.append(ans.score_vqa_answer(answer, gold) if isinstance(answer, str) else None)
    out = items.copy()
    out["extracted"] = pd.Series([s.extracted if s else None for s in scored], index=out.index, dtype=object)
    out["rule"] = ["vqa normalisation" if s else "error row" for s in scored]
    out["correct"] = [s.accuracy if s else 0.0 for s in scored]
    out["exact_match"] = [s.exact_match if s else 0.0 for s in scored]
    out["unparseable"] = [bool(s and s.unparseable) for s in scored]
    out["answer_type"] = [
        ans.vqa_answer_type([ans.normalize_vqa_answer(r) for r in refs]) for refs in out["answers"]
    ]
    n = len(out)
    per_group = {"VQA accuracy": _mean("correct"), "exact match": _mean("exact_match")}
    metrics = [
        Metric("VQA accuracy", float(out["correct"].mean()), UNIT_SCALE, VQA_TOKENIZER, n),
        Metric("exact match", float(out["exact_match"].mean()), UNIT_SCALE, VQA_TOKENIZER, n),
        Metric("unparseable rate", float(out["unparseable"].mean()), UNIT_SCALE, VQA_TOKENIZER, n, False),
    ]
    breakdowns = {"answer type": category_table(out.assign(category=out["answer_type"]), per_group)}
    breakdowns |= _breakdowns(out, per_group, ("l2_category", "split"))
    notes = [
        "short answers scored with the project's VQA scoring (official VQA normalisation on both sides, "
        "min(1, matches/3) over leave-one-annotator-out subsets, exact match with one reference); error rows "
        "count as wrong"
    ]
    frame = _item_frame(out, ("answer_type", "exact_match"))
    frame["reference"] = [" | ".join(refs) for refs in out["answers"]]
    return TaskResult(
        name, metrics, list(per_group), category_table(out, per_group), frame, _counts(out), breakdowns, notes
    )
