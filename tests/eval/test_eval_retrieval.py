"""Chunked exact retrieval recall against a brute-force full similarity matrix, with ties and uneven chunks."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from ovis_batch.eval.retrieval import first_positive_ranks, retrieval_recall


def tie_heavy_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Unit vectors with four entries of +-0.5: every dot product is a multiple of 0.25, so ties are exact."""
    vectors = np.zeros((n, dim), dtype=np.float32)
    for row in vectors:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return vectors


def dataset(seed: int, images: int, dim: int = 8):
    rng = np.random.default_rng(seed)
    image_vectors = tie_heavy_vectors(rng, images, dim)
    captions_per_image = rng.integers(1, 6, size=images)
    text_image = np.repeat(np.arange(images), captions_per_image)
    text_vectors = tie_heavy_vectors(rng, len(text_image), dim)
    # some captions share an embedding exactly (the same caption text for two images)
    duplicates = rng.choice(len(text_image), size=len(text_image) // 5, replace=False)
    text_vectors[duplicates] = text_vectors[rng.choice(len(text_image), size=len(duplicates))]
    return image_vectors, text_vectors, text_image


def brute_force_ranks(queries, candidates, positives_of):
    """Full matrix; each query's candidates sorted by (-similarity, index); position of the first positive."""
    similarity = queries @ candidates.T
    ranks = []
    for q, row in enumerate(similarity):
        order = sorted(range(len(row)), key=lambda j, row=row: (-row[j], j))
        ranks.append(next(position for position, j in enumerate(order) if j in positives_of(q)))
    return np.array(ranks)


@pytest.mark.parametrize("block_bytes", [1, 4 * 7 * 300, 10**9])  # one row, 7-row slabs (uneven), everything
def test_ranks_and_recall_match_brute_force(block_bytes):
    images, texts, text_image = dataset(seed=1, images=60)
    assert len(texts) % 7 and len(images) % 7  # slabs do not divide the queries evenly
    result = retrieval_recall(images, texts, text_image, ks=(1, 5, 10), block_bytes=block_bytes)

    expected_image_ranks = brute_force_ranks(images, texts, lambda q: set(np.flatnonzero(text_image == q)))
    expected_text_ranks = brute_force_ranks(texts, images, lambda q: {text_image[q]})
    np.testing.assert_array_equal(result.image_ranks, expected_image_ranks)
    np.testing.assert_array_equal(result.text_ranks, expected_text_ranks)
    for k in (1, 5, 10):
        assert result.image_to_text[k] == pytest.approx(np.mean(expected_image_ranks < k))
        assert result.text_to_image[k] == pytest.approx(np.mean(expected_text_ranks < k))


def test_ties_go_to_the_earlier_candidate():
    queries = np.array([[1.0, 0.0]], dtype=np.float32)
    candidates = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    # positive is candidate 2; candidates 0 and 1 tie with it and come first
    assert first_positive_ranks(queries, candidates, np.array([2]), np.array([3])).tolist() == [2]
    # positives 1 and 2: the first of them (index 1) counts, one tie before it
    assert first_positive_ranks(queries, candidates, np.array([1]), np.array([3])).tolist() == [1]
    # a strictly better positive is first whatever its index
    weaker_first = np.array([[0.6, 0.8], [0.6, 0.8], [1.0, 0.0]], dtype=np.float32)
    assert first_positive_ranks(queries, weaker_first, np.array([2]), np.array([3])).tolist() == [0]


def test_recall_is_one_when_every_query_finds_itself():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(30, 16)).astype(np.float32)
    text_image = np.repeat(np.arange(30), 2)
    texts = images[text_image] + 0.001 * rng.normal(size=(60, 16)).astype(np.float32)
    result = retrieval_recall(images, texts, text_image, block_bytes=512)
    assert result.image_to_text == {1: 1.0, 5: 1.0, 10: 1.0}
    assert result.text_to_image == {1: 1.0, 5: 1.0, 10: 1.0}


def test_memory_stays_bounded_by_the_block_size():
    """4000 x 12000 would be 192 MB as a full float32 matrix; with 256 KiB slabs the peak stays small."""
    rng = np.random.default_rng(2)
    images = rng.normal(size=(4000, 8)).astype(np.float32)
    text_image = np.repeat(np.arange(4000), 3)
    texts = rng.normal(size=(12000, 8)).astype(np.float32)
    tracemalloc.start()
    try:
        retrieval_recall(images, texts, text_image, block_bytes=256 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_identical_rows_are_found_even_when_fingerprints_collide(monkeypatch):
    from ovis_batch.eval import retrieval

    rows = np.array([[1.0, 2.0], [2.0, 1.0], [1.0, 2.0], [3.0, 3.0]], dtype=np.float32)
    distinct, inverse = retrieval._distinct_rows(rows)
    np.testing.assert_array_equal(distinct[inverse], rows)
    assert len(distinct) == 3
    # all-ones weights: the fingerprint is the sum of the bits, so the two permuted rows collide
    monkeypatch.setattr(retrieval, "_fingerprint_weights", lambda dim: np.ones(dim, dtype=np.uint64))
    distinct, inverse = retrieval._distinct_rows(rows)
    np.testing.assert_array_equal(distinct[inverse], rows)
    assert len(distinct) == 3
    distinct, inverse = retrieval._distinct_rows(rows[:2])  # a collision, but no repeat
    np.testing.assert_array_equal(distinct[inverse], rows[:2])


def test_bad_inputs_are_refused():
    images = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="grouped by image"):
        retrieval_recall(images, np.eye(3, dtype=np.float32), np.array([1, 0, 2]))
    with pytest.raises(ValueError, match="have no text"):
        retrieval_recall(images, np.eye(3, dtype=np.float32)[:2], np.array([0, 1]))
    with pytest.raises(ValueError, match="share a dim"):
        retrieval_recall(images, np.ones((3, 4), dtype=np.float32), np.array([0, 1, 2]))
