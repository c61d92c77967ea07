"""Putting the vectors of an embedding input into a FAISS index, in this process or in parallel parts.

One machine: `add_embeddings(..., workers=1)` streams record batches from the Parquet files into the
index; the driver holds one batch of vectors plus the index itself (and the (faiss_id, id) pairs of
what it added, to resolve duplicate ids at the end).

Many processes or a Ray cluster (`workers > 1`, flat and ivf indexes): the files are split into
contiguous groups of about equal row count. Each group becomes a `PartTask` carrying an empty copy of
the (trained) index; `build_part` reads its files and adds them to that copy, in a spawned process
(`executor: processes`) or a Ray task (`executor: ray`, with `ray_address` for an existing cluster).
The parts come back serialized with their id-map rows and are merged into the index in file order:
IVF parts share the trained centroids, so their inverted lists are appended list by list
(`IndexIVF.merge_from`), and flat parts are concatenated. FAISS ids come from each file's row
offsets (see `reader`), so parts never renumber. On a cluster the embedding paths must be readable
from every node (s3://, gs://, or a shared mount), the driver needs memory for the final index, and
training still happens once on the driver from a sample. HNSW graphs cannot be merged: hnsw is
always built in one process (FAISS itself uses every core of that machine).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from ovis_batch.index.folder import ID_MAP_SCHEMA, IdMap
from ovis_batch.index.kinds import empty_like, merge_parts
from ovis_batch.index.reader import (
    EmbeddingFile,
    EmbeddingInput,
    ReadCounts,
    RowSample,
    iter_embedding_batches,
)

log = logging.getLogger(__name__)
KEY_SCHEMA = pa.schema([("faiss_id", pa.int64()), ("id", pa.string())])


@dataclass
class IngestResult:
    """What `add_embeddings` did: row counts, the (faiss_id, id) pairs added, and the rows sampled."""

    counts: ReadCounts
    keys: pa.Table  # faiss_id, id of every vector added, in faiss_id order
    sample_ids: np.ndarray
    sample_vectors: np.ndarray


def draw_sample(
    source: EmbeddingInput, size: int, *, seed: int, batch_rows: int, bad_vectors: str
) -> tuple[np.ndarray, np.ndarray, ReadCounts]:
    """A uniform sample of usable rows (FAISS ids, vectors) and the counts of the whole input.

    One pass reading only the status and embedding columns; it also finds bad vectors before any
    training is spent.
    """
    sample = RowSample.draw(source.first_faiss_id, source.end_faiss_id, size, seed)
    counts = ReadCounts()
    for batch in iter_embedding_batches(
        source.files,
        source.filesystem,
        id_column=source.id_column,
        dim=source.provenance.dim,
        batch_rows=batch_rows,
        bad_vectors=bad_vectors,
        counts=counts,
        with_text=False,
    ):
        sample.offer(batch)
    ids, vectors = sample.collected(source.provenance.dim)
    return ids, vectors, counts


def add_embeddings(
    index: faiss.Index,
    kind: str,
    source: EmbeddingInput,
    *,
    batch_rows: int,
    bad_vectors: str,
    stage_keys: Callable[[pa.Table], None],
    sample_ids: np.ndarray | None = None,
    workers: int = 1,
    executor: str = "processes",
    ray_address: str | None = None,
) -> IngestResult:
    """Add every usable row of `source` to `index` under its FAISS id; id-map rows go to `stage_keys`.

    Rows whose FAISS id is in `sample_ids` are also returned (queries for the recall measurement).
    """
    wanted = np.sort(sample_ids) if sample_ids is not None else np.zeros(0, np.int64)
    if workers > 1 and kind == "hnsw":
        log.info("hnsw graphs cannot be merged from parts: adding in this process (FAISS uses all cores)")
    if workers <= 1 or kind == "hnsw" or len(source.files) == 1:
        sample = RowSample(wanted)
        counts, keys = _add_files(
            index,
            source.files,
            source.filesystem,
            id_column=source.id_column,
            dim=source.provenance.dim,
            batch_rows=batch_rows,
            bad_vectors=bad_vectors,
            on_keys=stage_keys,
            sample=sample,
        )
        return IngestResult(counts, keys, *sample.collected(source.provenance.dim))

    empty = faiss.serialize_index(empty_like(index, kind))
    threads = max(1, (os.cpu_count() or 1) // workers)
    tasks = [
        PartTask(
            group,
            source.filesystem,
            empty,
            source.id_column,
            source.provenance.dim,
            batch_rows,
            bad_vectors,
            wanted,
            threads,
        )
        for group in split_files(source.files, parts=2 * workers)
    ]
    counts, keys, sampled = ReadCounts(), [], []
    for number, result in enumerate(_run_parts(tasks, workers, executor, ray_address), start=1):
        stage_keys(result.keys)
        merge_parts(index, kind, [faiss.deserialize_index(result.index)])
        counts.add(result.counts)
        keys.append(result.keys.select(["faiss_id", "id"]))
        sampled.append((result.sample_ids, result.sample_vectors))
        log.info("merged part %d/%d (%d vectors so far)", number, len(tasks), counts.vectors)
    sample_ids_found = np.concatenate([ids for ids, _ in sampled])
    sample_vectors = np.concatenate([v for _, v in sampled]).reshape(-1, source.provenance.dim)
    return IngestResult(counts, _concat_keys(keys), sample_ids_found, sample_vectors)


def _add_files(
    index: faiss.Index,
    files: Sequence[EmbeddingFile],
    filesystem: pafs.FileSystem,
    *,
    id_column: str,
    dim: int,
    batch_rows: int,
    bad_vectors: str,
    on_keys: Callable[[pa.Table], None],
    sample: RowSample,
) -> tuple[ReadCounts, pa.Table]:
    counts, keys = ReadCounts(), []
    batches = iter_embedding_batches(
        files,
        filesystem,
        id_column=id_column,
        dim=dim,
        batch_rows=batch_rows,
        bad_vectors=bad_vectors,
        counts=counts,
    )
    for batch in batches:
        index.add_with_ids(batch.vectors, batch.faiss_ids)
        table = batch.keys()
        on_keys(table)
        keys.append(table.select(["faiss_id", "id"]))
        sample.offer(batch)
    return counts, _concat_keys(keys)


def _concat_keys(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables).combine_chunks() if tables else KEY_SCHEMA.empty_table()


@dataclass(frozen=True)
class PartTask:
    """A group of files to add to an empty copy of the index, somewhere else."""

    files: tuple[EmbeddingFile, ...]
    filesystem: pafs.FileSystem
    empty_index: np.ndarray  # faiss.serialize_index of a trained, empty index
    id_column: str
    dim: int
    batch_rows: int
    bad_vectors: str
    sample_ids: np.ndarray
    threads: int


@dataclass
class PartResult:
    """A part's index (serialized), its id-map rows, row counts and sampled rows."""

    index: np.ndarray  # serialized part index
    keys: pa.Table  # faiss_id, id, caption
    counts: ReadCounts
    sample_ids: np.ndarray
    sample_vectors: np.ndarray


def build_part(task: PartTask) -> PartResult:
    """Read a group of files into an empty copy of the index (runs in a worker process or Ray task)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(task.threads)
    try:
        index = faiss.deserialize_index(task.empty_index)
        full_keys: list[pa.Table] = []
        sample = RowSample(task.sample_ids)
        counts, _ = _add_files(
            index,
            task.files,
            task.filesystem,
            id_column=task.id_column,
            dim=task.dim,
            batch_rows=task.batch_rows,
            bad_vectors=task.bad_vectors,
            on_keys=full_keys.append,
            sample=sample,
        )
    finally:
        faiss.omp_set_num_threads(threads)
    keys = pa.concat_tables(full_keys) if full_keys else ID_MAP_SCHEMA.empty_table()
    return PartResult(faiss.serialize_index(index), keys, counts, *sample.collected(task.dim))


def split_files(files: Sequence[EmbeddingFile], parts: int) -> list[tuple[EmbeddingFile, ...]]:
    """Contiguous groups of files with about equal row counts (at most `parts` groups, none empty)."""
    parts = max(1, min(parts, len(files)))
    target = sum(f.num_rows for f in files) / parts
    groups: list[list[EmbeddingFile]] = [[]]
    filled = 0
    for i, file in enumerate(files):
        remaining_files, remaining_groups = len(files) - i, parts - len(groups)
        if groups[-1] and (filled >= target * len(groups) or remaining_files <= remaining_groups):
            groups.append([])
        groups[-1].append(file)
        filled += file.num_rows
    return [tuple(g) for g in groups]


def _run_parts(
    tasks: list[PartTask], workers: int, executor: str, ray_address: str | None
) -> Iterator[PartResult]:
    """Results in task order (so id-map rows stay in faiss_id order)."""
    if executor == "ray":
        yield from _run_parts_on_ray(tasks, ray_address)
        return
    # spawn, not fork: FAISS's OpenMP threads do not survive a fork.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(build_part, tasks)


def _run_parts_on_ray(tasks: list[PartTask], ray_address: str | None) -> Iterator[PartResult]:
    import ray

    from ovis_batch.ray_session import ray_session

    with ray_session(ray_address):
        remote = ray.remote(build_part)
        refs = [remote.options(num_cpus=task.threads).remote(task) for task in tasks]
        for ref in refs:
            yield ray.get(ref)


def duplicate_faiss_ids(keys: pa.Table, previous: IdMap | None) -> tuple[np.ndarray, np.ndarray]:
    """FAISS ids to remove so that each id is stored once, with its newest vector.

    Returns (superseded, replaced): rows of this input whose id appears again later in it (the later
    file, or the later row of the same file, wins), and rows already in the index whose id this input
    brings again.
    """
    if keys.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    newest = keys.group_by("id", use_threads=False).aggregate([("faiss_id", "max")])
    is_newest = pc.is_in(keys["faiss_id"], value_set=newest["faiss_id_max"].combine_chunks())
    superseded = keys["faiss_id"].filter(pc.invert(is_newest)).to_numpy()
    replaced = (
        previous.faiss_ids_of(newest["id"].combine_chunks())
        if previous is not None
        else np.zeros(0, np.int64)
    )
    return superseded.astype(np.int64), replaced.astype(np.int64)
