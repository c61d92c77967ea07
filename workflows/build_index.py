"""Retrieval index: build a FAISS index from the batch job's embeddings, grow it nightly, search it.

    ovis-batch index build  --embeddings runs/captions --index runs/index [--kind auto] [--config configs/index.yaml]
    ovis-batch index add    --embeddings runs/captions-2026-11-30 --index runs/index
    ovis-batch index search --index runs/index --text "a red bicycle" [--k 10] [--format json]
    ovis-batch index info   --index runs/index

Build: check every shard's footer (columns, model, strategy, dimension) -> choose the kind -> for
ivf/hnsw, one sampling pass (training vectors and held-out queries) and training -> stream every
usable row into the index -> keep the newest row of ids seen twice -> tune nprobe/efSearch to the
recall target, measure recall@k against exact search -> write the folder beside the old one and swap.
Add: the same against the existing index (its model, strategy, dimension and FAISS id counter),
without training; ids already in the index are replaced.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from ovis_batch.index.build import (
    check_compatible,
    finish_manifest,
    history_entry,
    measure_recall,
    plan_index,
    require_vectors,
    search_limit,
    warn_if_flat_is_large,
)
from ovis_batch.index.folder import (
    ID_MAP_FILE,
    IdMap,
    IndexManifest,
    IndexWriter,
    check_build_target,
    new_manifest,
    open_index,
)
from ovis_batch.index.ingest import add_embeddings, duplicate_faiss_ids
from ovis_batch.index.kinds import remove_ids
from ovis_batch.index.reader import RowSample, open_embedding_input
from ovis_batch.index.search import RetrievalIndex, SearchHit, load_query_image, model_query_embedder
from ovis_batch.index.settings import IndexSettings
from ovis_batch.storage import location

log = logging.getLogger(__name__)


def build_index(
    embeddings: str | os.PathLike,
    index_dir: str | os.PathLike,
    settings: IndexSettings,
    *,
    overwrite: bool = False,
) -> IndexManifest:
    """Build a new index at `index_dir` from the embedding Parquet at `embeddings`."""
    started = time.perf_counter()
    source = open_embedding_input(embeddings, settings.id_column)
    with IndexWriter(index_dir) as writer:
        check_build_target(index_dir, overwrite)
        plan = plan_index(source, settings)
        log.info(
            "building the %s index from %d files (%d rows)", plan.kind, len(source.files), source.total_rows
        )
        added = add_embeddings(
            plan.index,
            plan.kind,
            source,
            batch_rows=settings.batch_rows,
            bad_vectors=settings.bad_vectors,
            stage_keys=writer.stage_keys,
            workers=settings.workers,
            executor=settings.executor,
            ray_address=settings.ray_address,
        )
        require_vectors(added.counts, source.location)
        superseded, _ = duplicate_faiss_ids(added.keys, previous=None)
        index = remove_ids(plan.index, plan.kind, superseded)
        limit = search_limit(plan.kind, settings)
        recall = measure_recall(index, plan.kind, plan.query_ids, plan.query_vectors, settings.recall, limit)
        fields = new_manifest(
            source.provenance,
            id_column=settings.id_column,
            kind=plan.kind,
            requested_kind=settings.kind,
            build={**plan.build, "seed": settings.seed},
        )
        entry = history_entry(
            "build",
            source,
            added.counts,
            superseded=len(superseded),
            replaced=0,
            seconds=time.perf_counter() - started,
        )
        manifest = finish_manifest(fields, index, recall, entry, next_faiss_id=source.end_faiss_id)
        writer.commit(index, manifest, previous=None, removed=superseded)
    log.info("built %s: %d vectors, recall@%d %.3f", index_dir, manifest.count, recall.k, recall.value)
    return manifest


def add_to_index(
    embeddings: str | os.PathLike, index_dir: str | os.PathLike, settings: IndexSettings
) -> IndexManifest:
    """Add (or replace, by id) the embeddings at `embeddings` in the existing index at `index_dir`."""
    started = time.perf_counter()
    with IndexWriter(index_dir) as writer:
        current, index = open_index(index_dir)
        source = open_embedding_input(embeddings, current.id_column, first_faiss_id=current.next_faiss_id)
        check_compatible(current, str(index_dir), source)
        queries = RowSample.draw(
            source.first_faiss_id, source.end_faiss_id, settings.recall.queries, settings.seed
        )
        added = add_embeddings(
            index,
            current.kind,
            source,
            batch_rows=settings.batch_rows,
            bad_vectors=settings.bad_vectors,
            stage_keys=writer.stage_keys,
            sample_ids=queries.wanted if current.kind != "flat" else None,
            workers=settings.workers,
            executor=settings.executor,
            ray_address=settings.ray_address,
        )
        require_vectors(added.counts, source.location)
        previous = IdMap(location(index_dir).join(ID_MAP_FILE))
        superseded, replaced = duplicate_faiss_ids(added.keys, previous)
        removed = np.concatenate([superseded, replaced])
        index = remove_ids(index, current.kind, removed)
        limit = search_limit(current.kind, settings)
        recall = measure_recall(
            index, current.kind, added.sample_ids, added.sample_vectors, settings.recall, limit
        )
        entry = history_entry(
            "add",
            source,
            added.counts,
            superseded=len(superseded),
            replaced=len(replaced),
            seconds=time.perf_counter() - started,
        )
        manifest = finish_manifest(
            current.model_dump(), index, recall, entry, next_faiss_id=source.end_faiss_id
        )
        writer.commit(index, manifest, previous=previous, removed=removed)
    warn_if_flat_is_large(index_dir, manifest, settings.auto_flat_threshold)
    return manifest


def search_index(
    index_dir: str | os.PathLike,
    *,
    text: str | None = None,
    image: str | os.PathLike | None = None,
    item_id: str | None = None,
    k: int = 10,
    model: str | None = None,
    device: str | None = None,
) -> list[SearchHit]:
    """Top-k items for one query: a stored id, a text or an image (embedded with the index's model)."""
    index = RetrievalIndex(index_dir)
    if item_id is not None:
        return index.search_id(item_id, k)
    embedder = model_query_embedder(model or index.manifest.model["name"], index.provenance, device)
    if text is not None:
        return index.search_text(text, embedder.embed_text, k)
    assert image is not None, "one of text, image, item_id is required"
    return index.search_image(load_query_image(image), embedder.embed_image, k)
