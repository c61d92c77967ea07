"""What a fault's one line says, from the exceptions as they really reach the driver: errors raised in
Ray tasks and actors (wrapped by Ray, their errno and file name partly lost on the way), pyarrow's own
object-store errors, Ctrl-C; and the stall watchdog's reports and stop, on a clock of the test's."""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
import time

import pyarrow.fs as pafs
import pytest

from ovis_batch.errors import EXIT_FAULT, EXIT_INTERRUPTED, JobFault
from ovis_batch.faults import describe_fault, faults_in_one_line, job_fault
from ovis_batch.model.checkpoint import CheckpointError
from ovis_batch.pipeline.resources import ResourcePlanError
from ovis_batch.pipeline.watchdog import STALL_SIGNAL, JobStalled, StallWatchdog, what_ray_waits_for


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def raised_in_a_task(ray, error: BaseException) -> BaseException:
    @ray.remote
    def write_shard_batch():
        raise error

    with pytest.raises(Exception) as caught:
        ray.get(write_shard_batch.remote())
    return caught.value


def test_errors_raised_in_ray_tasks_are_named_with_the_task_and_node(ray_local):
    full = raised_in_a_task(
        ray_local, OSError(errno.ENOSPC, "No space left on device", "/data/out/_tmp/part-1")
    )
    fault = describe_fault(full)
    assert fault.what == "the disk is full (no space left on device: /data/out/_tmp/part-1)"
    assert fault.where is not None and fault.where.startswith("in Ray task write_shard_batch on node ")
    denied = raised_in_a_task(ray_local, PermissionError(errno.EACCES, "Permission denied", "/data/out"))
    assert describe_fault(denied).what == "permission denied: /data/out"
    read_only = raised_in_a_task(ray_local, OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"))
    assert describe_fault(read_only).what == "read-only file system: /mnt/ro/x"


def test_an_actor_whose_constructor_raises_is_named_by_that_error(ray_local):
    @ray_local.remote
    class CaptionPredictor:
        def __init__(self):
            raise CheckpointError("/models/x/model.safetensors could not be read (EIO); re-download it")

        def ready(self):
            return True

    with pytest.raises(Exception) as caught:
        ray_local.get(CaptionPredictor.remote().ready.remote())
    fault = describe_fault(caught.value)
    assert fault.what == "/models/x/model.safetensors could not be read (EIO); re-download it"
    assert fault.where.startswith("in Ray task CaptionPredictor on node ")


def test_object_store_errors_from_pyarrow_are_worded_for_the_user():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = pafs.S3FileSystem(
        endpoint_override=f"http://127.0.0.1:{port}",
        access_key="key",
        secret_key="secret",
        region="us-east-1",
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    with pytest.raises(OSError) as caught:
        store.get_file_info("bucket/out/_job.json")
    fault = describe_fault(caught.value)
    assert fault.what.startswith("the object store is unreachable (When getting information for key ")
    assert "Could not connect to server" in fault.what
    # The messages pyarrow's S3 client gives a refused request and a missing bucket (AWS error names).
    denied = OSError(
        "When writing key 'out/x' in bucket 'b': AWS Error ACCESS_DENIED during PutObject operation"
    )
    assert describe_fault(denied).what.startswith("the object store denied access (When writing key")
    missing = OSError("Bucket 'b' not found: AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation")
    assert describe_fault(missing).what.startswith("the bucket does not exist (Bucket 'b' not found")


def test_the_fault_line_says_how_far_the_job_got_and_keeps_the_traceback(tmp_path):
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as exc:
        fault = job_fault(exc, progress_note="3/8 rows committed in out", log_folder=str(tmp_path))
    assert fault.exit_code == EXIT_INTERRUPTED
    log = next(tmp_path.glob("ovis-batch-traceback-*.log"))
    assert str(fault) == (
        f"interrupted (Ctrl-C); 3/8 rows committed in out; rerun the same command to resume (traceback: {log})"
    )
    assert "KeyboardInterrupt" in log.read_text()


def test_refusals_raised_before_work_stay_refusals_and_faults_become_one_line(tmp_path):
    with pytest.raises(ResourcePlanError), faults_in_one_line(lambda: "0/8 rows committed", str(tmp_path)):
        raise ResourcePlanError("the job's actors do not fit")
    with (
        pytest.raises(JobFault) as caught,
        faults_in_one_line(lambda: "5/8 rows committed in out", str(tmp_path)),
    ):
        raise JobStalled("no row committed for 1:00:00 (stall_timeout_s=3600); Ray was waiting for: nothing")
    assert caught.value.exit_code == EXIT_FAULT
    assert str(caught.value).startswith(
        "no row committed for 1:00:00 (stall_timeout_s=3600); Ray was waiting for: nothing; "
        "5/8 rows committed in out; rerun the same command to resume (traceback: "
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_watchdog_reports_a_stall_every_period_and_stops_past_the_limit():
    clock, notes = Clock(), []
    watchdog = StallWatchdog(
        report_s=60,
        timeout_s=150,
        note=notes.append,
        diagnose=lambda: "1 x {CPU: 1} for tasks/actors",
        clock=clock,
    )
    for now, stop in [(30, False), (61, False), (100, False), (121, False), (149, False)]:
        clock.now = now
        assert watchdog.check() is stop
    assert notes == [
        "stalled: no row committed for 1:01; Ray is waiting for: 1 x {CPU: 1} for tasks/actors",
        "stalled: no row committed for 2:01; Ray is waiting for: 1 x {CPU: 1} for tasks/actors",
    ]
    watchdog.committed()  # a shard: the clocks start again
    clock.now = 149 + 149
    assert watchdog.check() is False
    clock.now = 149 + 150
    assert watchdog.check() is True
    assert watchdog.stalled == (
        "no row committed for 2:30 (stall_timeout_s=150); Ray was waiting for: 1 x {CPU: 1} for tasks/actors"
    )


@pytest.mark.parametrize("sigint", ["as in a terminal", "ignored, as in a job started with &"])
def test_a_stalled_job_is_interrupted_and_leaves_with_job_stalled(sigint):
    watchdog = StallWatchdog(report_s=0.2, timeout_s=0.5, note=lambda text: None, diagnose=lambda: "nothing")
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(STALL_SIGNAL)
    if sigint.startswith("ignored"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(JobStalled, match=r"stall_timeout_s=0.5"), watchdog.watching(poll_s=0.05):
            deadline = time.monotonic() + 30
            while (
                time.monotonic() < deadline
            ):  # a job in Ray's wait, which polls, for a result that never comes
                time.sleep(0.05)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(STALL_SIGNAL)) == (
            signal.SIG_IGN if sigint.startswith("ignored") else saved[0],
            saved[1],
        )
    finally:
        signal.signal(signal.SIGINT, saved[0])


def test_the_watchdogs_signal_from_outside_is_no_stall():
    watchdog = StallWatchdog(report_s=60, timeout_s=120, note=lambda text: None, diagnose=lambda: "nothing")
    with watchdog.watching(poll_s=0.05):
        os.kill(os.getpid(), STALL_SIGNAL)
        time.sleep(0.2)  # the handler has run by now, and let the job go on
    assert watchdog.stalled is None


def test_outside_the_main_thread_the_watchdog_only_reports():
    notes, errors = [], []

    def job() -> None:
        watchdog = StallWatchdog(report_s=0.1, timeout_s=0.2, note=notes.append, diagnose=lambda: "nothing")
        try:
            with watchdog.watching(poll_s=0.05):
                time.sleep(0.6)
        except BaseException as exc:  # pragma: no cover - the failure this test looks for
            errors.append(exc)

    thread = threading.Thread(target=job)
    thread.start()
    thread.join()
    assert errors == [] and notes  # it reported, and interrupted nobody


def test_what_ray_waits_for_names_a_demand_no_node_can_take(ray_local):
    @ray_local.remote(num_cpus=64)
    def too_big():
        return 1

    pending = too_big.remote()
    deadline = time.monotonic() + 60
    while "64" not in (said := what_ray_waits_for()):
        assert time.monotonic() < deadline, said
        time.sleep(1)
    assert "1 x {CPU: 64} for tasks/actors" in said
    ray_local.cancel(pending, force=True)
