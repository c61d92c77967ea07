"""Manifests: finding the Parquet files, checking their columns and ids, before any work starts.

A manifest is a Parquet file, a folder of them (searched recursively; names starting with `_` or `.`
are not data) or a glob, on any filesystem pyarrow opens (local, s3://, gs://, hdfs://) or fsspec
opens, through `ovis_batch.storage`; relative image paths are relative to the manifest file on the same
store (`resolve_image_ref`). The ids are scanned once, streaming, one id column batch at a time, keeping only 16-byte hashes:
duplicate or null ids are an error before work starts (the documented policy; a dataset with two rows
of one id has no exactly-once answer), and `--limit N` becomes the set of the first N ids in file order.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ovis_batch.errors import UsageError
from ovis_batch.pipeline.output import IdSet, as_keys, id_hashes
from ovis_batch.storage import Location, is_uri, location


class ManifestError(UsageError, ValueError):
    """A manifest that cannot be processed; the message names the file or column and what to do."""


@dataclass(frozen=True)
class Manifest:
    uri: str
    location: Location  # the file, folder or glob's base folder; its filesystem holds every file
    files: list[str]  # paths on `location.fs`
    schema: pa.Schema
    rows: int

    @property
    def fs(self) -> pafs.FileSystem:
        return self.location.fs


def _is_data(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith(("_", "."))


def find_files(uri: str) -> tuple[Location, list[str]]:
    """The manifest's root location and its data files (paths on the root's filesystem), sorted."""
    where = location(uri)
    path = where.path
    if any(ch in path for ch in "*?["):
        base = where.at(path[: min(path.find(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0] or "/")
        files = sorted(
            i.path
            for i in base.list(recursive=True)
            if i.type == pafs.FileType.File
            and fnmatch.fnmatch(i.path, path)
            and not i.base_name.startswith(("_", "."))
        )
        where = base
    else:
        info = where.info()
        if info.type == pafs.FileType.NotFound:
            raise ManifestError(f"manifest {uri} does not exist")
        if info.type == pafs.FileType.File:
            files = [path]
        else:
            files = sorted(
                i.path
                for i in where.list(recursive=True)
                if i.type == pafs.FileType.File
                and _is_data(i.base_name)
                and not any(part.startswith(("_", ".")) for part in i.path[len(path) :].split("/")[:-1])
            )
    if not files:
        raise ManifestError(f"manifest {uri} holds no .parquet files")
    return where, files


def open_manifest(uri: str, required: list[str]) -> Manifest:
    """Find the files and check that every one has the required columns with one schema."""
    root, files = find_files(str(uri))
    fs = root.fs
    schema, rows = None, 0
    for path in files:
        try:
            meta = pq.read_metadata(path, filesystem=fs)
        except Exception as exc:
            raise ManifestError(f"manifest file {path} is not a readable Parquet file ({exc})") from exc
        file_schema = meta.schema.to_arrow_schema()
        missing = [c for c in required if c not in file_schema.names]
        if missing:
            raise ManifestError(
                f"manifest file {path} has no column(s) {missing}; it has {file_schema.names}. "
                "Set id_column / image_column / prompt_column / passthrough_columns to match"
            )
        if schema is None:
            schema = file_schema
        rows += meta.num_rows
    return Manifest(str(uri), root, files, schema, rows)


def scan_ids(manifest: Manifest, id_column: str, limit: int | None = None) -> tuple[IdSet | None, int]:
    """Check ids (no nulls, no duplicates); return (allow-list of the first `limit` ids or None, rows)."""
    parts: list[np.ndarray] = []
    seen = 0
    for path in manifest.files:
        with manifest.fs.open_input_file(path) as fh:
            reader = pq.ParquetFile(fh)
            for batch in reader.iter_batches(batch_size=65536, columns=[id_column]):
                ids = batch.column(0)
                if ids.null_count:
                    raise ManifestError(
                        f"manifest file {path}: {ids.null_count} row(s) have a null {id_column!r}"
                    )
                if limit is not None and seen + len(ids) > limit:
                    ids = ids.slice(0, limit - seen)
                parts.append(id_hashes(ids))
                seen += len(ids)
                if limit is not None and seen >= limit:
                    break
        if limit is not None and seen >= limit:
            break
    hashes = np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64)
    keys = np.sort(as_keys(hashes))
    repeated = keys[1:][keys[1:] == keys[:-1]]
    if len(repeated):
        examples = _ids_with_keys(manifest, id_column, set(np.unique(repeated)[:5].tolist()))
        raise ManifestError(
            f"manifest {manifest.uri} has {len(repeated)} duplicate {id_column!r} value(s) "
            f"(e.g. {examples}); ids must be unique so that each row is written exactly once. "
            "Deduplicate the manifest or choose another id column"
        )
    return (IdSet(hashes) if limit is not None else None), seen


def _ids_with_keys(manifest: Manifest, id_column: str, keys: set) -> list:
    found = []
    for path in manifest.files:
        table = pq.read_table(path, columns=[id_column], filesystem=manifest.fs)
        values = table.column(0)
        for value, key in zip(values.to_pylist(), as_keys(id_hashes(values)).tolist(), strict=True):
            if key in keys and value not in found:
                found.append(value)
    return found[:5]


def resolve_image_ref(ref: str, manifest_file: Location) -> Location:
    """Where an image column's value points: a URI as it is, an absolute path on the local disk of the
    worker, a relative path relative to the folder of the manifest file that names it (on its store)."""
    if is_uri(ref) or ref.startswith("/"):
        return location(ref)
    return manifest_file.parent.join(ref)
