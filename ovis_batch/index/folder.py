"""The index folder: its files, `index.json`, the id map, and writes that never damage what exists.

    INDEX_DIR/
      index.faiss      the FAISS index (vectors keyed by int64 FAISS ids)
      id_map.parquet   faiss_id -> id, caption; sorted by faiss_id, so lookups read few row groups
      index.json       written last: format version, model, strategy, dim, count, kind, build
                       parameters, search parameter, measured recall, history of builds and adds

INDEX_DIR is a local folder or a URI (s3://, gs://, ...): every file goes through `ovis_batch.storage`.
Every build or add writes a complete new folder next to the old one (`.INDEX_DIR.staging-*`) and then
swaps it in (`storage.replace_folder`: two renames on a local disk; on an object store the files are
copied into place with index.json last); a failure before the swap leaves the existing index exactly
as it was. If the process dies during the swap, the complete index is still there (under
`.INDEX_DIR.previous-*` on a local disk, `.INDEX_DIR.staging-*` on an object store) and opening the
index says so. A lease (`.INDEX_DIR.lock`, `ovis_batch.lease`) keeps two writers from racing, on any
store; readers need no lock.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

import ovis_batch
from ovis_batch.index.errors import IndexFolderError
from ovis_batch.index.provenance import EmbeddingProvenance, ModelIdentity
from ovis_batch.lease import Lease
from ovis_batch.storage import Location, StorageError, location, replace_folder

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
ID_MAP_FILE = "id_map.parquet"
MANIFEST_FILE = "index.json"
ID_MAP_SCHEMA = pa.schema([("faiss_id", pa.int64()), ("id", pa.string()), ("caption", pa.string())])
_ID_MAP_ROW_GROUP = 65_536
# A build or add killed without releasing its lease blocks the next one for at most this long.
LEASE_TIMEOUT_S = 60.0


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (index.json timestamps)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecallRecord(_Record):
    """Recall@k of the approximate index vs exact search, measured at the last build or add."""

    k: int
    value: float
    queries: int
    floor: float
    target: float
    below_floor: bool
    parameter: str | None  # "nprobe", "ef_search"; None for exact (flat)
    parameter_value: int | None
    sweep: dict[str, float]  # knob value -> recall, as tried
    measured_at: str
    count_at_measurement: int


class HistoryEntry(_Record):
    """One build or add: where the vectors came from and what happened to the rows."""

    action: Literal["build", "add"]
    at: str
    embeddings: str
    files: int
    rows: int
    added: int
    replaced: int  # ids already in the index whose vector and caption were replaced
    duplicates_in_input: int  # ids seen more than once in this input: the last one was kept
    error_rows: int
    without_embedding: int
    skipped_bad_vectors: int
    seconds: float


class IndexManifest(_Record):
    """The content of `index.json`."""

    format_version: int
    package_version: str
    created_at: str
    updated_at: str
    model: dict[str, str | None]
    embedding: dict[str, Any]  # {"strategy": str, "dim": int}
    metric: Literal["inner_product"] = "inner_product"
    id_column: str
    count: int
    next_faiss_id: int
    kind: Literal["flat", "ivf", "hnsw"]
    requested_kind: str
    build: dict[str, Any]
    search: dict[str, int]  # {"nprobe": 32} or {"ef_search": 64}; {} for flat
    recall: RecallRecord
    history: list[HistoryEntry]

    def provenance(self) -> EmbeddingProvenance:
        """The model, strategy and dimension every vector of this index shares."""
        pixels = self.embedding.get("pixels")
        return EmbeddingProvenance(
            ModelIdentity.from_dict(self.model),
            str(self.embedding["strategy"]),
            int(self.embedding["dim"]),
            tuple(pixels) if pixels else None,
        )

    @property
    def search_value(self) -> int | None:
        """The stored nprobe or efSearch; None for flat."""
        return next(iter(self.search.values()), None)


def new_manifest(
    provenance: EmbeddingProvenance, *, id_column: str, kind: str, requested_kind: str, build: dict[str, Any]
) -> dict[str, Any]:
    """The fields of a new index's manifest that do not depend on its content (completed at commit)."""
    now = utc_now()
    return {
        "format_version": FORMAT_VERSION,
        "package_version": ovis_batch.__version__,
        "created_at": now,
        "updated_at": now,
        "model": provenance.model.to_dict(),
        "embedding": {"strategy": provenance.strategy, "dim": provenance.dim}
        | ({"pixels": list(provenance.pixels)} if provenance.pixels else {}),
        "id_column": id_column,
        "kind": kind,
        "requested_kind": requested_kind,
        "build": build,
        "history": [],
    }


def read_manifest(folder: str | os.PathLike | Location) -> IndexManifest:
    """Read and check `index.json`; IndexFolderError names the folder and says what to do."""
    folder = location(folder)
    path = folder.join(MANIFEST_FILE)
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise _missing_index(folder) from None
    except (OSError, ValueError, StorageError) as err:
        raise IndexFolderError(f"{path} is unreadable ({err}); rebuild the index with `index build`") from err
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise IndexFolderError(
            f"{folder} has index format version {version!r}, this ovis-batch "
            f"{ovis_batch.__version__} reads version {FORMAT_VERSION}. Rebuild it from the embeddings with "
            f"`ovis-batch index build --overwrite`, or use the ovis-batch version that wrote it "
            f"({raw.get('package_version', 'unknown') if isinstance(raw, dict) else 'unknown'})."
        )
    try:
        return IndexManifest.model_validate(raw)
    except ValidationError as err:
        raise IndexFolderError(f"{path} is damaged:\n{err}\nRebuild the index with `index build`.") from err


def _missing_index(folder: Location) -> IndexFolderError:
    """No index.json: say so, or point at the complete index an interrupted swap left beside it."""
    beside = [folder.at(i.path) for i in folder.parent.list() if i.base_name.startswith(f".{folder.name}.")]
    previous = [p for p in beside if ".previous-" in p.name]
    if previous and not folder.exists():
        return IndexFolderError(
            f"no index at {folder}, but {previous[-1]} holds the previous one: a write was interrupted "
            f"while swapping folders. Rename {previous[-1]} to {folder} and run the add again."
        )
    staged = [p for p in beside if ".staging-" in p.name and p.join(MANIFEST_FILE).is_file()]
    if staged:
        return IndexFolderError(
            f"{folder} has no {MANIFEST_FILE}, but {staged[-1]} holds a complete index: a write was "
            f"interrupted while its files were copied into place. Copy every file of {staged[-1]} into "
            f"{folder}, {MANIFEST_FILE} last, then delete {staged[-1]}."
        )
    return IndexFolderError(
        f"{folder} is not an index folder (no {MANIFEST_FILE}); build one with `index build`"
    )


def open_index(folder: str | os.PathLike | Location) -> tuple[IndexManifest, faiss.Index]:
    """The manifest and FAISS index of `folder`, checked against each other."""
    folder = location(folder)
    manifest = read_manifest(folder)
    source = folder.join(INDEX_FILE)
    try:
        with source.open_input() as stream:
            index = faiss.read_index(faiss.PyCallbackIOReader(stream.read))
    except (RuntimeError, OSError) as err:
        raise IndexFolderError(f"cannot read {source}: {err}; rebuild the index") from err
    if index.ntotal != manifest.count or index.d != manifest.embedding["dim"]:
        raise IndexFolderError(
            f"{folder} is inconsistent: {INDEX_FILE} holds {index.ntotal} vectors of dim {index.d}, "
            f"{MANIFEST_FILE} says {manifest.count} of dim {manifest.embedding['dim']}; rebuild the index"
        )
    return manifest, index


class IdMap:
    """Read access to `id_map.parquet` without loading it whole (it can hold tens of millions of rows)."""

    def __init__(self, path: str | os.PathLike | Location) -> None:
        self.path = location(path)

    def rows(self) -> int:
        """Row count, from the Parquet footer."""
        with self.path.open_input() as stream:
            return pq.ParquetFile(stream).metadata.num_rows

    def lookup(self, faiss_ids: np.ndarray) -> dict[int, tuple[str, str | None]]:
        """faiss_id -> (id, caption) for the given FAISS ids (row groups pruned by faiss_id range)."""
        wanted = [int(i) for i in faiss_ids if i >= 0]
        if not wanted:
            return {}
        table = pq.read_table(self.path.path, filesystem=self.path.fs, filters=[("faiss_id", "in", wanted)])
        return {
            f: (i, c)
            for f, i, c in zip(
                table["faiss_id"].to_pylist(),
                table["id"].to_pylist(),
                table["caption"].to_pylist(),
                strict=True,
            )
        }

    def find(self, item_id: str) -> int | None:
        """The FAISS id of `item_id`, or None."""
        table = pq.read_table(
            self.path.path, filesystem=self.path.fs, columns=["faiss_id"], filters=[("id", "==", item_id)]
        )
        return int(table["faiss_id"][0].as_py()) if table.num_rows else None

    def iter_keys(self, batch_rows: int = _ID_MAP_ROW_GROUP) -> Iterator[pa.RecordBatch]:
        """(faiss_id, id) batches in faiss_id order."""
        with self.path.open_input() as stream:
            yield from pq.ParquetFile(stream).iter_batches(batch_size=batch_rows, columns=["faiss_id", "id"])

    def faiss_ids_of(self, ids: pa.Array) -> np.ndarray:
        """FAISS ids of the rows whose id is in `ids` (one streaming pass over the id column)."""
        found = [
            batch.column(0).filter(pc.is_in(batch.column(1), value_set=ids)).to_numpy()
            for batch in self.iter_keys()
        ]
        return np.concatenate(found) if found else np.zeros(0, np.int64)


class IndexWriter:
    """Lease the folder, stage a complete new index folder beside it, and swap it in on `commit`.

    Use as a context manager; leaving it without `commit` (an exception) deletes the staging folder
    and leaves the existing index untouched.
    """

    def __init__(
        self, folder: str | os.PathLike | Location, *, lease_timeout_s: float = LEASE_TIMEOUT_S
    ) -> None:
        self.folder = location(folder)
        token = secrets.token_hex(4)
        parent, name = self.folder.parent, self.folder.name
        self.staging = parent.join(f".{name}.staging-{token}")
        self._previous = parent.join(f".{name}.previous-{token}")
        self._lease = Lease(
            parent.join(f".{name}.lock"),
            what="index build or add",
            subject=self.folder,
            timeout_s=lease_timeout_s,
            busy_hint="wait for it to finish",
        )
        self._keys_written = 0

    def __enter__(self) -> IndexWriter:
        self._lease.__enter__()  # LeaseHeldError names the writer that holds it
        self.staging.join("new_keys").make_dirs()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.staging.delete_tree()
        finally:
            self._lease.release()

    def stage_keys(self, keys: pa.Table) -> None:
        """Keep id-map rows of newly added vectors (in faiss_id order) until the commit."""
        path = self.staging.join("new_keys", f"{self._keys_written:08d}.parquet")
        pq.write_table(keys.cast(ID_MAP_SCHEMA), path.path, filesystem=path.fs)
        self._keys_written += 1

    def commit(
        self, index: faiss.Index, manifest: IndexManifest, *, previous: IdMap | None, removed: np.ndarray
    ) -> None:
        """Write the FAISS file, the id map (previous rows + staged rows - removed ids), then index.json,
        and swap the staged folder in."""
        self._lease.ensure_held()
        with self.staging.join(INDEX_FILE).open_output() as stream:
            faiss.write_index(index, faiss.PyCallbackIOWriter(stream.write))
        removed_ids = pa.array(np.asarray(removed, dtype=np.int64))
        rows = self._write_id_map(previous, removed_ids)
        if rows != index.ntotal or rows != manifest.count:
            raise AssertionError(f"id map has {rows} rows, index {index.ntotal}, manifest {manifest.count}")
        self.staging.join("new_keys").delete_tree()
        self.staging.join(MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        for name in (INDEX_FILE, ID_MAP_FILE, MANIFEST_FILE):
            self.staging.join(name).sync()
        replace_folder(self.staging, self.folder, marker=MANIFEST_FILE, previous=self._previous)

    def _write_id_map(self, previous: IdMap | None, removed: pa.Array) -> int:
        staged = self.staging.join("new_keys").files()
        sources = ([previous.path] if previous is not None else []) + staged
        rows, pending = 0, []
        target = self.staging.join(ID_MAP_FILE)
        with pq.ParquetWriter(target.path, ID_MAP_SCHEMA, filesystem=target.fs) as writer:
            for source in sources:
                with source.open_input() as stream:
                    for batch in pq.ParquetFile(stream).iter_batches(batch_size=_ID_MAP_ROW_GROUP):
                        kept = pa.Table.from_batches([batch]).filter(
                            pc.invert(pc.is_in(batch.column("faiss_id"), value_set=removed))
                        )
                        pending.append(kept.cast(ID_MAP_SCHEMA))
                        rows += kept.num_rows
                        if sum(t.num_rows for t in pending) >= _ID_MAP_ROW_GROUP:
                            writer.write_table(pa.concat_tables(pending), row_group_size=_ID_MAP_ROW_GROUP)
                            pending = []
            if pending or rows == 0:
                writer.write_table(pa.concat_tables(pending) if pending else ID_MAP_SCHEMA.empty_table())
        return rows


def check_build_target(folder: str | os.PathLike | Location, overwrite: bool) -> None:
    """Refuse to build over an existing index (unless `overwrite`) or over a folder that is not an index."""
    folder = location(folder)
    if folder.is_file():
        raise IndexFolderError(f"{folder} is a file, not an index folder; choose another --index path")
    if not folder.list():
        return
    if not folder.join(MANIFEST_FILE).is_file():
        raise IndexFolderError(f"{folder} exists and is not an index folder; choose another --index path")
    if not overwrite:
        raise IndexFolderError(
            f"{folder} already holds an index: grow it with `index add`, or pass --overwrite to replace it"
        )
