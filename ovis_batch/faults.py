"""Faults during a run, told in one line: what failed, where, how far the job got, and what to do.

A job that stops part-way (a full disk, a denied or unreachable object store, a model folder a node cannot
read, a lost cluster, Ctrl-C) ends with one `JobFault`: the command line prints its message alone and exits
with its code, and the traceback goes to a file in the log folder (`--verbose` prints it too). Rows are
committed shard by shard, so the line always says how many are safe and that a rerun resumes.

`describe_fault` finds the root cause of an exception as it reaches the driver: Ray wraps a task's error
in a `RayTaskError` whose `cause` is the original (the caption job asks Ray Data to raise the original
exception, not its generic "UDF failed" wrapper). Nothing here imports Ray: its exceptions are read by
their attributes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ovis_batch.errors import EXIT_FAULT, EXIT_INTERRUPTED, JobFault, RunFailure, UsageError

TRACEBACK_PREFIX = "ovis-batch-traceback"

# pyarrow's S3 errors are OSErrors whose message carries the AWS error name; fsspec's carry botocore's.
_DENIED = re.compile(r"ACCESS_DENIED|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|Forbidden|\b403\b")
_UNREACHABLE = re.compile(
    r"NETWORK_CONNECTION|curlCode: \d+|Couldn't connect|Could not connect|Connection refused|"
    r"Could not resolve host|EndpointConnectionError|Unable to connect"
)
_NO_BUCKET = re.compile(r"NoSuchBucket|NO_SUCH_BUCKET|bucket does not exist", re.IGNORECASE)


@dataclass(frozen=True)
class Fault:
    """The root cause of a failed run, in words: `what` happened, `where` (a file, a task, a node)."""

    what: str
    where: str | None = None

    def __str__(self) -> str:
        return f"{self.what} ({self.where})" if self.where else self.what


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception behind it: Ray's `cause`, then `__cause__` / `__context__`."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        context = None if current.__suppress_context__ else current.__context__  # `raise ... from None`
        following = (getattr(current, "cause", None), current.__cause__, context)
        pending += [c for c in following if isinstance(c, BaseException)]


_RAY_HEADER = re.compile(r"ray::(?P<call>\S+)\s*\(pid=\d+, ip=(?P<ip>[^,)\s]+)")


def _ray_location(exc: BaseException) -> str | None:
    """'in Ray task write_shard_batch on node 10.0.0.3' for an error raised in a Ray task or actor.

    The exception Ray raises in the driver names them only in its message header:
    `ray::MapBatches(write_shard_batch)() (pid=..., ip=...)`, or for an actor
    `ray::MapWorker(MapBatches(CaptionPredictor)).__init__() (pid=..., ip=..., actor_id=...)`; the
    innermost name is ours.
    """
    for current in causes(exc):
        found = _RAY_HEADER.search(re.sub(r"\x1b\[[0-9;]*m", "", str(current)))
        if found:
            inner = re.findall(r"\((\w+)\)", found["call"]) or re.findall(r"\w+", found["call"])[:1]
            return f"in Ray task {inner[-1]} on node {found['ip']}"
    return None


def _path_of(exc: OSError) -> str | None:
    """The file an OSError names. Ray Data appends its retry note to an exception's args, which an OSError
    rebuilt from them reads as its filename: such a "filename" is not a path."""
    name = exc.filename
    return name if isinstance(name, str) and "\n" not in name and not name.startswith("Failed to ") else None


def describe_fault(exc: BaseException) -> Fault:
    """The most specific known cause of `exc`, worded for the person who runs the job."""
    chain = list(causes(exc))
    # Ray's wrappers (RayTaskError(OSError) and the like) pose as their cause's type without its errno or
    # file name: read the originals.
    originals = [c for c in chain if not type(c).__module__.startswith("ray.")]
    location = _ray_location(exc)
    for current in originals:
        if isinstance(current, KeyboardInterrupt):
            return Fault("interrupted (Ctrl-C)")
        if not isinstance(current, OSError):
            continue
        path = _path_of(current)
        on = f": {path}" if path else ""
        if current.errno == errno.ENOSPC:
            return Fault(f"the disk is full (no space left on device{on})", location)
        if current.errno == errno.EDQUOT:
            return Fault(f"the disk quota is exhausted{on}", location)
        if current.errno == errno.EROFS:
            return Fault(f"read-only file system{on}", location)
        if isinstance(current, PermissionError) or current.errno in (errno.EACCES, errno.EPERM):
            return Fault(f"permission denied{on}", location)
    for current in chain:
        text = str(current)
        if isinstance(current, OSError | UsageError) and _DENIED.search(text):
            return Fault(f"the object store denied access ({_first_line(text)})", location)
        if isinstance(current, OSError | UsageError) and _UNREACHABLE.search(text):
            return Fault(f"the object store is unreachable ({_first_line(text)})", location)
        if isinstance(current, OSError | UsageError) and _NO_BUCKET.search(text):
            return Fault(f"the bucket does not exist ({_first_line(text)})", location)
    for current in originals:
        # A cause we named ourselves: its message says what happened and what to do.
        if isinstance(current, RunFailure | UsageError):
            return Fault(_first_line(str(current)), location)
    for current in chain:
        if type(current).__name__ in ("ActorDiedError", "ActorUnavailableError"):
            raised = _creation_error(str(current))
            if raised is not None:  # the actor's __init__ raised: that error is the cause
                return Fault(raised, location)
        if type(current).__name__ in (
            "ActorDiedError",
            "ActorUnavailableError",
            "NodeDiedError",
            "OwnerDiedError",
        ):
            return Fault(
                f"a Ray worker died and could not be replaced ({_first_line(str(current))})", location
            )
    # Otherwise the first exception that is not one of Ray's wrappers: the original error of a task.
    root = originals[0] if originals else exc
    return Fault(f"{type(root).__name__}: {_first_line(str(root))}", location)


_RAISED = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception)): (?P<message>.+)$", re.MULTILINE)


def _creation_error(text: str) -> str | None:
    """The error an actor's constructor raised, from the message Ray gives its ActorDiedError (the
    remote traceback as text): our own errors by their message, others with their type."""
    if "creation task" not in text:
        return None
    raised = [m for m in _RAISED.finditer(text) if not m["type"].startswith("ray.")]
    if not raised:
        return None
    last = raised[-1]
    ours = last["type"].startswith("ovis_batch.")
    message = last["message"].strip()
    return message if ours else f"{last['type'].rsplit('.', 1)[-1]}: {message}"


def _first_line(text: str, limit: int = 300) -> str:
    """The first meaningful line of a message (Ray prefixes its own headers and colour codes)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith(("ray::", "Traceback", "File "))
    ]
    line = lines[0] if lines else text.strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def write_traceback(exc: BaseException, folder: str | None) -> str:
    """Write the full traceback (every chained exception, Ray's remote ones included) to a file in
    `folder` (a new folder under the temporary directory when None); returns the file's path."""
    if folder is None or not os.path.isdir(folder):
        folder = os.path.join(tempfile.gettempdir(), "ovis-batch-logs")
        os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{TRACEBACK_PREFIX}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("".join(traceback.format_exception(exc)))
        for current in causes(exc):
            remote = getattr(current, "traceback_str", None)
            if remote:
                fh.write(f"\n---- remote traceback ({type(current).__name__})\n{remote}\n")
    return path


def job_fault(
    exc: BaseException,
    *,
    progress_note: str,
    log_folder: str | None,
    action: str = "rerun the same command to resume",
) -> JobFault:
    """The one-line `JobFault` for `exc` raised while a job ran; `progress_note` says how far it got
    ("12/40 rows committed in out/"). The traceback is written to `log_folder`."""
    fault = describe_fault(exc)
    log = write_traceback(exc, log_folder)
    interrupted = any(isinstance(c, KeyboardInterrupt) for c in causes(exc))
    message = f"{fault}; {progress_note}; {action} (traceback: {log})"
    return JobFault(message, EXIT_INTERRUPTED if interrupted else EXIT_FAULT, traceback_file=log)


@contextlib.contextmanager
def faults_in_one_line(progress_note: Callable[[], str], log_folder: str | None) -> Iterator[None]:
    """Around the part of a job that does the work: any failure (Ctrl-C included) leaves as one
    `JobFault` whose line ends with `progress_note()` ("12/40 rows committed in out/").

    A `UsageError` raised here in this process (a refusal such as a resource plan that cannot fit) stays
    as it is: nothing was done. One raised in a Ray task arrives wrapped, and is a fault like any other.
    """
    try:
        yield
    except JobFault:
        raise
    except UsageError as exc:
        if getattr(exc, "cause", None) is None and getattr(exc, "traceback_str", None) is None:
            raise
        raise job_fault(exc, progress_note=progress_note(), log_folder=log_folder) from exc
    except (Exception, KeyboardInterrupt) as exc:
        raise job_fault(exc, progress_note=progress_note(), log_folder=log_folder) from exc
