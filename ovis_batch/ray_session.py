"""The one place where a process starts, configures and stops Ray, and decides where Ray's own output goes.

A batch command shows only its own lines (a progress line and a summary). Ray's output goes to the log
folder of the Ray session, `<temp dir>/ray/session_*/logs` on the machine running the command, which is
announced in one line at start:
- Ray Data's log records (executor plans, resource reports, its progress): `ray-data/ray-data.log`,
  a file Ray Data writes itself; its progress bars are off (the job draws its own line);
- Ray core's log records in this process (warnings at start-up, ...): `ovis-batch-driver.log`;
- the workers' stdout and stderr: `worker-*.out|err`, where Ray writes them anyway (not streamed here);
- what Ray's C++ core writes straight to this process's stderr: `ovis-batch-driver-stderr.log`.
Errors still reach the terminal. `verbose=True` leaves everything on the terminal, as Ray does by default.

Why the C++ stderr is redirected: on the first actor pool it logs "Actor ... has constructor arguments in
the object store and max_restarts > 0" (an ERROR line, with no logger to configure). Its source is Ray
Data, not our arguments: every actor pool gets Ray Data's own DataContext and map function as object
references, and actors restart by default (ray-project/ray#57733). Turning restarts off would silence
it, at the price of a job that dies with its first lost actor; we keep the restarts and file the line.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import re
import socket
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from ovis_batch.errors import UsageError

DRIVER_LOG = "ovis-batch-driver.log"
DRIVER_STDERR = "ovis-batch-driver-stderr.log"
RAY_LOGGERS = ("ray", "ray.data")  # Ray core's and Ray Data's; neither propagates to the root logger


@contextlib.contextmanager
def ray_session(
    address: str | None,
    *,
    num_cpus: float | None = None,
    verbose: bool = False,
    announce: bool = True,
) -> Iterator[str | None]:
    """Connect to a cluster (`address`) or start a local Ray; shut down only what we started.

    Yields the session's log folder (None through Ray Client). Inside a session a caller already holds,
    nothing is started or changed. `verbose`: Ray's logs, worker output and Ray Data's progress bars on
    the terminal too; `announce`: say where the logs are, on stderr.
    """
    import ray
    import ray.data  # importing it configures the `ray.data` logger, whose console handler is adjusted

    if ray.is_initialized():
        yield ray_log_folder()
        return
    # Locally, logical CPUs may exceed the cores: decode workers and the model replica share them.
    local_cpus = max(os.cpu_count() or 1, int(num_cpus or 0) + 1) if address is None else None
    if address is not None:
        check_cluster_reachable(address)
    with contextlib.ExitStack() as stack:
        buffered = None if verbose else stack.enter_context(_ray_records_off_the_console())
        try:
            ray.init(
                address=address,
                num_cpus=local_cpus,
                include_dashboard=False,
                logging_level="WARNING",
                log_to_driver=verbose,  # worker output stays in the worker-*.out|err files
            )
        except ConnectionError as exc:
            raise ClusterConnectionError(_connection_failure(address, exc)) from exc
        try:
            folder = ray_log_folder()
            if buffered is not None and folder is not None:
                buffered.write_to(Path(folder) / DRIVER_LOG)
                stack.enter_context(_stderr_fd_to(Path(folder) / DRIVER_STDERR))
                # Python warnings, and what Ray's own threads print (error messages relayed from the
                # cluster: "(raylet) ..." lines, task retries, node deaths), go to the driver's log.
                stack.enter_context(_other_output_to(Path(folder) / DRIVER_LOG))
            context = ray.data.DataContext.get_current()
            progress_bars = context.enable_progress_bars
            context.enable_progress_bars = verbose and progress_bars  # RAY_DATA_DISABLE_PROGRESS_BARS holds
            stack.callback(setattr, context, "enable_progress_bars", progress_bars)
        except BaseException:
            ray.shutdown()
            raise
        # Registered last, so it runs first: what shutting down prints still goes to the log folder.
        stack.callback(ray.shutdown)
        if announce and folder is not None:
            hint = "" if verbose else " (shown here with --verbose)"
            print(f"Ray logs: {folder}{hint}", file=sys.stderr, flush=True)
        yield folder


class ClusterConnectionError(UsageError, ConnectionError):
    """No Ray cluster could be joined at the given address; the message says why and what to do."""


def check_cluster_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at a `host:port` or `ray://host:port` address
    (Ray itself retries a dead address for several minutes). `auto` and other forms are left to Ray."""
    found = re.fullmatch(r"(?:ray://)?\[?([^\]\s/]+?)\]?:(\d+)", address.strip())
    if not found:
        return
    host, port = found[1], int(found[2])
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterConnectionError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one there "
            "(`ray start --head`), or pass the head node's address (host:6379, or ray://host:10001 for Ray "
            "Client), or leave --address out to run on this machine"
        ) from exc


def _connection_failure(address: str | None, exc: ConnectionError) -> str:
    message = f"could not join the Ray cluster at {address} ({exc})"
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        message += (
            ". A cluster started with `ray start` uses token authentication (the default since Ray 2.60): "
            "set RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token, RAY_AUTH_TOKEN or the "
            "file RAY_AUTH_TOKEN_PATH names"
        )
    return message + f"; Ray's own messages are in {os.path.join(tempfile.gettempdir(), 'ray')}"


def ray_log_folder() -> str | None:
    """The log folder of the Ray session this process is connected to (None: none, or Ray Client)."""
    import ray

    # No public accessor in Ray 2.x; Ray Data finds its own log folder the same way.
    node = ray._private.worker._global_node
    return os.path.join(node.get_session_dir_path(), "logs") if node is not None else None


class _BufferedRecords:
    """Ray core's log records kept off the console: held in memory until the session's log folder
    exists (Ray logs while it starts), then written to a file there."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        # flushLevel above CRITICAL and no target: nothing leaves the buffer until `write_to`.
        self._buffer = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
        self._file: logging.Handler | None = None
        logger.addHandler(self._buffer)

    def write_to(self, path: Path) -> None:
        """From now on records go to `path`; the ones held so far first."""
        self._file = logging.FileHandler(path, encoding="utf-8")
        self._file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._buffer.setTarget(self._file)
        self._buffer.flush()
        self._logger.removeHandler(self._buffer)
        self._logger.addHandler(self._file)

    def close(self) -> None:
        self._logger.removeHandler(self._buffer)
        if self._file is not None:
            self._logger.removeHandler(self._file)
            self._file.close()


@contextlib.contextmanager
def _ray_records_off_the_console() -> Iterator[_BufferedRecords]:
    """Ray's console handlers show errors only; Ray core's records are buffered for a file."""
    quieted: list[tuple[logging.Handler, int]] = []
    for name in RAY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            # Console handlers only: Ray Data's file handler is not a StreamHandler.
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                quieted.append((handler, handler.level))
                handler.setLevel(logging.ERROR)
    records = _BufferedRecords(logging.getLogger("ray"))
    try:
        yield records
    finally:
        records.close()
        for handler, level in quieted:
            handler.setLevel(level)


OWN_THREADS = ("progress-line", "stall-watchdog")  # the job's threads that write to the console


class _OwnThreadsOnly:
    """A text stream that passes on what the main thread and the job's own threads write, and sends what
    any other thread writes (Ray's relay of cluster messages) to a log file."""

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self._stream, self._log = stream, log

    def _target(self) -> TextIO:
        thread = threading.current_thread()
        own = thread is threading.main_thread() or thread.name in OWN_THREADS
        return self._stream if own else self._log

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._stream.flush()
        self._log.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding...: the console's
        return getattr(self._stream, name)


@contextlib.contextmanager
def _other_output_to(path: Path) -> Iterator[None]:
    """Python warnings and other threads' output on sys.stdout/sys.stderr go to `path` (see above)."""
    with open(path, "a", encoding="utf-8", buffering=1) as log:
        saved = sys.stdout, sys.stderr, warnings.showwarning

        def to_log(message, category, filename, lineno, file=None, line=None) -> None:
            log.write(warnings.formatwarning(message, category, filename, lineno, line))

        sys.stdout, sys.stderr = _OwnThreadsOnly(sys.stdout, log), _OwnThreadsOnly(sys.stderr, log)
        warnings.showwarning = to_log
        try:
            yield
        finally:
            sys.stdout, sys.stderr, warnings.showwarning = saved


@contextlib.contextmanager
def _stderr_fd_to(path: Path) -> Iterator[None]:
    """Point file descriptor 2 at `path`, while Python's `sys.stderr` keeps writing where it did.

    Code in C++ writes to fd 2 directly; Python code writes through `sys.stderr`, which, when it is fd 2
    itself, is given a handle of its own on the original stderr for the duration.
    """
    try:
        python_on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # replaced by an object without a descriptor (tests)
        python_on_fd2 = False
    sys.stderr.flush()
    original = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    replaced = None
    if python_on_fd2:
        replaced = sys.stderr
        sys.stderr = open(  # noqa: SIM115  (closed in the finally below)
            os.dup(original), "w", buffering=1, encoding=replaced.encoding, errors=replaced.errors
        )
    try:
        yield
    finally:
        if replaced is not None:
            sys.stderr.close()
            sys.stderr = replaced
        os.dup2(original, 2)
        os.close(original)
