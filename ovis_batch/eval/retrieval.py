"""Exact image<->text retrieval recall (Recall@1/5/10) with several captions per image.

Image embeddings come from the predictions' `embedding` column. Text embeddings of the reference
captions come from a **text embeddings Parquet** (a file or folder of shards), written by the model side
with the same model and embedding strategy as the images (`ovis-batch embed-texts`):

| column | type | meaning |
|---|---|---|
| id column (default `image_id`) | string | the image the caption describes; repeats once per caption |
| `caption` | string | the reference caption text |
| `embedding` | fixed-size list of float32 (or list of float32) | its embedding, L2-normalised |

Both files carry the `ovis_batch` key-value metadata (model weights fingerprint, embedding strategy);
the evaluation refuses to compare image and text embeddings whose model or strategy differ.

Similarity is the cosine (both sides are L2-normalised again here, a no-op for contract-conforming
inputs). A query counts as found at k when any of its positives is among the k most similar candidates:
image -> text, the positives are the image's captions; text -> image, the one image it describes.

Search is exact and never holds the full query x candidate matrix: queries are processed in slabs sized
to `block_bytes`, and for each query only the rank of its best positive is kept. Ties are resolved
deterministically, like a stable sort by descending similarity: among equal similarities, the candidate
that comes first in candidate order ranks first. Candidate order is images sorted by id, texts sorted by
image id then by their order in the file. Candidates with bit-identical embeddings (the same caption
embedded twice) are scored once, so they always tie exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RECALL_KS = (1, 5, 10)
DEFAULT_BLOCK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class RetrievalResult:
    """Recall@k in both directions, and the rank (0 = first) of each query's best positive."""

    image_to_text: dict[int, float]
    text_to_image: dict[int, float]
    image_ranks: np.ndarray  # (images,)
    text_ranks: np.ndarray  # (texts,)


def retrieval_recall(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    text_image: np.ndarray,
    ks: tuple[int, ...] = RECALL_KS,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> RetrievalResult:
    """Recall@k for image->text and text->image retrieval.

    `text_image[j]` is the row of `image_embeddings` that text j describes; texts must be grouped by
    image (non-decreasing `text_image`) and every image needs at least one text. `block_bytes` bounds
    the similarity slab held at once (queries x all candidates, float32).
    """
    images = l2_normalize(np.asarray(image_embeddings, dtype=np.float32))
    texts = l2_normalize(np.asarray(text_embeddings, dtype=np.float32))
    text_image = np.asarray(text_image, dtype=np.int64)
    _check(images, texts, text_image)

    # image -> text: the positives of image i are the texts [start[i], end[i])
    start = np.searchsorted(text_image, np.arange(len(images)), side="left")
    end = np.searchsorted(text_image, np.arange(len(images)), side="right")
    image_ranks = first_positive_ranks(images, texts, start, end, block_bytes)
    # text -> image: one positive each
    text_ranks = first_positive_ranks(texts, images, text_image, text_image + 1, block_bytes)
    return RetrievalResult(
        image_to_text={k: float(np.mean(image_ranks < k)) for k in ks},
        text_to_image={k: float(np.mean(text_ranks < k)) for k in ks},
        image_ranks=image_ranks,
        text_ranks=text_ranks,
    )


def first_positive_ranks(
    queries: np.ndarray,
    candidates: np.ndarray,
    positive_start: np.ndarray,
    positive_end: np.ndarray,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> np.ndarray:
    """For each query, the 0-based rank of its first-ranked positive among all candidates.

    Query q's positives are candidates [positive_start[q], positive_end[q]) (non-empty). The rank is the
    number of candidates that a stable descending sort puts before it: those more similar, plus those
    equally similar with a lower index.
    """
    distinct, inverse = _distinct_rows(candidates)
    n_candidates = len(candidates)
    rows_per_slab = max(1, block_bytes // max(1, n_candidates * 4))
    max_positives = int((positive_end - positive_start).max()) if len(queries) else 0
    ranks = np.empty(len(queries), dtype=np.int64)
    for lo in range(0, len(queries), rows_per_slab):
        hi = min(lo + rows_per_slab, len(queries))
        slab = queries[lo:hi] @ distinct.T
        if inverse is not None:  # back to one column per candidate: identical vectors score identically
            slab = slab[:, inverse]
        starts, ends = positive_start[lo:hi], positive_end[lo:hi]
        # best positive: highest similarity, lowest index among equals
        offsets = np.arange(max_positives)[None, :]
        positive_index = np.minimum(starts[:, None] + offsets, ends[:, None] - 1)
        positive_score = np.take_along_axis(slab, positive_index, axis=1)
        positive_score[offsets >= (ends - starts)[:, None]] = -np.inf
        best = positive_score.argmax(axis=1)  # first maximum
        rows = np.arange(hi - lo)
        best_score = positive_score[rows, best][:, None]
        best_index = positive_index[rows, best]
        ahead = np.count_nonzero(slab > best_score, axis=1)
        # candidates tying with the best positive rank before it when their index is lower; such ties are
        # rare (mostly duplicated captions), so only the rows that have one pay for the index test
        tied_rows = np.flatnonzero(np.count_nonzero(slab >= best_score, axis=1) - ahead > 1)
        if len(tied_rows):
            ties = slab[tied_rows] == best_score[tied_rows]
            before = np.arange(n_candidates)[None, :] < best_index[tied_rows, None]
            ahead[tied_rows] += np.count_nonzero(ties & before, axis=1)
        ranks[lo:hi] = ahead
    return ranks


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def _distinct_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Bit-identical rows collapsed: (distinct rows, each row's distinct row), or (matrix, None) if none repeat.

    Rows are grouped by an exact integer fingerprint of their bits (identical rows always share it), and
    the grouping is then checked bit for bit, falling back to comparing whole rows on a collision.
    """
    contiguous = np.ascontiguousarray(matrix, dtype=np.float32)
    bits = contiguous.view(np.uint32)
    weights = _fingerprint_weights(bits.shape[1])
    fingerprint = np.empty(len(bits), dtype=np.uint64)
    for lo in range(0, len(bits), 1024):  # in row blocks, so the uint64 copy stays small
        fingerprint[lo : lo + 1024] = (
            bits[lo : lo + 1024].astype(np.uint64) @ weights
        )  # wraps: fine for a hash
    _, first, inverse = np.unique(fingerprint, return_index=True, return_inverse=True)
    if len(first) == len(contiguous):
        return contiguous, None
    if not np.array_equal(bits, bits[first][inverse]):  # a fingerprint collision between different rows
        as_bytes = contiguous.view(np.dtype((np.void, 4 * contiguous.shape[1]))).ravel()
        _, first, inverse = np.unique(as_bytes, return_index=True, return_inverse=True)
    return contiguous[first], inverse.ravel()


def _fingerprint_weights(dim: int) -> np.ndarray:
    """Odd 64-bit multipliers (fixed seed) of the row fingerprint."""
    return np.random.default_rng(0).integers(1, 2**63, size=dim, dtype=np.uint64) | np.uint64(1)


def _check(images: np.ndarray, texts: np.ndarray, text_image: np.ndarray) -> None:
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"image embeddings {images.shape} and text embeddings {texts.shape} must share a dim"
        )
    if len(text_image) != len(texts):
        raise ValueError(f"{len(text_image)} text->image links for {len(texts)} texts")
    if len(text_image) and (
        np.any(np.diff(text_image) < 0) or text_image[0] < 0 or text_image[-1] >= len(images)
    ):
        raise ValueError("texts must be grouped by image (non-decreasing image index within range)")
    missing = np.setdiff1d(np.arange(len(images)), text_image)
    if len(missing):
        raise ValueError(f"images at rows {missing[:10].tolist()} have no text")
    if not (np.isfinite(images).all() and np.isfinite(texts).all()):
        raise ValueError("embeddings contain NaN or infinity")
