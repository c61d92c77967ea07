"""The output folder: contract schema, atomic shards, the committed ids, the job fingerprint.

Exactly-once is built on one rule: **a shard is the commit record of its rows.** A shard is written under
a temporary name and renamed (on object stores: one PUT, which becomes visible whole), so a reader
never sees a partial file, and the ids in visible shards are exactly the committed rows. Resume reads
those ids and skips them. Shard names are derived from the ids they hold, so a task that Ray retries
after it already wrote rewrites the same file instead of adding a second copy. A final check reads
every id back and repairs what a retry with a different row grouping could still duplicate.

Why not Ray Data's own checkpointing (`ray.data.checkpoint`): it records ids in separate checkpoint
files next to the data files, needs a cluster-shared checkpoint path, and leaves a window between a
data file and its checkpoint record where a crash either duplicates or loses rows unless its two-phase
mode is paired with a datasink that cleans orphans; keeping the data file itself as the record has no
such window and needs nothing but the output folder.

Files: `part-<digest>.parquet` (data), `_job.json` (what produced the folder, written first),
`_run.json` (the summary of the last run, written last), `_tmp/` (in-flight shards; what a killed run
left there is removed when the next run starts), `_lease.json` (the job that holds the folder now:
one job per output folder at a time, see `ovis_batch.lease`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ovis_batch.errors import UsageError
from ovis_batch.lease import Lease
from ovis_batch.storage import Location, StorageError, location

METADATA_KEY = b"ovis_batch"
JOB_FILE = "_job.json"
RUN_FILE = "_run.json"
TMP_DIR = "_tmp"
LEASE_FILE = "_lease.json"
SHARD_PREFIX = "part-"


class OutputError(UsageError, RuntimeError):
    """An output folder that cannot be used as asked; the message says why and what to do."""


def output_schema(
    id_column: str, id_type: pa.DataType, embedding_dim: int | None, passthrough: list[pa.Field]
) -> pa.Schema:
    """The output contract (ARCHITECTURE.md): the manifest's id column first, pass-through columns last."""
    fields = [
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("reasoning", pa.string()),
        pa.field("thinking_truncated", pa.bool_()),
        pa.field("finish_reason", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("input_width", pa.int32()),
        pa.field("input_height", pa.int32()),
        pa.field("visual_tokens", pa.int32()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("output_tokens", pa.int32()),
        pa.field("reasoning_tokens", pa.int32()),
    ]
    if embedding_dim:
        fields.append(pa.field("embedding", pa.list_(pa.float32(), embedding_dim)))
    return pa.schema([pa.field(id_column, id_type, nullable=False), *fields, *passthrough])


@dataclass(frozen=True)
class OutputFolder:
    """A local folder or URI (s3://, gs://, ...), opened through `ovis_batch.storage`."""

    location: Location

    @classmethod
    def open(cls, uri: str | os.PathLike | Location) -> OutputFolder:
        """The folder at a local path or URI (nothing is created yet)."""
        return cls(location(uri))

    @property
    def uri(self) -> str:
        """The folder's URI (an absolute path for local folders)."""
        return self.location.uri

    @property
    def fs(self) -> pafs.FileSystem:
        """The filesystem shard paths are opened with."""
        return self.location.fs

    def file(self, *parts: str) -> Location:
        """A file (or folder) inside the output folder."""
        return self.location.join(*parts)

    def prepare(self) -> None:
        """Create the folder and prove that it is writable (a probe write) before any work starts."""
        try:
            self.location.check_writable("output folder")
            self.file(TMP_DIR).make_dirs()
        except StorageError as exc:
            raise OutputError(str(exc)) from exc

    def remove_temporaries(self) -> int:
        """Delete what an interrupted run left in `_tmp/` (only while holding the folder's lease: another
        job's in-flight shards live there too)."""
        stale = self.file(TMP_DIR).files(recursive=True)
        for path in stale:
            path.delete()
        return len(stale)

    @contextlib.contextmanager
    def hold(
        self, *, timeout_s: float, wait: bool = False, notify: Callable[[str], None] | None = None
    ) -> Iterator[Lease]:
        """One job per output folder: check that it is writable, take its lease (`ovis_batch.lease`; renewed
        while held), remove what an interrupted run left in `_tmp/`; release the lease at the end."""
        self.prepare()
        lease = Lease(
            self.file(LEASE_FILE),
            what="caption job",
            timeout_s=timeout_s,
            wait=wait,
            busy_hint="wait for it to finish, or pass --wait-for-lease to wait for it",
            notify=notify,
        )
        with lease:
            self.remove_temporaries()
            yield lease

    def shard_paths(self) -> list[str]:
        try:
            files = self.location.files()
        except StorageError as exc:
            raise OutputError(f"cannot list output folder {self.uri}: {exc}") from exc
        return [f.path for f in files if f.name.startswith(SHARD_PREFIX) and f.name.endswith(".parquet")]

    def read_json(self, name: str) -> dict | None:
        try:
            return json.loads(self.file(name).read_bytes())
        except FileNotFoundError:
            return None

    def write_json(self, name: str, data: dict) -> None:
        """Atomic on local disks (temporary name, then rename) and on object stores (one PUT)."""
        payload = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
        self.file(name).write_bytes(payload, staging=self.file(TMP_DIR))

    def clear(self) -> None:
        """`--overwrite`: remove our files (shards, job and run records, temporaries); nothing else."""
        for path in self.shard_paths():
            self.location.at(path).delete()
        for name in (JOB_FILE, RUN_FILE):
            self.file(name).delete()
        self.remove_temporaries()


def shard_name(ids: list[str]) -> str:
    """Deterministic in the set of ids, so a retried task overwrites its own shard instead of adding one."""
    digest = hashlib.blake2b(digest_size=16)
    for value in sorted(ids):
        digest.update(value.encode("utf-8", "surrogatepass") + b"\0")
    return f"{SHARD_PREFIX}{digest.hexdigest()}.parquet"


def write_shard(folder: OutputFolder, table: pa.Table, id_column: str, metadata: dict[str, Any]) -> str:
    """Write one shard atomically; returns its final path."""
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(metadata, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(meta)
    name = shard_name([str(v) for v in table.column(id_column).to_pylist()])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    target = folder.file(name)
    target.write_bytes(sink.getvalue().to_pybytes(), staging=folder.file(TMP_DIR))
    return target.path


def iter_committed(folder: OutputFolder, columns: list[str]) -> Iterator[tuple[str, pa.Table]]:
    """(shard path, table of the given columns) for every visible shard; unreadable shards raise by name."""
    for path in folder.shard_paths():
        try:
            yield path, pq.read_table(path, columns=columns, filesystem=folder.fs)
        except Exception as exc:
            raise OutputError(
                f"shard {path} cannot be read ({exc}); it was not written by ovis-batch's atomic writer. "
                "Move it away or rerun with --overwrite"
            ) from exc


def id_hashes(ids: pa.Array | pa.ChunkedArray | list) -> np.ndarray:
    """128-bit hashes of ids as a structured `[n, 2]` uint64 array (collisions are negligible at 1e9 rows)."""
    import pandas as pd

    values = ids.to_pylist() if isinstance(ids, pa.Array | pa.ChunkedArray) else list(ids)
    values = np.array([str(v) for v in values], dtype=object)
    a = pd.util.hash_array(values, hash_key="ovis-batch-ids-1")
    b = pd.util.hash_array(values, hash_key="ovis-batch-ids-2")
    return np.stack([a, b], axis=1)


def as_keys(hashes: np.ndarray) -> np.ndarray:
    """Hash pairs viewed as one sortable/searchable complex-free key (a void view of 16 bytes)."""
    return np.ascontiguousarray(hashes).view(np.dtype((np.void, 16))).ravel()


class IdSet:
    """A compact set of ids (16 bytes each) for membership tests in workers; built from hash pairs."""

    def __init__(self, hashes: np.ndarray) -> None:
        self.keys = np.unique(as_keys(hashes)) if len(hashes) else np.zeros(0, np.dtype((np.void, 16)))

    def __len__(self) -> int:
        return len(self.keys)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        if not len(self.keys):
            return np.zeros(len(hashes), dtype=bool)
        keys = as_keys(hashes)
        pos = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        return self.keys[pos] == keys


def committed_ids(folder: OutputFolder, id_column: str) -> np.ndarray:
    """Hash pairs of every committed id (streamed shard by shard: ids only)."""
    parts = [id_hashes(table.column(id_column)) for _, table in iter_committed(folder, [id_column])]
    return np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64)


def repair_duplicates(folder: OutputFolder, id_column: str) -> int:
    """Rewrite shards so that each id appears once (first shard in name order wins); returns rows dropped.

    Duplicates cannot come from resume (committed ids are skipped) nor from a retry of the same task
    (same shard name); this is the safety net for a retry that regrouped rows differently. One read of
    the id columns and one sort find them; only shards that hold a duplicate are rewritten.
    """
    shards = [
        (path, id_hashes(table.column(id_column))) for path, table in iter_committed(folder, [id_column])
    ]
    if not shards:
        return 0
    keys = as_keys(np.concatenate([hashes for _, hashes in shards]))
    order = np.argsort(keys, kind="stable")  # equal ids keep shard-name order: the first one stays
    ordered = keys[order]
    repeated = np.zeros(len(keys), dtype=bool)
    repeated[order[1:][ordered[1:] == ordered[:-1]]] = True
    dropped, start = 0, 0
    for path, hashes in shards:
        duplicate = repeated[start : start + len(hashes)]
        start += len(hashes)
        if not duplicate.any():
            continue
        full = pq.read_table(path, filesystem=folder.fs)
        keep = full.filter(pa.array(~duplicate))
        dropped += int(duplicate.sum())
        if keep.num_rows:
            write_shard(folder, keep, id_column, json.loads(full.schema.metadata[METADATA_KEY]))
        folder.location.at(path).delete()
    return dropped
