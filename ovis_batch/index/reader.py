"""Streaming reads of the batch job's embedding Parquet: file discovery, checks, and record batches.

What lives here: finding the data files under a folder (names starting with `_` or `.` are not data),
checking each file's schema and `ovis_batch` metadata from its footer alone, and iterating the usable
rows (`status == "ok"` with an embedding) as `EmbeddingBatch`es of at most `batch_rows` rows, with the
vectors checked (finite, non-zero, right length) and re-normalised to unit length in float32. Nothing
here holds more than one record batch; nothing here knows about FAISS.

Each file gets a contiguous range of FAISS ids, one per row (error rows included), in sorted path
order. The ids are therefore fixed by the input alone, so parallel workers can read disjoint files and
their results merge without renumbering.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ovis_batch.index.errors import EmbeddingInputError
from ovis_batch.index.provenance import METADATA_KEY, EmbeddingProvenance, provenance_from_metadata
from ovis_batch.storage import StorageError, location

STATUS_COLUMN = "status"
CAPTION_COLUMN = "caption"
EMBEDDING_COLUMN = "embedding"
# A vector this short is "zero": the model produced nothing to compare by direction.
MIN_VECTOR_NORM = 1e-6


@dataclass(frozen=True)
class EmbeddingFile:
    """One data file: its rows get FAISS ids `first_faiss_id .. first_faiss_id + num_rows - 1`."""

    path: str
    num_rows: int
    first_faiss_id: int
    has_caption: bool


@dataclass(frozen=True)
class EmbeddingInput:
    """The checked data files of one build or add, and the provenance they all share."""

    location: str
    filesystem: pafs.FileSystem
    files: tuple[EmbeddingFile, ...]
    provenance: EmbeddingProvenance
    id_column: str

    @property
    def total_rows(self) -> int:
        """Rows of every file, usable or not (from the footers)."""
        return sum(f.num_rows for f in self.files)

    @property
    def first_faiss_id(self) -> int:
        """The FAISS id of the first row of the first file."""
        return self.files[0].first_faiss_id

    @property
    def end_faiss_id(self) -> int:
        """One past the last FAISS id this input may use."""
        return self.files[-1].first_faiss_id + self.files[-1].num_rows


@dataclass
class EmbeddingBatch:
    """Usable rows of one record batch: unit-length float32 vectors and their ids."""

    faiss_ids: np.ndarray  # int64 [n]
    vectors: np.ndarray  # float32 [n, dim], unit length
    ids: pa.Array | None = None  # string [n]; None when read without text
    captions: pa.Array | None = None  # string [n]

    def keys(self) -> pa.Table:
        """The id-map rows of this batch: faiss_id, id, caption."""
        assert self.ids is not None and self.captions is not None, "batch was read without text"
        return pa.table({"faiss_id": self.faiss_ids, "id": self.ids, "caption": self.captions})


@dataclass
class ReadCounts:
    """What happened to the rows read: indexed, or why not."""

    rows: int = 0
    vectors: int = 0
    error_rows: int = 0
    without_embedding: int = 0
    skipped_bad_vectors: int = 0

    def add(self, other: ReadCounts) -> None:
        """Add `other`'s counts to these."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        """The counts by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def list_data_files(where: str | os.PathLike) -> tuple[pafs.FileSystem, list[str]]:
    """The `.parquet` files at `where` (a file, or a folder searched recursively; local or a URI), sorted.

    Files and folders whose names start with `_` or `.` are not data (temporary shards, markers).
    """
    try:
        found = location(where).parquet_files()
    except StorageError as err:
        raise EmbeddingInputError(
            f"embeddings not found: {err}. Point --embeddings at the batch job's output folder."
        ) from err
    return found[0].fs, [f.path for f in found]


def open_embedding_input(where: str | os.PathLike, id_column: str, first_faiss_id: int = 0) -> EmbeddingInput:
    """Check every data file's footer (schema, metadata, row count) and assign FAISS id ranges.

    Raises EmbeddingInputError naming the file when a column is missing, the metadata is absent, or two
    files disagree on model, strategy or dimension. Reads no row data.
    """
    fs, paths = list_data_files(where)
    files: list[EmbeddingFile] = []
    first: tuple[str, EmbeddingProvenance] | None = None
    next_id = first_faiss_id
    for path in paths:
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            schema, num_rows = parquet.schema_arrow, parquet.metadata.num_rows
            metadata = {**(parquet.metadata.metadata or {}), **(schema.metadata or {})}
        provenance = provenance_from_metadata(metadata, path)
        _check_schema(schema, path, id_column, provenance.dim)
        if first is None:
            first = (path, provenance)
        elif reasons := first[1].differences(provenance):
            raise EmbeddingInputError(
                f"embedding files disagree ({'; '.join(reasons)}): {first[0]} has "
                f"[{first[1].describe()}] but {path} has [{provenance.describe()}]. One index holds "
                "vectors of one model, strategy and dimension: index these outputs separately."
            )
        files.append(EmbeddingFile(path, num_rows, next_id, CAPTION_COLUMN in schema.names))
        next_id += num_rows
    assert first is not None
    if next_id == first_faiss_id:
        raise EmbeddingInputError(f"the embedding files under {where} hold no rows: nothing to index")
    return EmbeddingInput(os.fspath(where), fs, tuple(files), first[1], id_column)


def _check_schema(schema: pa.Schema, path: str, id_column: str, dim: int) -> None:
    missing = [name for name in (id_column, STATUS_COLUMN, EMBEDDING_COLUMN) if name not in schema.names]
    if missing:
        hint = " (set id_column / --id-column to the manifest's id column)" if id_column in missing else ""
        raise EmbeddingInputError(f"{path} lacks the column(s) {', '.join(missing)}{hint}")
    kind = schema.field(EMBEDDING_COLUMN).type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        raise EmbeddingInputError(f"{path}: column {EMBEDDING_COLUMN!r} is {kind}, not a list of floats")
    if not pa.types.is_floating(kind.value_type):
        raise EmbeddingInputError(f"{path}: column {EMBEDDING_COLUMN!r} holds {kind.value_type}, not floats")
    if pa.types.is_fixed_size_list(kind) and kind.list_size != dim:
        raise EmbeddingInputError(
            f"{path}: the embedding column holds {kind.list_size}-dim vectors but its "
            f"{METADATA_KEY.decode()!r} metadata says dim {dim}; the file is inconsistent: re-run the batch job"
        )


def iter_embedding_batches(
    files: Sequence[EmbeddingFile],
    filesystem: pafs.FileSystem,
    *,
    id_column: str,
    dim: int,
    batch_rows: int,
    bad_vectors: str,
    counts: ReadCounts,
    with_text: bool = True,
) -> Iterator[EmbeddingBatch]:
    """Yield the usable rows of `files`, one record batch at a time, updating `counts` as it goes.

    `bad_vectors` is "error" (raise, naming the file and row id) or "skip" (count and leave out).
    `with_text=False` reads only status and embedding (for sampling).
    """
    for file in files:
        columns = [STATUS_COLUMN, EMBEDDING_COLUMN]
        if with_text:
            columns += [id_column] + ([CAPTION_COLUMN] if file.has_caption else [])
        elif bad_vectors == "error":
            columns.append(id_column)  # to name the row in the error
        offset = file.first_faiss_id
        with filesystem.open_input_file(file.path) as handle:
            for record_batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows, columns=columns):
                batch = _usable_rows(
                    record_batch, offset, file, id_column, dim, bad_vectors, counts, with_text
                )
                offset += record_batch.num_rows
                if len(batch.faiss_ids):
                    yield batch


def _usable_rows(
    record_batch: pa.RecordBatch,
    first_faiss_id: int,
    file: EmbeddingFile,
    id_column: str,
    dim: int,
    bad_vectors: str,
    counts: ReadCounts,
    with_text: bool,
) -> EmbeddingBatch:
    n = record_batch.num_rows
    status = pc.cast(record_batch.column(STATUS_COLUMN), pa.string())
    ok = pc.fill_null(pc.equal(status, "ok"), False)
    usable = pc.and_(ok, pc.is_valid(record_batch.column(EMBEDDING_COLUMN)))
    n_ok, n_usable = pc.sum(ok).as_py() or 0, pc.sum(usable).as_py() or 0
    counts.rows += n
    counts.error_rows += n - n_ok
    counts.without_embedding += n_ok - n_usable
    rows = record_batch.filter(usable)
    faiss_ids = np.arange(first_faiss_id, first_faiss_id + n, dtype=np.int64)[
        usable.to_numpy(zero_copy_only=False)
    ]
    ids = pc.cast(rows.column(id_column), pa.string()) if id_column in rows.schema.names else None
    vectors = _vectors(rows.column(EMBEDDING_COLUMN), dim, file.path, ids)

    finite = np.isfinite(vectors).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], vectors, 0), axis=1)
    bad = ~finite | (norms < MIN_VECTOR_NORM)
    if bad.any():
        if bad_vectors == "error":
            first = int(np.flatnonzero(bad)[0])
            problem = "a NaN or infinite" if not finite[first] else "a zero"
            row = (
                repr(ids[first].as_py()) if ids is not None else f"#{faiss_ids[first] - file.first_faiss_id}"
            )
            raise EmbeddingInputError(
                f"{file.path}: row {row} has {problem} embedding ({int(bad.sum())} bad vector(s) in this "
                "batch). The batch job should have written such rows with status 'error': re-run those "
                "rows, or set bad_vectors: skip in the index settings to leave them out."
            )
        counts.skipped_bad_vectors += int(bad.sum())
        keep = ~bad
        vectors, norms, faiss_ids = vectors[keep], norms[keep], faiss_ids[keep]
        rows = rows.filter(pa.array(keep))
        ids = ids.filter(pa.array(keep)) if ids is not None else None
    # Re-normalise: inner product is then exactly cosine, whatever precision the writer used.
    vectors /= norms[:, None]
    counts.vectors += len(faiss_ids)
    if not with_text:
        return EmbeddingBatch(faiss_ids, vectors)
    captions = (
        pc.cast(rows.column(CAPTION_COLUMN), pa.string())
        if CAPTION_COLUMN in rows.schema.names
        else pa.nulls(len(faiss_ids), pa.string())
    )
    return EmbeddingBatch(faiss_ids, vectors, ids, captions)


def _vectors(column: pa.Array, dim: int, path: str, ids: pa.Array | None) -> np.ndarray:
    """float32 [n, dim] from a (fixed-size or variable) list column without nulls at the top level."""
    if not pa.types.is_fixed_size_list(column.type):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        wrong = np.flatnonzero(lengths != dim)
        if len(wrong):
            row = repr(ids[int(wrong[0])].as_py()) if ids is not None else f"#{int(wrong[0])}"
            raise EmbeddingInputError(
                f"{path}: row {row} has a {int(lengths[wrong[0]])}-dim embedding but the file's metadata "
                f"says dim {dim} (mixed dimensions in one file): re-run the batch job for this output"
            )
    values = column.flatten()
    if values.type != pa.float32():
        values = values.cast(pa.float32())
    # Null elements inside a vector become NaN here and are caught as bad vectors.
    array = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=True)
    return array.reshape(len(column), dim)


@dataclass
class RowSample:
    """Rows picked by FAISS id as the batches stream past (to train lists and to measure recall)."""

    wanted: np.ndarray  # sorted int64 FAISS ids
    faiss_ids: list[np.ndarray] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def draw(cls, first_faiss_id: int, end_faiss_id: int, size: int, seed: int) -> RowSample:
        """Pick `size` FAISS ids uniformly from the range; rows that turn out unusable are not replaced."""
        population = end_faiss_id - first_faiss_id
        size = min(size, population)
        picked = np.random.default_rng(seed).choice(population, size=size, replace=False)
        return cls(np.sort(picked).astype(np.int64) + first_faiss_id)

    def offer(self, batch: EmbeddingBatch) -> None:
        """Keep the rows of `batch` that were drawn."""
        hit = np.isin(batch.faiss_ids, self.wanted, assume_unique=True)
        if hit.any():
            self.faiss_ids.append(batch.faiss_ids[hit])
            self.vectors.append(batch.vectors[hit])

    def collected(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(faiss_ids [m], vectors [m, dim]) of the rows found."""
        if not self.faiss_ids:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        return np.concatenate(self.faiss_ids), np.concatenate(self.vectors)
