"""The steps of building and growing an index that are not reading, FAISS kinds or folder handling.

`plan_index` decides the kind and prepares an empty (trained) index plus held-out recall queries;
`measure_recall` tunes the search knob and records recall@k; `check_compatible`, `require_vectors`,
`history_entry` and `finish_manifest` keep the bookkeeping in one place. `workflows/build_index.py`
calls them in order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ovis_batch.index.errors import EmbeddingInputError, IncompatibleEmbeddingsError
from ovis_batch.index.folder import HistoryEntry, IndexManifest, RecallRecord, utc_now
from ovis_batch.index.ingest import draw_sample
from ovis_batch.index.kinds import (
    MIN_TRAIN_POINTS_PER_LIST,
    choose_nlist,
    new_flat_index,
    new_hnsw_index,
    new_ivf_index,
)
from ovis_batch.index.reader import EmbeddingInput, ReadCounts
from ovis_batch.index.recall import tune_search_parameter
from ovis_batch.index.settings import IndexSettings, RecallSettings

log = logging.getLogger(__name__)


@dataclass
class IndexPlan:
    """An empty index of the chosen kind (trained for ivf) and the held-out recall queries."""

    kind: str
    index: faiss.Index
    build: dict[str, Any]
    query_ids: np.ndarray
    query_vectors: np.ndarray


def plan_index(source: EmbeddingInput, settings: IndexSettings) -> IndexPlan:
    """Choose the kind and prepare the index; ivf and hnsw cost one sampling pass over the input.

    `auto` is flat when the input has fewer rows than `auto_flat_threshold` (decided from the file
    footers, no read), otherwise flat or ivf by the usable vector count found by the sampling pass.
    """
    dim, kind = source.provenance.dim, settings.kind
    empty = np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    if kind == "flat" or (kind == "auto" and source.total_rows < settings.auto_flat_threshold):
        return IndexPlan("flat", new_flat_index(dim), {}, *empty)

    nlist_bound = settings.ivf.nlist or choose_nlist(source.total_rows, settings.ivf.lists_per_sqrt_n)
    train_size = settings.ivf.train_points_per_list * nlist_bound if kind in ("auto", "ivf") else 0
    ids, vectors, counts = draw_sample(
        source,
        train_size + settings.recall.queries,
        seed=settings.seed,
        batch_rows=settings.batch_rows,
        bad_vectors=settings.bad_vectors,
    )
    require_vectors(counts, source.location)
    if kind == "auto":
        kind = "flat" if counts.vectors < settings.auto_flat_threshold else "ivf"
    if kind == "flat":
        return IndexPlan("flat", new_flat_index(dim), {}, *empty)

    order = np.random.default_rng([settings.seed, 2]).permutation(len(ids))
    # A small input keeps most of its sample for training; queries are only a measurement.
    n_queries = min(settings.recall.queries, len(ids) if kind == "hnsw" else len(ids) // 10)
    queries, train = order[:n_queries], order[n_queries:]
    if kind == "hnsw":
        index = new_hnsw_index(dim, settings.hnsw.m, settings.hnsw.ef_construction)
        build = {"m": settings.hnsw.m, "ef_construction": settings.hnsw.ef_construction}
        return IndexPlan(kind, index, build, ids[queries], vectors[queries])

    nlist = settings.ivf.nlist or choose_nlist(counts.vectors, settings.ivf.lists_per_sqrt_n)
    if len(train) < nlist:
        raise EmbeddingInputError(
            f"ivf.nlist {nlist} needs at least {nlist} training vectors ({MIN_TRAIN_POINTS_PER_LIST * nlist} "
            f"recommended) but {source.location} has only {len(train)} usable for training: lower ivf.nlist, "
            "or use --kind flat for a collection this small"
        )
    train = train[: settings.ivf.train_points_per_list * nlist]
    log.info("training %d ivf lists on %d vectors", nlist, len(train))
    index = new_ivf_index(vectors[train], nlist, settings.ivf.kmeans_iterations, settings.seed)
    build = {
        "nlist": nlist,
        "train_vectors": len(train),
        "kmeans_iterations": settings.ivf.kmeans_iterations,
        "lists_per_sqrt_n": settings.ivf.lists_per_sqrt_n if settings.ivf.nlist is None else None,
    }
    return IndexPlan(kind, index, build, ids[queries], vectors[queries])


def require_vectors(counts: ReadCounts, location: str) -> None:
    """Raise EmbeddingInputError when the input yielded no usable vector, saying why rows were left out."""
    if counts.vectors:
        return
    raise EmbeddingInputError(
        f"no usable embeddings in {location}: {counts.rows} rows, of which {counts.error_rows} have a status "
        f"other than 'ok', {counts.without_embedding} have no embedding and {counts.skipped_bad_vectors} "
        "have bad vectors. Run the batch job with embeddings enabled, or check why its rows failed."
    )


def check_compatible(manifest: IndexManifest, folder: str, source: EmbeddingInput) -> None:
    """Refuse vectors from another model, strategy or dimension than the index holds."""
    reasons = manifest.provenance().differences(source.provenance)
    if reasons:
        raise IncompatibleEmbeddingsError(
            f"cannot add {source.location} to {folder}: {'; '.join(reasons)} (index: "
            f"[{manifest.provenance().describe()}], new files: [{source.provenance.describe()}]). "
            "Vectors of different models or strategies are not comparable: build a separate index."
        )


def measure_recall(
    index: faiss.Index,
    kind: str,
    query_ids: np.ndarray,
    query_vectors: np.ndarray,
    settings: RecallSettings,
    limit: int | None,
) -> RecallRecord:
    """Tune nprobe / efSearch to `settings.target`, record recall@k vs exact, warn under the floor."""
    measured = tune_search_parameter(
        index, kind, query_vectors, query_ids, k=settings.k, target=settings.target, limit=limit
    )
    below = measured.recall < settings.floor
    if below:
        log.warning(
            "recall@%d of the %s index is %.3f, under the floor %.2f (%s=%s, %d queries); raise %s or "
            "rebuild with more lists / a larger graph",
            settings.k,
            kind,
            measured.recall,
            settings.floor,
            measured.parameter,
            measured.value,
            measured.queries,
            "ivf.max_nprobe" if kind == "ivf" else "hnsw.max_ef_search",
        )
    return RecallRecord(
        k=settings.k,
        value=round(measured.recall, 4),
        queries=measured.queries,
        floor=settings.floor,
        target=settings.target,
        below_floor=below,
        parameter=measured.parameter,
        parameter_value=measured.value,
        sweep={str(v): round(r, 4) for v, r in measured.sweep.items()},
        measured_at=utc_now(),
        count_at_measurement=index.ntotal,
    )


def search_limit(kind: str, settings: IndexSettings) -> int | None:
    """The largest nprobe / efSearch the tuning may pick."""
    return (
        settings.ivf.max_nprobe if kind == "ivf" else settings.hnsw.max_ef_search if kind == "hnsw" else None
    )


def history_entry(
    action: str, source: EmbeddingInput, counts: ReadCounts, *, superseded: int, replaced: int, seconds: float
) -> HistoryEntry:
    """The index.json record of one build or add; `added` counts ids new to the index."""
    return HistoryEntry(
        action=action,
        at=utc_now(),
        embeddings=source.location,
        files=len(source.files),
        rows=counts.rows,
        added=counts.vectors - superseded - replaced,
        replaced=replaced,
        duplicates_in_input=superseded,
        error_rows=counts.error_rows,
        without_embedding=counts.without_embedding,
        skipped_bad_vectors=counts.skipped_bad_vectors,
        seconds=round(seconds, 2),
    )


def finish_manifest(
    fields: dict[str, Any], index: faiss.Index, recall: RecallRecord, entry: HistoryEntry, next_faiss_id: int
) -> IndexManifest:
    """The manifest of the index about to be committed: `fields` of the existing or new one, updated."""
    search = {recall.parameter: recall.parameter_value} if recall.parameter else {}
    return IndexManifest.model_validate(
        {
            **fields,
            "updated_at": utc_now(),
            "count": index.ntotal,
            "next_faiss_id": next_faiss_id,
            "search": search,
            "recall": recall,
            "history": [*fields.get("history", []), entry],
        }
    )


def warn_if_flat_is_large(index_dir: str | Path, manifest: IndexManifest, threshold: int) -> None:
    """An exact index grown past the auto threshold by adds: suggest rebuilding it as ivf."""
    if manifest.kind == "flat" and manifest.count >= threshold:
        log.warning(
            "%s is an exact (flat) index of %d vectors, above auto_flat_threshold %d: queries scan "
            "everything; rebuild with `index build --kind auto --overwrite` for an ivf index",
            index_dir,
            manifest.count,
            threshold,
        )
