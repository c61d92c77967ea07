"""Recall@k and exact search, checked against a naive numpy oracle."""

from __future__ import annotations

import numpy as np
import pytest

from ovis_batch.index.kinds import (
    exact_search,
    new_flat_index,
    new_hnsw_index,
    new_ivf_index,
    remove_ids,
    set_search_parameter,
    stored_vector,
)
from ovis_batch.index.recall import recall_at_k, tune_search_parameter, without_self
from ovis_batch.index.synthetic import clustered_unit_vectors


def naive_recall(found, truth, k):
    per_query = []
    for got, want in zip(found, truth, strict=True):
        want = [w for w in want[:k] if w >= 0]
        per_query.append((len(set(got[:k].tolist()) & set(want)), len(want)))
    return sum(h for h, _ in per_query) / sum(n for _, n in per_query)


def test_recall_at_k_matches_a_naive_oracle_with_padding_and_order_changes():
    rng = np.random.default_rng(0)
    truth = np.stack([rng.permutation(50)[:10] for _ in range(200)])
    found = truth.copy()
    found[:, :5] = rng.integers(0, 50, (200, 5))  # some right, some wrong, some repeated
    found[::7, -2:] = -1
    found[1] = found[1][::-1]  # order within the top-k does not matter
    truth[::11, -1] = -1  # fewer than k true neighbours
    for k in (1, 5, 10):
        assert recall_at_k(found, truth, k) == pytest.approx(naive_recall(found, truth, k))
    assert recall_at_k(truth, truth, 10) == 1.0


def test_without_self_drops_the_query_and_pads():
    ids = np.array([[7, 1, 2], [3, 4, 5], [9, -1, -1]])
    assert without_self(ids, np.array([7, 4, 9]), 2).tolist() == [[1, 2], [3, 5], [-1, -1]]


def make_index(kind, vectors, ids):
    if kind == "flat":
        index = new_flat_index(vectors.shape[1])
    elif kind == "ivf":
        index = new_ivf_index(vectors, nlist=32, kmeans_iterations=5, seed=0)
    else:
        index = new_hnsw_index(vectors.shape[1], m=16, ef_construction=40)
    index.add_with_ids(vectors, ids)
    return index


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_exact_search_is_the_numpy_top_k_over_what_the_index_stores(kind):
    vectors = clustered_unit_vectors(2000, 24, clusters=30, seed=3)
    ids = np.arange(2000, dtype=np.int64) * 3 + 1000  # ids unlike row numbers
    index = make_index(kind, vectors, ids)
    index = remove_ids(index, kind, ids[:50])  # removed vectors must not come back
    queries = clustered_unit_vectors(40, 24, clusters=30, seed=4)
    scores, found = exact_search(index, kind, queries, 10)
    oracle = queries @ vectors[50:].T
    order = np.argsort(-oracle, axis=1)[:, :10]
    np.testing.assert_array_equal(found, ids[50:][order])
    np.testing.assert_allclose(scores, np.take_along_axis(oracle, order, axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stored_vector(index, ids[60]), vectors[60])


def test_tuning_picks_the_smallest_nprobe_that_reaches_the_target():
    vectors = clustered_unit_vectors(4000, 16, clusters=200, spread=1.0, seed=5)
    ids = np.arange(4000, dtype=np.int64)
    index = make_index("ivf", vectors, ids)
    queries = ids[:100]
    result = tune_search_parameter(index, "ivf", vectors[queries], queries, k=10, target=0.9)
    values = sorted(result.sweep)
    assert values == [2**i for i in range(len(values))]
    assert result.recall >= 0.9 and result.value == values[-1]
    assert all(recall < 0.9 for value, recall in result.sweep.items() if value < result.value)
    # The choice is applied, and re-measuring by hand gives the recorded recall.
    set_search_parameter(index, "ivf", result.value)
    _, found = index.search(vectors[queries], 11)
    _, truth = exact_search(index, "ivf", vectors[queries], 11)
    assert (
        recall_at_k(without_self(found, queries, 10), without_self(truth, queries, 10), 10) == result.recall
    )
