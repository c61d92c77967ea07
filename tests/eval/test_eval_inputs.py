"""Reading predictions and references: non-data files skipped, embeddings decoded, bad inputs named."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eval_outputs import write_predictions

from ovis_batch.eval.data import (
    EvalInputError,
    embedding_matrix,
    load_predictions,
    load_references,
    match_ids,
    read_parquet,
)
from ovis_batch.eval.health import run_health
from ovis_batch.eval.tasks import resolve_task


def ok_row(i: int, **extra) -> dict:
    return {
        "image_id": f"id{i}",
        "status": "ok",
        "caption": f"caption {i}",
        "embedding": [float(i)] * 8,
        **extra,
    }


def test_skips_underscore_and_dot_files_and_folders(tmp_path):
    out = write_predictions(tmp_path / "out", [ok_row(i) for i in range(6)], shards=2)
    (out / "_tmp").mkdir()
    pq.write_table(pa.table({"image_id": ["junk"]}), out / "_tmp" / "part-0.parquet")
    (out / ".staging").mkdir()
    pq.write_table(pa.table({"image_id": ["junk"]}), out / ".staging" / "part-0.parquet")
    (out / "nested").mkdir()
    pq.write_table(
        pq.read_table(out / "part-00000.parquet").slice(0, 0), out / "nested" / "part-empty.parquet"
    )
    source = read_parquet(str(out))
    assert len(source.files) == 3
    assert sorted(source.table.column("image_id").to_pylist()) == [f"id{i}" for i in range(6)]


def test_predictions_embeddings_with_error_rows_are_nan(tmp_path):
    rows = [ok_row(0), {"image_id": "bad", "status": "error", "error_type": "decode_error"}, ok_row(2)]
    predictions = load_predictions(
        str(write_predictions(tmp_path / "o", rows, shards=1)), with_embeddings=True
    )
    assert predictions.embeddings.shape == (3, 8)
    assert np.isnan(predictions.embeddings[1]).all() and predictions.embeddings[2, 0] == 2.0
    assert list(predictions.frame["id"]) == ["id0", "bad", "id2"]


def test_variable_list_embeddings_are_read_too():
    column = pa.array([[1.0, 2.0], None, [3.0, 4.0]], pa.list_(pa.float32()))
    matrix = embedding_matrix(column, "test")
    assert matrix[0].tolist() == [1.0, 2.0] and np.isnan(matrix[1]).all() and matrix[2].tolist() == [3.0, 4.0]
    with pytest.raises(EvalInputError, match="different lengths"):
        embedding_matrix(pa.array([[1.0], [1.0, 2.0]], pa.list_(pa.float32())), "test")


def test_duplicate_ids_and_unknown_status_are_named(tmp_path):
    out = write_predictions(tmp_path / "dup", [ok_row(1), ok_row(1), ok_row(2)], shards=1)
    with pytest.raises(EvalInputError, match="'id1'"):
        load_predictions(str(out))
    table = pa.table({"image_id": ["a", "b"], "status": ["ok", "failed"], "caption": ["x", "y"]})
    pq.write_table(table, tmp_path / "status.parquet")
    with pytest.raises(EvalInputError, match=r"'b'.*'failed'"):
        load_predictions(str(tmp_path / "status.parquet"))


def test_missing_paths_and_empty_folders_say_so(tmp_path):
    with pytest.raises(EvalInputError, match="does not exist"):
        load_references(str(tmp_path / "nope.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalInputError, match=r"no \.parquet files"):
        load_predictions(str(tmp_path / "empty"))


def test_match_ids_counts_both_sides():
    with pytest.raises(EvalInputError, match=r"1 prediction ids have no reference .* 2 reference ids"):
        match_ids(["a", "b", "c"], ["b", "c", "d", "e"], allow_partial=False)
    match = match_ids(["a", "b", "c"], ["b", "c", "d", "e"], allow_partial=True)
    assert match.shared.tolist() == ["b", "c"] and len(match.only_references) == 2
    with pytest.raises(EvalInputError, match="share no id"):
        match_ids(["a"], ["b"], allow_partial=True)


@pytest.mark.parametrize(
    ("columns", "task"),
    [
        (["image_id", "references"], "captions"),
        (["image_id", "answers", "category"], "vqa"),
        (["image_id", "answer"], "vqa"),
        (["image_id", "choices", "answer"], "mcq"),
        (["image_id", "caption", "embedding"], "retrieval"),
    ],
)
def test_auto_task(columns, task):
    assert resolve_task("auto", columns)[0] == task


def test_auto_task_explains_what_it_looked_for():
    with pytest.raises(EvalInputError, match="`references` \\(captions\\)"):
        resolve_task("auto", ["image_id", "path"])


def test_health_counts(tmp_path):
    rows = [
        ok_row(0, reasoning="one two three", thinking_truncated=True),
        ok_row(1, caption="<think>\ninline trace\n</think>\n\nthe answer"),
        ok_row(2, caption=""),
        {"image_id": "e1", "status": "error", "error_type": "timeout"},
        {"image_id": "e2", "status": "error", "error_type": None},
    ]
    health = run_health(load_predictions(str(write_predictions(tmp_path / "h", rows, shards=1))).frame)
    summary = health.summary
    assert (summary["rows"], summary["ok_rows"], summary["error_rows"]) == (5, 3, 2)
    assert health.errors_by_type == {"timeout": 1, "unknown": 1}
    assert summary["with_reasoning"] == 2 and summary["reasoning_inline_in_caption"] == 1
    assert summary["thinking_truncated"] == 1 and summary["empty_answers"] == 1
    assert health.answer_words.tolist() == [2, 2, 0]
    assert sorted(health.reasoning_words.tolist()) == [2, 3]
