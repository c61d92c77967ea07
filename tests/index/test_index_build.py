"""Building and growing an index: kinds, recall, replacement by id, atomic writes, every bad input."""

from __future__ import annotations

import json
import logging
import os

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from index_fixtures import FAKE_MODEL, folder_bytes

from ovis_batch.index.errors import EmbeddingInputError, IncompatibleEmbeddingsError, IndexFolderError
from ovis_batch.index.folder import ID_MAP_FILE, MANIFEST_FILE, open_index
from ovis_batch.index.ingest import PartTask, build_part, split_files
from ovis_batch.index.kinds import empty_like, merge_parts
from ovis_batch.index.provenance import EmbeddingProvenance, ModelIdentity
from ovis_batch.index.reader import open_embedding_input
from ovis_batch.index.search import RetrievalIndex
from ovis_batch.index.settings import IndexSettings
from ovis_batch.index.synthetic import clustered_unit_vectors
from ovis_batch.lease import Lease, LeaseHeldError
from ovis_batch.storage import location
from workflows.build_index import add_to_index, build_index


def id_map(folder):
    return pq.read_table(folder / ID_MAP_FILE).to_pydict()


def test_flat_index_returns_each_stored_vectors_own_id_first(tmp_path, write_output, small_vectors, settings):
    write_output(tmp_path / "emb", small_vectors, shards=3)
    manifest = build_index(tmp_path / "emb", tmp_path / "idx", settings)
    assert (manifest.kind, manifest.count, manifest.recall.value) == ("flat", 3000, 1.0)
    hits = RetrievalIndex(tmp_path / "idx").search_vectors(small_vectors, k=3)
    assert [h[0].id for h in hits] == [f"img{i:09d}" for i in range(3000)]
    assert all(
        h[0].score == pytest.approx(1.0, abs=1e-5) and h[0].caption == f"caption of {h[0].id}" for h in hits
    )


def test_ivf_recall_at_10_vs_exact_on_50k_clustered_vectors_at_default_settings(tmp_path, write_output):
    vectors = clustered_unit_vectors(50_000, 64, clusters=1000, spread=0.8, seed=0, centres_seed=7)
    write_output(tmp_path / "emb", vectors, shards=4)
    manifest = build_index(tmp_path / "emb", tmp_path / "idx", IndexSettings(kind="ivf"))
    assert manifest.kind == "ivf" and manifest.build["nlist"] == round(4 * 50_000**0.5)
    assert manifest.recall.value >= 0.97 and not manifest.recall.below_floor
    # Independent check on fresh queries from the same distribution, against a numpy oracle.
    queries = clustered_unit_vectors(500, 64, clusters=1000, spread=0.8, seed=1, centres_seed=7)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    found = [
        [int(h.id[3:]) for h in hits] for hits in RetrievalIndex(tmp_path / "idx").search_vectors(queries, 10)
    ]
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
    assert recall >= 0.95


def test_auto_is_flat_below_the_threshold_and_ivf_above(tmp_path, write_output, small_vectors, settings):
    write_output(tmp_path / "emb", small_vectors)
    small = build_index(
        tmp_path / "emb", tmp_path / "a", settings.model_copy(update={"auto_flat_threshold": 3001})
    )
    large = build_index(
        tmp_path / "emb", tmp_path / "b", settings.model_copy(update={"auto_flat_threshold": 3000})
    )
    assert (small.kind, small.requested_kind, large.kind) == ("flat", "auto", "ivf")
    assert large.search["nprobe"] == large.recall.parameter_value and large.recall.queries == 200


def test_hnsw_index_is_tuned_and_finds_stored_vectors(tmp_path, write_output, small_vectors, settings):
    write_output(tmp_path / "emb", small_vectors)
    manifest = build_index(tmp_path / "emb", tmp_path / "idx", settings.model_copy(update={"kind": "hnsw"}))
    assert manifest.kind == "hnsw" and manifest.recall.value >= 0.97 and "ef_search" in manifest.search
    hits = RetrievalIndex(tmp_path / "idx").search_vectors(small_vectors[:100], k=1)
    assert [h[0].id for h in hits] == [f"img{i:09d}" for i in range(100)]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_add_with_overlapping_ids_replaces_them_and_leaves_no_duplicates(
    tmp_path, write_output, small_vectors, settings, kind
):
    write_output(tmp_path / "day1", small_vectors[:2000])
    build_index(tmp_path / "day1", tmp_path / "idx", settings.model_copy(update={"kind": kind}))
    # Day 2: ids 1500..2499 (500 already indexed, with new vectors), 500 of them new.
    day2 = clustered_unit_vectors(1000, small_vectors.shape[1], clusters=60, seed=9, centres_seed=1)
    write_output(tmp_path / "day2", day2, first_id=1500, shards=2)
    manifest = add_to_index(tmp_path / "day2", tmp_path / "idx", settings)

    assert (
        manifest.count == 2500 and manifest.history[-1].replaced == 500 and manifest.history[-1].added == 500
    )
    ids = id_map(tmp_path / "idx")["id"]
    assert len(ids) == len(set(ids)) == 2500
    index = RetrievalIndex(tmp_path / "idx")
    assert index.index.ntotal == 2500
    np.testing.assert_allclose(index.vector_of("img000001500"), day2[0], atol=1e-6)  # replaced
    np.testing.assert_allclose(index.vector_of("img000001499"), small_vectors[1499], atol=1e-6)  # kept
    np.testing.assert_allclose(index.vector_of("img000002499"), day2[999], atol=1e-6)  # new
    hit = index.search_vectors(day2[:1], k=1)[0][0]
    assert (hit.id, hit.caption) == ("img000001500", "caption of img000001500")
    assert [h.action for h in manifest.history] == ["build", "add"]


def test_an_id_twice_in_one_input_keeps_its_last_row(tmp_path, write_table, settings):
    vectors = np.eye(4, dtype=np.float32)
    write_table(tmp_path / "emb" / "p0.parquet", ["a", "b"], vectors[:2], captions=["a old", "b"])
    write_table(tmp_path / "emb" / "p1.parquet", ["a", "c"], vectors[2:], captions=["a new", "c"])
    manifest = build_index(tmp_path / "emb", tmp_path / "idx", settings)
    assert manifest.count == 3 and manifest.history[-1].duplicates_in_input == 1
    assert id_map(tmp_path / "idx") == {
        "faiss_id": [1, 2, 3],
        "id": ["b", "a", "c"],
        "caption": ["b", "a new", "c"],
    }
    np.testing.assert_array_equal(RetrievalIndex(tmp_path / "idx").vector_of("a"), vectors[2])


def test_faiss_ids_continue_after_the_last_add(tmp_path, write_output, small_vectors, settings):
    write_output(tmp_path / "d1", small_vectors[:10])
    write_output(tmp_path / "d2", small_vectors[10:20], first_id=10)
    build_index(tmp_path / "d1", tmp_path / "idx", settings)
    manifest = add_to_index(tmp_path / "d2", tmp_path / "idx", settings)
    assert manifest.next_faiss_id == 20 and id_map(tmp_path / "idx")["faiss_id"] == list(range(20))


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (
            EmbeddingProvenance(ModelIdentity("fake/ovis", "r1", "cd" * 32), "last_token", 16),
            "weights_sha256",
        ),
        (
            EmbeddingProvenance(ModelIdentity("other/model"), "last_token", 16),
            "model 'fake/ovis' vs 'other/model'",
        ),
        (EmbeddingProvenance(FAKE_MODEL, "vte_mean", 16), "embedding strategy 'last_token' vs 'vte_mean'"),
        (EmbeddingProvenance(FAKE_MODEL, "last_token", 8), "dimension 16 vs 8"),
    ],
)
def test_add_refuses_another_model_strategy_or_dimension_and_changes_nothing(
    tmp_path, write_output, small_vectors, settings, other, message
):
    write_output(tmp_path / "d1", small_vectors[:100])
    build_index(tmp_path / "d1", tmp_path / "idx", settings)
    before = folder_bytes(tmp_path / "idx")
    write_output(tmp_path / "d2", clustered_unit_vectors(10, other.dim, seed=2), provenance=other)
    with pytest.raises(IncompatibleEmbeddingsError, match=message):
        add_to_index(tmp_path / "d2", tmp_path / "idx", settings)
    assert folder_bytes(tmp_path / "idx") == before


def test_a_same_weights_model_under_another_name_is_compatible(
    tmp_path, write_output, small_vectors, settings
):
    write_output(tmp_path / "d1", small_vectors[:100])
    build_index(tmp_path / "d1", tmp_path / "idx", settings)
    copied = EmbeddingProvenance(
        ModelIdentity("/copy/of/fake", None, FAKE_MODEL.weights_sha256), "last_token", 16
    )
    write_output(tmp_path / "d2", small_vectors[100:110], first_id=100, provenance=copied)
    assert add_to_index(tmp_path / "d2", tmp_path / "idx", settings).count == 110


def test_a_failed_add_leaves_the_index_exactly_as_it_was(
    tmp_path, write_output, write_table, small_vectors, settings
):
    write_output(tmp_path / "d1", small_vectors[:500])
    build_index(tmp_path / "d1", tmp_path / "idx", settings.model_copy(update={"kind": "ivf"}))
    before = folder_bytes(tmp_path / "idx")
    bad = small_vectors[:300].copy()
    bad[250] = np.nan  # found only after 250 rows were added to the in-memory index
    write_table(tmp_path / "d2" / "p.parquet", [f"img{i:09d}" for i in range(300)], bad)
    with pytest.raises(EmbeddingInputError, match=r"row 'img000000250' has a NaN"):
        add_to_index(tmp_path / "d2", tmp_path / "idx", settings.model_copy(update={"batch_rows": 100}))
    assert folder_bytes(tmp_path / "idx") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d1", "d2", "idx"]  # staging and lease gone


def test_bad_vectors_can_be_skipped_and_are_recorded(tmp_path, write_table, settings):
    vectors = np.eye(3, dtype=np.float32)
    vectors[1] = 0
    write_table(tmp_path / "emb" / "p.parquet", ["a", "b", "c"], vectors)
    manifest = build_index(
        tmp_path / "emb", tmp_path / "idx", settings.model_copy(update={"bad_vectors": "skip"})
    )
    assert manifest.count == 2 and manifest.history[0].skipped_bad_vectors == 1


def test_input_without_usable_rows_is_an_error_saying_why(tmp_path, write_table, settings):
    write_table(
        tmp_path / "emb" / "p.parquet", ["a", "b"], np.eye(2, dtype=np.float32), status=["error", "error"]
    )
    with pytest.raises(EmbeddingInputError, match="2 rows, of which 2 have a status other than 'ok'"):
        build_index(tmp_path / "emb", tmp_path / "idx", settings)
    with pytest.raises(EmbeddingInputError, match="no usable embeddings"):
        build_index(tmp_path / "emb", tmp_path / "idx", settings.model_copy(update={"kind": "ivf"}))
    assert not (tmp_path / "idx").exists()


def test_ivf_on_too_few_vectors_says_what_to_do(tmp_path, write_output, small_vectors):
    write_output(tmp_path / "emb", small_vectors[:100])
    settings = IndexSettings(kind="ivf", ivf={"nlist": 128}, recall={"queries": 200})
    with pytest.raises(
        EmbeddingInputError, match=r"ivf.nlist 128 needs at least 128 training vectors.*--kind flat"
    ):
        build_index(tmp_path / "emb", tmp_path / "idx", settings)


def test_build_does_not_replace_an_index_unless_asked(tmp_path, write_output, small_vectors, settings):
    write_output(tmp_path / "emb", small_vectors[:50])
    build_index(tmp_path / "emb", tmp_path / "idx", settings)
    with pytest.raises(IndexFolderError, match=r"already holds an index.*--overwrite"):
        build_index(tmp_path / "emb", tmp_path / "idx", settings)
    assert build_index(tmp_path / "emb", tmp_path / "idx", settings, overwrite=True).count == 50
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(IndexFolderError, match="not an index folder"):
        build_index(tmp_path / "emb", tmp_path / "other", settings, overwrite=True)


def test_an_index_of_another_format_version_is_refused(tmp_path, write_output, small_vectors, settings):
    write_output(tmp_path / "emb", small_vectors[:50])
    build_index(tmp_path / "emb", tmp_path / "idx", settings)
    manifest = json.loads((tmp_path / "idx" / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (tmp_path / "idx" / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(
        IndexFolderError, match=r"format version 99, this ovis-batch .* reads version 1.*--overwrite"
    ):
        add_to_index(tmp_path / "emb", tmp_path / "idx", settings)
    with pytest.raises(IndexFolderError, match="format version 99"):
        RetrievalIndex(tmp_path / "idx")


def test_missing_or_inconsistent_index_folders_are_named(tmp_path, write_output, small_vectors, settings):
    with pytest.raises(IndexFolderError, match="is not an index folder"):
        open_index(tmp_path / "none")
    write_output(tmp_path / "emb", small_vectors[:50])
    build_index(tmp_path / "emb", tmp_path / "idx", settings)
    (tmp_path / "idx").rename(tmp_path / ".idx.previous-1234")  # as if killed between the two renames
    with pytest.raises(IndexFolderError, match=r"\.idx\.previous-1234 holds the previous one.*Rename"):
        open_index(tmp_path / "idx")
    (tmp_path / ".idx.previous-1234").rename(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / MANIFEST_FILE).read_text())
    (tmp_path / "idx" / MANIFEST_FILE).write_text(json.dumps({**manifest, "count": 7}))
    with pytest.raises(IndexFolderError, match=r"holds 50 vectors of dim 16, index.json says 7"):
        open_index(tmp_path / "idx")


def test_a_second_writer_is_refused_while_one_holds_the_lock(tmp_path, write_output, small_vectors, settings):
    write_output(tmp_path / "emb", small_vectors[:50])
    build_index(tmp_path / "emb", tmp_path / "idx", settings)
    lock = location(tmp_path / ".idx.lock")
    held = Lease(lock, what="index build or add", timeout_s=30, subject=location(tmp_path / "idx"))
    busy = rf"{tmp_path}/idx is in use by another index build or add: host .*, pid {os.getpid()}"
    with held, pytest.raises(LeaseHeldError, match=busy):
        add_to_index(tmp_path / "emb", tmp_path / "idx", settings)
    assert not lock.exists()  # released
    assert add_to_index(tmp_path / "emb", tmp_path / "idx", settings).count == 50


def test_recall_under_the_floor_is_warned_and_recorded(tmp_path, write_output, caplog):
    vectors = clustered_unit_vectors(4000, 32, clusters=4000, spread=2.0, seed=0)  # nearly uniform: hard
    write_output(tmp_path / "emb", vectors)
    settings = IndexSettings(kind="ivf", recall={"queries": 200}, ivf={"max_nprobe": 1})
    with caplog.at_level(logging.WARNING):
        manifest = build_index(tmp_path / "emb", tmp_path / "idx", settings)
    assert manifest.recall.below_floor and manifest.recall.parameter_value == 1
    assert "under the floor 0.95" in caplog.text


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_parts_built_apart_and_merged_equal_one_streamed_build(
    tmp_path, write_output, small_vectors, settings, kind
):
    write_output(tmp_path / "emb", small_vectors, shards=5)
    streamed = build_index(tmp_path / "emb", tmp_path / "one", settings.model_copy(update={"kind": kind}))
    _, one = open_index(tmp_path / "one")
    # The same trained index, filled part by part (as worker processes or Ray tasks would) and merged.
    source = open_embedding_input(tmp_path / "emb", "image_id")
    groups = split_files(source.files, parts=3)
    assert [len(g) for g in groups] == [2, 2, 1] and sum(groups, ()) == source.files
    tasks = [
        PartTask(
            group,
            source.filesystem,
            faiss.serialize_index(empty_like(one, kind)),
            "image_id",
            16,
            500,
            "error",
            np.zeros(0, np.int64),
            threads=1,
        )
        for group in groups
    ]
    results = [build_part(task) for task in tasks]
    merged = empty_like(one, kind)
    merge_parts(merged, kind, [faiss.deserialize_index(r.index) for r in results])
    assert merged.ntotal == one.ntotal == streamed.count
    np.testing.assert_array_equal(
        np.concatenate([r.keys["faiss_id"].to_numpy() for r in results]), np.arange(3000)
    )
    queries = small_vectors[::37]
    if kind == "ivf":
        merged.nprobe = one.nprobe = 8
    np.testing.assert_array_equal(merged.search(queries, 5)[1], one.search(queries, 5)[1])
    np.testing.assert_array_equal(merged.reconstruct(1234), one.reconstruct(1234))


def test_parallel_workers_give_the_same_index_as_one_process(tmp_path, write_output, small_vectors, settings):
    write_output(tmp_path / "emb", small_vectors, shards=4)
    one = build_index(tmp_path / "emb", tmp_path / "one", settings.model_copy(update={"kind": "ivf"}))
    two = build_index(
        tmp_path / "emb", tmp_path / "two", settings.model_copy(update={"kind": "ivf", "workers": 2})
    )
    assert id_map(tmp_path / "one") == id_map(tmp_path / "two")
    assert (one.count, one.search, one.recall.value) == (two.count, two.search, two.recall.value)
    queries = small_vectors[::50]
    a, b = RetrievalIndex(tmp_path / "one"), RetrievalIndex(tmp_path / "two")
    assert a.search_vectors(queries, 5) == b.search_vectors(queries, 5)


@pytest.mark.slow
def test_parts_run_as_ray_tasks_give_the_same_index(tmp_path, write_output, small_vectors, settings):
    pytest.importorskip("ray")
    write_output(tmp_path / "emb", small_vectors, shards=4)
    build_index(tmp_path / "emb", tmp_path / "one", settings.model_copy(update={"kind": "ivf"}))
    ray_settings = settings.model_copy(update={"kind": "ivf", "workers": 2, "executor": "ray"})
    build_index(tmp_path / "emb", tmp_path / "ray", ray_settings)
    assert id_map(tmp_path / "one") == id_map(tmp_path / "ray")
    queries = small_vectors[::50]
    assert RetrievalIndex(tmp_path / "one").search_vectors(queries, 5) == RetrievalIndex(
        tmp_path / "ray"
    ).search_vectors(queries, 5)
