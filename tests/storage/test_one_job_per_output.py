"""One caption job per output folder, on the bucket and on a local disk: a second job stops at once naming
the first; `kill -9` of the first then a rerun leaves every id exactly once and no `_tmp/` leftovers; a
lease that outlives its job is taken over (at once when its process is known to be dead on this machine,
at its expiry otherwise, which `--wait-for-lease` waits for)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from caption_cli import caption_command, committed_ids, wait_for_committed
from PIL import Image

from ovis_batch.lease import LeaseHeldError
from ovis_batch.storage import Location, location
from workflows.caption import run_caption

# ~1024 visual tokens and 48 new tokens per row: slow enough on the tiny model to be killed midway.
SLOW = [
    "min_pixels=1048576",
    "max_pixels=1048576",
    "max_new_tokens=48",
    "rows_per_shard=2",
    "batch_rows=2",
    "decode_batch_rows=2",
    "decode_workers=1",
]
FAST = ["min_pixels=4096", "max_pixels=16384", "max_new_tokens=4", "decode_workers=1"]


def write_manifest(root: Location, photos, rows: int) -> str:
    for i in range(rows):
        buffer = io.BytesIO()
        Image.fromarray(list(photos.values())[i % 3][i * 7 :, i * 5 :]).save(buffer, "JPEG", quality=85)
        root.join(f"imgs/{i}.jpg").write_bytes(buffer.getvalue())
    sink = pa.BufferOutputStream()
    pq.write_table(
        pa.table(
            {
                "image_id": [f"row-{i:02d}" for i in range(rows)],
                "image": [f"imgs/{i}.jpg" for i in range(rows)],
            }
        ),
        sink,
    )
    root.join("manifest.parquet").write_bytes(sink.getvalue().to_pybytes())
    return root.join("manifest.parquet").uri


def start(command: list[str]) -> subprocess.Popen:
    # A session of its own, so that the kill below reaches the driver and every Ray process it started.
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    return subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def kill_job(job: subprocess.Popen) -> None:
    """SIGKILL the driver and all it started at once: a machine lost mid-run."""
    import psutil  # a dependency of Ray

    family = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(family, timeout=30)
    job.wait()


def wait_for(condition, job: subprocess.Popen, what: str, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert job.poll() is None, f"the first job ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.2)


def held_by(output: Location, job: subprocess.Popen) -> str:
    """The start of the message that names `job` as the holder (no regex characters in it but dots)."""
    return (
        f"{output.uri} is in use by another caption job: host {socket.gethostname()}, pid {job.pid}, started "
    )


def test_on_the_bucket_a_second_job_stops_and_a_killed_one_is_resumed_exactly_once(
    bucket, tiny_checkpoint, photos, capsys
):
    root = location(bucket).join("one-job")
    rows = 10
    manifest, output = write_manifest(root, photos, rows), root.join("out")
    first = start(caption_command(manifest, output.uri, tiny_checkpoint, *SLOW, "lease_timeout_s=6"))
    try:
        wait_for_committed(first, output, 2)
        started = time.monotonic()
        with pytest.raises(LeaseHeldError, match=held_by(output, first) + r".*or pass --wait-for-lease"):
            run_caption(manifest, output.uri, str(tiny_checkpoint), overrides=SLOW, quiet=True)
        assert time.monotonic() - started < 15  # refused before any work
    finally:
        kill_job(first)
    before = committed_ids(output)
    assert 2 <= len(before) < rows and len(before) == len(set(before))

    # What a killed run can leave in _tmp/ (local disks; a shard is one PUT on object stores).
    output.join("_tmp", "part-stale.parquet.tmp").write_bytes(b"partial")
    # The killed job's lease (6 s, renewed every 2 s) is still there. On this machine its dead pid would
    # free it at once; had the job run on another machine, only its expiry frees it: say so in the record.
    lease = output.join("_lease.json")
    record = json.loads(lease.read_bytes())
    lease.write_bytes(json.dumps(record | {"host": "other-node"}).encode())
    capsys.readouterr()
    summary = run_caption(manifest, output.uri, str(tiny_checkpoint), overrides=SLOW, wait_for_lease=True)
    waited = capsys.readouterr().err
    assert (
        f"waiting: {output.uri} is in use by another caption job: host other-node, pid {first.pid}" in waited
    )
    assert time.time() >= record["expires_at"]  # it ran only once the killed job's lease had expired
    assert sorted(committed_ids(output)) == [f"row-{i:02d}" for i in range(rows)]  # every id, exactly once
    assert summary["skipped_already_done"] == len(before) and summary["this_run"]["rows"] == rows - len(
        before
    )
    assert output.join("_tmp").files() == [] and not lease.exists()


# ~35 s: the lease tests (refusal, waiting, a killed holder on this machine) and the bucket test above
# cover its paths with less work.
@pytest.mark.slow
def test_on_a_local_disk_a_second_job_stops_or_waits_and_takes_over_from_a_killed_one(
    tmp_path, tiny_checkpoint, photos
):
    root = location(tmp_path)
    manifest, output = write_manifest(root, photos, 3), root.join("out")
    first = start(caption_command(manifest, output.uri, tiny_checkpoint, *SLOW))
    try:
        wait_for(output.join("_lease.json").exists, first, "lease", seconds=120)
        with pytest.raises(LeaseHeldError, match=held_by(output, first)):
            run_caption(manifest, output.uri, str(tiny_checkpoint), overrides=SLOW, quiet=True)
        waiting = subprocess.Popen(
            caption_command(
                manifest, output, tiny_checkpoint, *SLOW, "lease_timeout_s=5", "--wait-for-lease"
            ),
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        seen = [waiting.stderr.readline()]
        while seen[-1] and not seen[-1].startswith("waiting: "):
            seen.append(waiting.stderr.readline())
        assert seen[-1].startswith(f"waiting: {held_by(output, first)}"), seen
        assert first.poll() is None  # the first job was still running while the second waited
    finally:
        kill_job(first)
    _, rest = waiting.communicate(timeout=400)  # the killed holder's pid is gone: taken over at once
    assert waiting.returncode == 0, rest[-3000:]
    assert f"taking over the lease of {output.uri} from a job that ended" in rest
    assert sorted(committed_ids(output)) == ["row-00", "row-01", "row-02"]
    assert not output.join("_lease.json").exists()
