"""Reasoning health and error accounting of a batch run, independent of any reference.

Computed over every prediction row (the whole run, matched to references or not): how many rows failed
and why, how many answers came with a reasoning trace, how often the thinking budget ran out, and the
length distributions of answers and traces. Long traces, truncated thinking and empty answers are
what a nightly run watches besides the scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ovis_batch.eval.answers import THINK_CLOSE, THINK_OPEN, split_reasoning


@dataclass(frozen=True)
class RunHealth:
    """Counts, rates and length samples of one run."""

    summary: dict[str, float | int | None]
    errors_by_type: dict[str, int]
    answer_words: np.ndarray  # words per ok answer
    reasoning_words: np.ndarray  # words per ok row that has a trace


def run_health(frame: pd.DataFrame) -> RunHealth:
    """Health of the prediction rows in `frame` (the columns of `data.Predictions.frame`)."""
    total = len(frame)
    is_error = (frame["status"] == "error").to_numpy()
    ok = frame[~is_error]
    error_types = (
        frame.loc[is_error, "error_type"]
        if "error_type" in frame
        else pd.Series([None] * int(is_error.sum()))
    )
    errors_by_type = (
        error_types.fillna("unknown").astype(str).value_counts().sort_index().astype(int).to_dict()
        if is_error.any()
        else {}
    )

    answers, traces, inline = [], [], 0
    captions = ok["caption"] if "caption" in ok else pd.Series([None] * len(ok), index=ok.index)
    reasoning = ok["reasoning"] if "reasoning" in ok else pd.Series([None] * len(ok), index=ok.index)
    for caption, trace in zip(captions, reasoning, strict=True):
        caption = caption if isinstance(caption, str) else ""
        if THINK_OPEN in caption or THINK_CLOSE in caption:
            inline += 1
            caption, inline_trace = split_reasoning(caption)
            trace = trace if isinstance(trace, str) and trace else inline_trace
        answers.append(caption)
        traces.append(trace if isinstance(trace, str) and trace.strip() else None)

    answer_words = np.array([len(a.split()) for a in answers], dtype=np.int64)
    reasoning_words = np.array([len(t.split()) for t in traces if t is not None], dtype=np.int64)
    with_reasoning = sum(t is not None for t in traces)
    truncated = (
        int(ok["thinking_truncated"].fillna(False).astype(bool).sum()) if "thinking_truncated" in ok else None
    )
    n_ok = len(ok)
    summary: dict[str, float | int | None] = {
        "rows": total,
        "ok_rows": n_ok,
        "error_rows": int(is_error.sum()),
        "error_rate": _rate(int(is_error.sum()), total),
        "empty_answers": int((answer_words == 0).sum()),
        "with_reasoning": with_reasoning,
        "reasoning_rate": _rate(with_reasoning, n_ok),
        "thinking_truncated": truncated,
        "thinking_truncated_rate": _rate(truncated, n_ok) if truncated is not None else None,
        "reasoning_inline_in_caption": inline,
        **_distribution("answer_words", answer_words),
        **_distribution("reasoning_words", reasoning_words),
    }
    for column in ("output_tokens", "reasoning_tokens"):
        if column in ok:
            values = pd.to_numeric(ok[column], errors="coerce").dropna().to_numpy()
            summary.update(_distribution(column, values))
    return RunHealth(summary, errors_by_type, answer_words, reasoning_words)


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


def _distribution(name: str, values: np.ndarray) -> dict[str, float | None]:
    if len(values) == 0:
        return {f"{name}_mean": None, f"{name}_median": None, f"{name}_p90": None, f"{name}_max": None}
    return {
        f"{name}_mean": float(np.mean(values)),
        f"{name}_median": float(np.median(values)),
        f"{name}_p90": float(np.percentile(values, 90)),
        f"{name}_max": float(np.max(values)),
    }
