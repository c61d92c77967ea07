"""Recall@k of an approximate index against exact search, and tuning its search knob to a target.

The queries are vectors held out of the training sample but stored in the index (they are part of
the collection). Each query would trivially find itself first, which would flatter the index, so
its own id is dropped from both the exact and the approximate result lists before comparing.
Oracle-tested against a plain numpy top-k in tests/index/test_recall.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from ovis_batch.index.kinds import exact_search, search_parameter_candidates, set_search_parameter


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / |truth[:k]|; -1 (no result) never matches."""
    total, hits = 0, 0
    for got, want in zip(found[:, :k], truth[:, :k], strict=True):
        want = want[want >= 0]
        total += len(want)
        hits += len(np.intersect1d(got[got >= 0], want))
    return hits / total if total else 1.0


def without_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row of `ids` without the query's own id, cut to k columns (padded with -1)."""
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for row, (found, own) in enumerate(zip(ids, self_ids, strict=True)):
        others = found[found != own][:k]
        out[row, : len(others)] = others
    return out


@dataclass(frozen=True)
class RecallMeasurement:
    """The chosen knob value, the recall@k it reached, and the whole sweep."""

    k: int
    queries: int
    parameter: str | None
    value: int | None
    recall: float
    sweep: dict[int, float]


def tune_search_parameter(
    index: faiss.Index,
    kind: str,
    queries: np.ndarray,
    query_ids: np.ndarray,
    *,
    k: int,
    target: float,
    limit: int | None = None,
) -> RecallMeasurement:
    """Try increasing nprobe (ivf) / efSearch (hnsw) until recall@k reaches `target`; apply the choice.

    Picks the smallest value that reaches the target, else the largest tried. Flat is exact: recall 1.
    """
    if kind == "flat" or len(queries) == 0:
        return RecallMeasurement(k, len(queries), None, None, 1.0, {})
    parameter = "nprobe" if kind == "ivf" else "ef_search"
    _, exact = exact_search(index, kind, queries, k + 1)
    truth = without_self(exact, query_ids, k)
    sweep: dict[int, float] = {}
    for value in search_parameter_candidates(index, kind, k, limit):
        set_search_parameter(index, kind, value)
        _, found = index.search(queries, k + 1)
        sweep[value] = recall_at_k(without_self(found, query_ids, k), truth, k)
        if sweep[value] >= target:
            break
    chosen = next((v for v, r in sweep.items() if r >= target), max(sweep))
    set_search_parameter(index, kind, chosen)
    return RecallMeasurement(k, len(queries), parameter, chosen, sweep[chosen], sweep)
