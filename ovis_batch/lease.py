"""One writer per folder at a time: a lease file that works the same on local disks and object stores.

    with Lease(location("s3://bucket/out").join("_lease.json"), what="caption job", timeout_s=120):
        ...  # renewed by a background thread; released (deleted) at the end

Object stores offer no lock and pyarrow no exclusive create, so the lease is a record with a unique
token, written whole and read back:
1. read the lease file: held by another token and not expired -> `LeaseHeldError` naming the holder
   (host, pid, start) and when its lease expires; with `wait`, poll until it is free instead;
2. write our record (one PUT, or a rename on a local disk);
3. wait `settle_s` and read it back: our token -> the lease is ours; another token -> a competitor that
   read the free lease at the same time wrote after us, and holds it. `settle_s` (1 s) must exceed the
   time a competitor needs between its read (1.) and its write (2.): a fraction of a second.
On a local disk, steps 1-2 run under a flock of the folder, so two takers cannot interleave at all.
While held, a thread rewrites the record every `timeout_s / 3` with a later expiry. A holder that dies
stops renewing and its lease expires `timeout_s` after the last renewal, so a crashed job blocks the
next one for at most that long; a holder on this very machine (same host name, same process
namespace) that no longer runs (its pid is gone, or belongs to a process started at another time) is
known to be dead at once, and its lease is taken over without waiting. A renewal that finds another
token (renewals failed for longer than `timeout_s` and another job took over) marks the lease lost: `ensure_held` raises before the holder
writes its final records. Expiry times are the holder's clock (UTC): hosts that share a folder must
keep their clocks within seconds of each other (NTP).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from ovis_batch.errors import UsageError
from ovis_batch.storage import Location, storage_errors

log = logging.getLogger(__name__)


class LeaseError(UsageError):
    """The lease of a folder is held by another job, or was lost while this one ran."""


class LeaseHeldError(LeaseError):
    """Another job holds the lease; the message names it and when its lease expires."""


def _this_process() -> dict[str, Any]:
    """Who holds a lease: host, pid, and what tells this process from a later one with the same pid."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_namespace": _pid_namespace(),
        "process_started": _process_start(os.getpid()),
    }


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")  # containers on one host have their own pid numbers
    except OSError:
        return ""


def _process_start(pid: int) -> float | None:
    try:
        import psutil  # a dependency of Ray

        return psutil.Process(pid).create_time()
    except ImportError:
        return None
    except Exception:  # NoSuchProcess, AccessDenied: no process we can see
        return -1.0


def holder_is_gone(record: dict[str, Any]) -> bool:
    """The holder ran on this machine, in this pid namespace, and no longer runs."""
    me = _this_process()
    if not me["pid_namespace"] or (record.get("host"), record.get("pid_namespace")) != (
        me["host"],
        me["pid_namespace"],
    ):
        return False  # another machine or container: only the expiry tells
    started, recorded = _process_start(int(record.get("pid", -1))), record.get("process_started")
    if started == -1.0:
        return True
    # The same pid started at another time is another process (pids are reused).
    return started is not None and isinstance(recorded, float) and abs(started - recorded) > 1.0


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def describe_holder(record: dict[str, Any], now: float | None = None) -> str:
    """`host H, pid P, started T; its lease expires at E (in N s)` for messages."""
    now = time.time() if now is None else now
    expires = float(record.get("expires_at", 0))
    return (
        f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, started {record.get('started', '?')}; "
        f"its lease expires at {_iso(expires)} (in {max(0, round(expires - now))} s) unless it is renewed"
    )


class Lease:
    """A lease on `file` (a Location) held by this process while the context is open."""

    def __init__(
        self,
        file: Location,
        *,
        what: str,
        timeout_s: float,
        subject: Location | None = None,
        wait: bool = False,
        busy_hint: str = "wait for it to finish",
        settle_s: float | None = None,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.file, self.what, self.timeout_s, self.wait = file, what, float(timeout_s), wait
        self.subject = subject or file.parent  # what the lease keeps for one writer, for messages
        self.busy_hint = busy_hint
        default_settle = 0.0 if file.is_local else min(1.0, self.timeout_s / 10)  # see `_exclusive`
        self.settle_s = settle_s if settle_s is not None else default_settle
        self.notify = notify
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.expires_at = 0.0
        self.lost: str | None = None  # why the lease was lost, once it is
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------- the record

    def _read(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.file.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: nobody can prove they hold it
            return None
        return record if isinstance(record, dict) else None

    def _write(self) -> None:
        now = time.time()
        self.expires_at = now + self.timeout_s
        record = {
            "token": self.token,
            "what": self.what,
            **_this_process(),
            "started": _iso(self.started),
            "renewed": _iso(now),
            "expires": _iso(self.expires_at),
            "expires_at": self.expires_at,
            "timeout_s": self.timeout_s,
        }
        self.file.write_bytes(json.dumps(record, indent=2).encode())

    def _busy(self, record: dict[str, Any]) -> bool:
        if record.get("token") == self.token or float(record.get("expires_at", 0)) <= time.time():
            return False
        return not holder_is_gone(record)

    # ------------------------------------------------------------------------------- holding

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeldError (with `wait`: poll until it is free)."""
        announced = False
        while True:
            with storage_errors(self.file, "write the lease file"), self._exclusive():
                current = self._read()
                if current is None or not self._busy(current):
                    if current is not None:
                        log.warning(
                            "taking over the lease of %s from a job that ended: %s", self.subject, current
                        )
                    self.started = time.time()
                    self._write()
                    time.sleep(self.settle_s)
                    current = self._read()
                    if current is not None and current.get("token") == self.token:
                        return
            if current is None:  # the competitor that wrote after us has already released it
                continue
            message = f"{self.subject} is in use by another {self.what}: {describe_holder(current)}"
            if not self.wait:
                raise LeaseHeldError(f"{message}. {self.busy_hint[0].upper()}{self.busy_hint[1:]}")
            if not announced and self.notify is not None:
                self.notify(f"waiting: {message}")
                announced = True
            remaining = float(current.get("expires_at", 0)) - time.time()
            # Look again when it expires, and meanwhile often enough to notice a release.
            time.sleep(min(max(remaining, 0.0) + 0.1, min(10.0, max(0.5, self.timeout_s / 10))))

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.timeout_s / 3):
            try:
                with self._exclusive():
                    current = self._read()
                    if current is not None and current.get("token") == self.token:
                        self._write()
                        continue
                holder = describe_holder(current) if current else "the lease file was removed"
                self.lost = f"another {current.get('what', 'job') if current else 'job'} took it ({holder})"
                log.error("lost the lease of %s: %s", self.subject, self.lost)
                return
            except Exception as exc:  # a failed renewal is retried; the lease lasts timeout_s meanwhile
                log.warning("could not renew the lease of %s: %s", self.subject, exc)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """On a local disk, no other taker reads or writes the lease file meanwhile (flock on its folder,
        so reading and writing are one step). Object stores have no lock: a write is read back after
        `settle_s` instead."""
        if not self.file.is_local:
            yield
            return
        folder = self.file.parent.local_path()
        os.makedirs(folder, exist_ok=True)
        handle = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        finally:
            os.close(handle)  # releases the lock

    def ensure_held(self) -> None:
        """Raise LeaseError if the lease was lost or has expired (renewals failed for timeout_s)."""
        if self.lost is None and time.time() > self.expires_at:
            self.lost = f"it expired at {_iso(self.expires_at)} (renewals failed)"
        if self.lost is not None:
            raise LeaseError(
                f"the lease of {self.subject} was lost while this {self.what} ran: {self.lost}. Two jobs "
                "may have written the folder; rerun once the other job has finished (the output is resumed)"
            )

    def release(self) -> None:
        """Delete the lease file if it still holds our token."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            current = self._read()
            if current is not None and current.get("token") == self.token:
                self.file.delete()
        except Exception as exc:  # the job's own result matters more; an unreleased lease just expires
            log.warning("could not release the lease of %s: %s", self.subject, exc)

    def __enter__(self) -> Lease:
        self.acquire()
        self._thread = threading.Thread(target=self._renew_loop, name="ovis-batch-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
