"""Every location ovis-batch reads or writes, local or on an object store, joined and opened one way.

    from ovis_batch.storage import location
    out = location("s3://bucket/run/out")            # or a local path, file://, gs://, memory://, ...
    out.join("_tmp", "x.json").write_bytes(b"{}")    # one PUT on an object store, rename on a local disk
    image = location("s3://bucket/in/m.parquet").parent.join("imgs/1.jpg")   # relative to a manifest

A `Location` is a filesystem (pyarrow's own for local disks, S3, GCS and HDFS; any other fsspec scheme
wrapped for pyarrow) and a path on it, with the URI it came from. Joining works on the URI's path, so
`s3://bucket/a` joined with `b` stays `s3://bucket/a/b` (never a local `s3:/bucket/a/b`), and `..` never
climbs above a bucket. A local path whose parts look like a URI scheme (`s3:/bucket`, `./gs:/x`) is
refused: it is a URI whose `//` was lost, and writing it would create a local folder named `s3:`.

Writes are whole or nothing: `write_bytes` renames a fsynced temporary on local disks, and is a single
object PUT on object stores (visible only when complete). `check_writable` proves a destination before
any work, and turns the cause into a `StorageError` that says what to do (for S3: the endpoint and
credential environment variables). Object-store endpoints and credentials come from the standard
environment variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`, `AWS_PROFILE`; `GOOGLE_APPLICATION_CREDENTIALS` for GCS); nothing here reads or
prints a secret. What does not live here: what the files mean (output folders, indexes, reports) and the
lease that keeps two jobs apart (`ovis_batch.lease`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from ovis_batch.errors import UsageError

# Schemes pyarrow opens itself; their path is `bucket/key` (or the URI's path for HDFS).
_ARROW_BUCKET_SCHEMES = {"s3", "gs", "gcs"}
_ARROW_HOST_SCHEMES = {"hdfs", "viewfs"}
# A path part such as `s3:` or `memory:`: what is left of `s3://bucket` when the `//` collapses.
_SCHEME_PART = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:$")


class StorageError(UsageError):
    """A location that cannot be opened, read or written; the message names it, the cause and the fix."""


@dataclass(frozen=True)
class Location:
    """A file or folder: `uri` (what people read), `fs` and `path` (what pyarrow opens).

    `prefix` + a path on `fs` + `query` gives the URI of that path, so listings (which return paths)
    map back to URIs; for local paths both are empty and the URI is the absolute path.
    """

    uri: str
    fs: pafs.FileSystem
    path: str
    prefix: str = ""
    query: str = ""

    def __str__(self) -> str:
        return self.uri  # messages name the URI the user wrote

    # ------------------------------------------------------------------------------------ naming

    @property
    def is_local(self) -> bool:
        """On this machine's filesystem (renames are atomic, paths can go to libraries that want files)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        """The last part of the path."""
        return posixpath.basename(self.path.rstrip("/"))

    def at(self, path: str) -> Location:
        """Another path on the same filesystem (a listing's result, Ray's `path` column)."""
        path = path.rstrip("/") or "/"
        return Location(f"{self.prefix}{path}{self.query}", self.fs, path, self.prefix, self.query)

    def join(self, *parts: str) -> Location:
        """A path below (or, with `..`, beside) this one; never above the bucket or the filesystem root."""
        joined = self.path
        for part in parts:
            joined = posixpath.join(joined, str(part))
        root = self._root()
        normal = posixpath.normpath(joined)
        if not (normal == root or normal.startswith(root.rstrip("/") + "/")):
            raise StorageError(f"{'/'.join(parts)!r} leads outside {self.uri}'s {self._root_word()}")
        return self.at(normal)

    @property
    def parent(self) -> Location:
        """The folder above (a bucket's root stays the root)."""
        root = self._root()
        parent = posixpath.dirname(self.path.rstrip("/"))
        return self.at(parent if len(parent) >= len(root) else root)

    def _root(self) -> str:
        if self.is_local or not self.path.strip("/"):
            return "/"
        if self.prefix.endswith("://"):  # bucket/key paths: the bucket is the root
            return self.path.split("/", 1)[0]
        return "/"

    def _root_word(self) -> str:
        return "bucket" if self._root() != "/" else "filesystem root"

    # ------------------------------------------------------------------------------------ reading

    def info(self) -> pafs.FileInfo:
        """pyarrow's FileInfo (type, size, mtime); StorageError when the store cannot be reached."""
        with storage_errors(self, "look up"):
            return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        """A file or a folder is there."""
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        """A file is there."""
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A folder is there (on object stores: some key starts with this path and `/`)."""
        return self.info().type == pafs.FileType.Directory

    def list(self, *, recursive: bool = False) -> list[pafs.FileInfo]:
        """What the folder holds (nothing when it does not exist), sorted by path."""
        with storage_errors(self, "list"):
            infos = self.fs.get_file_info(
                pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True)
            )
        return sorted(infos, key=lambda i: i.path)

    def files(self, *, recursive: bool = False) -> list[Location]:
        """The files of the folder, sorted by path."""
        return [self.at(i.path) for i in self.list(recursive=recursive) if i.type == pafs.FileType.File]

    def parquet_files(self) -> list[Location]:
        """The file itself, or the `.parquet` files under the folder (recursively) in path order; names
        starting with `_` or `.` below the folder are not data (`_tmp/`, `_run.json`, staging folders).
        StorageError when nothing is there or the folder holds no data file."""
        info = self.info()
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{self.uri} does not exist")
        if info.type == pafs.FileType.File:
            return [self]
        found = []
        for entry in self.list(recursive=True):
            relative = entry.path[len(self.path) :].lstrip("/")
            hidden = any(part.startswith(("_", ".")) for part in relative.split("/"))
            if entry.type == pafs.FileType.File and entry.path.endswith(".parquet") and not hidden:
                found.append(self.at(entry.path))
        if not found:
            raise StorageError(
                f"no Parquet data files under {self.uri} (no .parquet files, or only names starting "
                "with '_' or '.', which are not data)"
            )
        return found

    def open_input(self) -> pa.NativeFile:
        """A random-access reader (Parquet footers, images); FileNotFoundError when it does not exist."""
        return self.fs.open_input_file(self.path)

    def read_bytes(self) -> bytes:
        """The whole file; FileNotFoundError when it does not exist (or was deleted while being opened)."""
        try:
            with self.fs.open_input_stream(self.path) as stream:
                return stream.read()
        except OSError as exc:
            # S3 says "RESOURCE_NOT_FOUND during GetObject" (an OSError) for an object deleted between
            # the lookup and the read.
            if (
                isinstance(exc, FileNotFoundError)
                or self.fs.get_file_info(self.path).type != pafs.FileType.NotFound
            ):
                raise
            raise FileNotFoundError(self.uri) from exc

    def read_text(self) -> str:
        """The whole file as UTF-8 text."""
        return self.read_bytes().decode("utf-8")

    def local_path(self) -> str:
        """The path for libraries that open files themselves; only for local locations."""
        if not self.is_local:
            raise StorageError(f"{self.uri} is not a local file; read it through its Location")
        return self.path

    # ------------------------------------------------------------------------------------ writing

    def make_dirs(self) -> None:
        """Create the folder and those above it (object stores: a marker object, harmless)."""
        with storage_errors(self, "create"):
            self.fs.create_dir(self.path, recursive=True)

    def open_output(self) -> pa.NativeFile:
        """A stream that writes the file; on object stores the object appears only when it is closed."""
        return self.fs.open_output_stream(self.path)

    def write_bytes(self, payload: bytes, *, staging: Location | None = None) -> None:
        """Write the whole file atomically: a reader sees the old content or the new, never a part.

        Local disks: a fsynced temporary in `staging` (default: beside the file), then a rename. Object
        stores: one PUT (or multipart upload), which becomes visible whole.
        """
        if not self.is_local:
            with self.open_output() as stream:
                stream.write(payload)
            return
        folder = staging or self.parent
        temporary = folder.join(f".{self.name}.{uuid.uuid4().hex}.tmp").path
        os.makedirs(os.path.dirname(temporary), exist_ok=True)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            with open(temporary, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise

    def sync(self) -> None:
        """Flush a local file to the disk (fsync); object stores hold an object once it is written."""
        if self.is_local:
            with open(self.path, "rb") as handle:
                os.fsync(handle.fileno())

    def write_text(self, text: str, *, staging: Location | None = None) -> None:
        """`write_bytes` of UTF-8 text."""
        self.write_bytes(text.encode("utf-8"), staging=staging)

    def delete(self) -> None:
        """Remove the file; a missing file is not an error."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.path)

    def delete_tree(self) -> None:
        """Remove the folder and everything below it; a missing folder is not an error."""
        if self.info().type == pafs.FileType.Directory:
            with storage_errors(self, "delete"):
                self.fs.delete_dir(self.path)

    def copy_to(self, target: Location) -> None:
        """Copy a file (server-side when both are on one filesystem)."""
        if self.fs.equals(target.fs):
            self.fs.copy_file(self.path, target.path)
        else:
            target.write_bytes(self.read_bytes())

    def check_writable(self, what: str = "destination") -> None:
        """Create the folder and write then delete a probe file; StorageError says why not and what to do."""
        probe = self.join(f".ovis-batch-probe-{uuid.uuid4().hex}")
        try:
            self.fs.create_dir(self.path, recursive=True)
            with self.fs.open_output_stream(probe.path) as stream:
                stream.write(b"ok")
            self.fs.delete_file(probe.path)
        except Exception as exc:
            raise StorageError(f"{what} {self.uri} cannot be written: {describe_error(exc, self)}") from exc


def replace_folder(staging: Location, target: Location, *, marker: str, previous: Location) -> None:
    """Put the complete folder `staging` in place of `target`; `marker` (a file name) marks completeness.

    Local disks: two renames (`target` -> `previous`, `staging` -> `target`), then `previous` is removed;
    a crash between the renames leaves the old folder whole under `previous`. Object stores have no
    folder rename: the marker of `target` is deleted first, every staged file is copied over (server-side),
    the marker last, then `staging` is removed; a crash on the way leaves `target` without its marker
    and `staging` complete. Readers check the marker, so they never take a half-copied folder for whole.
    """
    if target.is_local:
        with storage_errors(target, "replace"):
            if os.path.exists(target.path):
                os.rename(target.path, previous.path)
            try:
                os.rename(staging.path, target.path)
            except OSError:
                if os.path.exists(previous.path):
                    os.rename(previous.path, target.path)
                raise
        previous.delete_tree()
        return
    target.join(marker).delete()
    staged = {f.path[len(staging.path) :].lstrip("/"): f for f in staging.files(recursive=True)}
    for relative in sorted(set(staged) - {marker}):
        staged[relative].copy_to(target.join(relative))
    old = {f.path[len(target.path) :].lstrip("/"): f for f in target.files(recursive=True)}
    for relative in sorted(set(old) - set(staged)):
        old[relative].delete()
    staged[marker].copy_to(target.join(marker))
    staging.delete_tree()


# ---------------------------------------------------------------------------------------- opening


def is_uri(text: str | os.PathLike) -> bool:
    """`scheme://...` (file:// included); anything else is a local path."""
    return "://" in os.fspath(text)


def location(where: str | os.PathLike | Location) -> Location:
    """The Location of a local path or a URI; StorageError for a scheme nothing opens or a lost `//`."""
    if isinstance(where, Location):
        return where
    text = os.fspath(where)
    if not text:
        raise StorageError("an empty path was given where a file or folder is expected")
    if not is_uri(text):
        return _local(text)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    query = f"?{parts.query}" if parts.query else ""
    if scheme == "file":
        return _local(unquote(parts.path) or "/")
    fs, kind = _filesystem(scheme, parts.netloc, parts.query)
    if kind == "arrow-bucket":
        prefix = f"{scheme}://"
        path = (parts.netloc + unquote(parts.path)).rstrip("/") or parts.netloc
    elif kind == "arrow-host":
        prefix = f"{scheme}://{parts.netloc}"
        path = unquote(parts.path).rstrip("/") or "/"
    else:  # fsspec: its own idea of the path; the prefix is what the URI has before it
        bare = text.split("?", 1)[0]
        path = fs.handler.fs._strip_protocol(bare).rstrip("/") or "/"
        prefix = bare[: len(bare) - len(path)] if bare.endswith(path) else f"{scheme}://"
    return Location(f"{prefix}{path}{query}", fs, path, prefix, query)


def local_path(where: str | os.PathLike, what: str, why: str) -> str:
    """The local path of `where` (a path or a file:// URI); another URI is refused with `why`, not read
    as a local path (`Path("s3://b/x")` is the local `s3:/b/x`)."""
    place = location(where)
    if not place.is_local:
        raise StorageError(
            f"{what} {place.uri} must be on a local disk or a shared mount: {why}. Copy it to a local "
            "folder (for S3: aws s3 sync) and pass that path"
        )
    return place.path


def _local(text: str) -> Location:
    suspicious = [part for part in text.split("/") if _SCHEME_PART.match(part)]
    if suspicious:
        scheme = suspicious[0][:-1]
        raise StorageError(
            f"{text!r} is read as a local path with a folder named {suspicious[0]!r}: it looks like "
            f"a URI ({scheme}://...) whose '//' was lost, and nothing is written to such a folder. Write the "
            f"URI in full ({scheme}://bucket/...), or rename the local folder"
        )
    path = os.path.abspath(os.path.expanduser(text))
    return Location(path, pafs.LocalFileSystem(), path)


@functools.lru_cache(maxsize=64)
def _filesystem(scheme: str, netloc: str, query: str) -> tuple[pafs.FileSystem, str]:
    """One filesystem per scheme, bucket (or host) and options, kept for the process: opening an S3
    filesystem looks up the bucket's region, which must not happen once per image."""
    root = f"{scheme}://{netloc}/" + (f"?{query}" if query else "")
    if scheme in _ARROW_BUCKET_SCHEMES | _ARROW_HOST_SCHEMES:
        try:
            fs, _ = pafs.FileSystem.from_uri(root)
        except Exception as exc:
            raise StorageError(
                f"cannot open {scheme}://{netloc}: {describe_error(exc, scheme=scheme)}"
            ) from exc
        return fs, "arrow-bucket" if scheme in _ARROW_BUCKET_SCHEMES else "arrow-host"
    import fsspec

    try:
        fs, _ = fsspec.core.url_to_fs(root)
    except (ImportError, ValueError) as exc:
        raise StorageError(
            f"no filesystem opens {scheme}:// URIs here ({exc}); install the fsspec package for it "
            "(s3fs, gcsfs, adlfs, ...) or use a local path"
        ) from exc
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), "fsspec"


# ---------------------------------------------------------------------------------------- errors

_HINTS = {
    "s3": "check AWS_ENDPOINT_URL (for a server other than AWS), AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), AWS_DEFAULT_REGION, and that the bucket exists",
    "gs": "check GOOGLE_APPLICATION_CREDENTIALS and that the bucket exists",
    "local": "choose a folder this user can write, on a disk with free space",
}
_HINTS["gcs"] = _HINTS["gs"]


def describe_error(exc: BaseException, where: Location | None = None, *, scheme: str | None = None) -> str:
    """`Type: message` of a storage failure, then what to check for this kind of location."""
    if scheme is None and where is not None:
        scheme = "local" if where.is_local else where.prefix.split(":", 1)[0]
    cause = f"{type(exc).__name__}: {exc}".strip().rstrip(".")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"{cause} (the disk is full)"
    hint = _HINTS.get(scheme or "", "check the URI, the credentials and that the location exists")
    return f"{cause}. {hint[0].upper()}{hint[1:]}"


@contextlib.contextmanager
def storage_errors(where: Location, action: str) -> Iterator[None]:
    """Turn a failure to reach or change `where` into a StorageError naming it; FileNotFoundError passes."""
    try:
        yield
    except (FileNotFoundError, StorageError):
        raise
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(f"cannot {action} {where.uri}: {describe_error(exc, where)}") from exc
