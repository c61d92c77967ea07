"""Reading the batch job's embedding Parquet: discovery, checks, streaming, bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from index_fixtures import FAKE_MODEL

from ovis_batch.index.errors import EmbeddingInputError
from ovis_batch.index.provenance import METADATA_KEY, EmbeddingProvenance, provenance_from_metadata
from ovis_batch.index.reader import ReadCounts, iter_embedding_batches, list_data_files, open_embedding_input
from ovis_batch.index.synthetic import embedding_table


def read_all(source, bad_vectors="error", batch_rows=4):
    counts = ReadCounts()
    batches = list(
        iter_embedding_batches(
            source.files,
            source.filesystem,
            id_column=source.id_column,
            dim=source.provenance.dim,
            batch_rows=batch_rows,
            bad_vectors=bad_vectors,
            counts=counts,
        )
    )
    return batches, counts


def test_data_files_are_the_parquet_files_not_starting_with_underscore_or_dot(tmp_path, write_table):
    vectors = np.eye(3, dtype=np.float32)
    for name in ["b/part-1.parquet", "a.parquet", "_tmp/part-2.parquet", ".hidden.parquet", "_job.parquet"]:
        write_table(tmp_path / name, ["x", "y", "z"], vectors)
    (tmp_path / "_run.json").write_text("{}")
    _, files = list_data_files(tmp_path)
    assert [f.removeprefix(str(tmp_path)) for f in files] == ["/a.parquet", "/b/part-1.parquet"]


def test_faiss_ids_are_row_offsets_across_files_in_path_order(tmp_path, write_table):
    write_table(tmp_path / "p0.parquet", ["a", "b", "c"], np.eye(3, dtype=np.float32))
    write_table(tmp_path / "p1.parquet", ["d", "e"], np.eye(3, dtype=np.float32)[:2])
    source = open_embedding_input(tmp_path, "image_id", first_faiss_id=100)
    assert [(f.first_faiss_id, f.num_rows) for f in source.files] == [(100, 3), (103, 2)]
    assert (source.first_faiss_id, source.end_faiss_id, source.total_rows) == (100, 105, 5)
    batches, _ = read_all(source, batch_rows=2)
    assert np.concatenate([b.faiss_ids for b in batches]).tolist() == [100, 101, 102, 103, 104]
    assert [i for b in batches for i in b.ids.to_pylist()] == ["a", "b", "c", "d", "e"]


def test_only_ok_rows_with_an_embedding_are_read_and_the_others_counted(tmp_path, write_table):
    vectors = np.arange(1, 13, dtype=np.float32).reshape(4, 3)
    table = embedding_table(
        ["a", "b", "c", "d"],
        vectors,
        status=["ok", "error", "ok", "ok"],
        provenance=EmbeddingProvenance(FAKE_MODEL, "last_token", 3),
    )
    # Row "d" is ok but has no embedding (a null list).
    table = table.set_column(
        4, "embedding", pa.array([*vectors[:3].tolist(), None], pa.list_(pa.float32(), 3))
    )
    pq.write_table(table, tmp_path / "part.parquet")
    batches, counts = read_all(open_embedding_input(tmp_path, "image_id"))
    assert [i for b in batches for i in b.ids.to_pylist()] == ["a", "c"]
    assert np.concatenate([b.faiss_ids for b in batches]).tolist() == [0, 2]
    assert counts.as_dict() == {
        "rows": 4,
        "vectors": 2,
        "error_rows": 1,
        "without_embedding": 1,
        "skipped_bad_vectors": 0,
    }


def test_vectors_come_out_float32_unit_length_whatever_the_writer_stored(tmp_path, write_table):
    vectors = np.array([[3, 4, 0], [0, 0, 0.5]], dtype=np.float32)
    write_table(tmp_path / "p.parquet", ["a", "b"], vectors)
    (batch,), _ = read_all(open_embedding_input(tmp_path, "image_id"))
    assert batch.vectors.dtype == np.float32
    np.testing.assert_allclose(batch.vectors, [[0.6, 0.8, 0], [0, 0, 1]], rtol=1e-6)


def test_variable_length_float64_lists_are_accepted(tmp_path):
    prov = EmbeddingProvenance(FAKE_MODEL, "last_token", 2)
    table = pa.table(
        {"image_id": ["a"], "status": ["ok"], "embedding": pa.array([[1.0, 0.0]], pa.list_(pa.float64()))}
    ).replace_schema_metadata(prov.to_metadata())
    pq.write_table(table, tmp_path / "p.parquet")
    (batch,), _ = read_all(open_embedding_input(tmp_path, "image_id"))
    np.testing.assert_array_equal(batch.vectors, [[1.0, 0.0]])
    assert batch.captions.to_pylist() == [None]  # no caption column: null captions


@pytest.mark.parametrize(
    ("value", "problem"), [(np.nan, "a NaN or infinite"), (np.inf, "a NaN or infinite"), (0.0, "a zero")]
)
def test_a_bad_vector_is_an_error_naming_the_file_and_row(tmp_path, write_table, value, problem):
    vectors = np.eye(3, dtype=np.float32)
    vectors[1] = value if problem != "a zero" else 0
    write_table(tmp_path / "part.parquet", ["a", "b", "c"], vectors)
    with pytest.raises(
        EmbeddingInputError, match=rf"part.parquet: row 'b' has {problem} embedding.*bad_vectors: skip"
    ):
        read_all(open_embedding_input(tmp_path, "image_id"))


def test_bad_vectors_can_be_skipped_and_are_counted(tmp_path, write_table):
    vectors = np.eye(3, dtype=np.float32)
    vectors[0, 0], vectors[2] = np.nan, 0
    write_table(tmp_path / "part.parquet", ["a", "b", "c"], vectors)
    (batch,), counts = read_all(open_embedding_input(tmp_path, "image_id"), bad_vectors="skip")
    assert batch.ids.to_pylist() == ["b"] and batch.faiss_ids.tolist() == [1]
    assert batch.captions.to_pylist() == ["caption of b"]
    assert counts.skipped_bad_vectors == 2 and counts.vectors == 1


def test_files_of_different_dimensions_are_refused_naming_both(tmp_path, write_table):
    write_table(tmp_path / "a.parquet", ["x"], np.ones((1, 4), np.float32))
    write_table(tmp_path / "b.parquet", ["y"], np.ones((1, 8), np.float32))
    with pytest.raises(EmbeddingInputError, match=r"dimension 4 vs 8.*a.parquet.*b.parquet"):
        open_embedding_input(tmp_path, "image_id")


def test_files_of_different_models_or_strategies_are_refused(tmp_path, write_table):
    write_table(tmp_path / "a.parquet", ["x"], np.ones((1, 4), np.float32))
    other = EmbeddingProvenance(FAKE_MODEL, "vte_mean", 4)
    write_table(tmp_path / "b.parquet", ["y"], np.ones((1, 4), np.float32), provenance=other)
    with pytest.raises(EmbeddingInputError, match="embedding strategy 'last_token' vs 'vte_mean'"):
        open_embedding_input(tmp_path, "image_id")


def test_a_vector_of_the_wrong_length_inside_a_file_is_refused(tmp_path):
    prov = EmbeddingProvenance(FAKE_MODEL, "last_token", 2)
    table = pa.table(
        {"image_id": ["a", "b"], "status": ["ok", "ok"], "embedding": pa.array([[1.0, 0.0], [1.0, 0.0, 0.0]])}
    ).replace_schema_metadata(prov.to_metadata())
    pq.write_table(table, tmp_path / "p.parquet")
    with pytest.raises(
        EmbeddingInputError, match="row 'b' has a 3-dim embedding but the file's metadata says dim 2"
    ):
        read_all(open_embedding_input(tmp_path, "image_id"))


def test_metadata_dim_must_match_the_fixed_size_column(tmp_path, write_table):
    wrong = EmbeddingProvenance(FAKE_MODEL, "last_token", 5)
    table = embedding_table(["a"], np.ones((1, 4), np.float32)).replace_schema_metadata(wrong.to_metadata())
    pq.write_table(table, tmp_path / "p.parquet")
    with pytest.raises(
        EmbeddingInputError, match="holds 4-dim vectors but its 'ovis_batch' metadata says dim 5"
    ):
        open_embedding_input(tmp_path, "image_id")


def test_missing_metadata_or_columns_are_named(tmp_path, write_table):
    pq.write_table(pa.table({"image_id": ["a"], "status": ["ok"]}), tmp_path / "plain.parquet")
    with pytest.raises(EmbeddingInputError, match=r"plain\.parquet has no 'ovis_batch' metadata"):
        open_embedding_input(tmp_path, "image_id")
    (tmp_path / "plain.parquet").unlink()
    write_table(tmp_path / "p.parquet", ["a"], np.ones((1, 4), np.float32))
    with pytest.raises(EmbeddingInputError, match=r"lacks the column\(s\) uid \(set id_column"):
        open_embedding_input(tmp_path, "uid")


def test_metadata_without_embedding_settings_says_what_to_do():
    metadata = {METADATA_KEY: json.dumps({"model": {"name": "m"}}).encode()}
    with pytest.raises(EmbeddingInputError, match="embeddings enabled"):
        provenance_from_metadata(metadata, "shard.parquet")


def test_empty_or_missing_input_is_an_error(tmp_path, write_table):
    with pytest.raises(EmbeddingInputError, match="does not exist"):
        open_embedding_input(tmp_path / "nope", "image_id")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_SUCCESS").write_text("")
    with pytest.raises(EmbeddingInputError, match="no Parquet data files under"):
        open_embedding_input(tmp_path / "empty", "image_id")
    write_table(tmp_path / "zero" / "p.parquet", [], np.zeros((0, 4), np.float32))
    with pytest.raises(EmbeddingInputError, match="hold no rows"):
        open_embedding_input(tmp_path / "zero", "image_id")
