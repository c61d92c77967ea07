"""Faults during a run end with one line and an exit status, never a traceback; committed rows are kept and
a rerun resumes. Each test runs the command line as a user does, in a process of its own, with stdout and
stderr into one log. Faults inside Ray's workers are injected by `fault_injection/sitecustomize.py`, which
every Python process of the job loads from PYTHONPATH; a full disk is also made for real with a tmpfs
where this machine allows mounting one."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from caption_cli import (
    caption_command,
    committed_ids,
    photo_manifest,
    sigint_as_in_a_terminal,
    sigint_ignored,
    wait_for_committed,
)

from ovis_batch.errors import EXIT_FAULT, EXIT_INTERRUPTED, EXIT_USAGE

ROWS = 12
SETTINGS = [
    "max_new_tokens=4",
    "min_pixels=4096",
    "max_pixels=50176",
    "rows_per_shard=2",
    "batch_rows=2",
    "decode_batch_rows=2",
    "decode_workers=1",
]
INJECTION = str(Path(__file__).parent / "fault_injection")
RERUN = "rerun the same command to resume"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, photos) -> Path:
    return photo_manifest(
        tmp_path_factory.mktemp("faults"), photos, ROWS, id_format="img-{:02d}", size=(256, 192)
    )


def caption(
    manifest: Path, output: Path, model: Path, *extra: str, fault: str | None = None, background=False
):
    """The caption command in a process of its own, with `fault` injected into every process of the job,
    started as in a terminal (Ctrl-C reaches it) or, `background`, as a script's `&` starts it."""
    env = dict(os.environ)
    if fault:
        env["OVIS_BATCH_TEST_FAULT"] = fault
        env["PYTHONPATH"] = os.pathsep.join([INJECTION, *filter(None, [env.get("PYTHONPATH")])])
    command = caption_command(manifest, output, model, "--progress-interval", "1", *SETTINGS, *extra)
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=sigint_ignored if background else sigint_as_in_a_terminal,
    )


def finish(job: subprocess.Popen, timeout: float = 300) -> tuple[int, list[str]]:
    out, _ = job.communicate(timeout=timeout)
    return job.returncode, out.splitlines()


def fault_line(lines: list[str]) -> re.Match:
    """The last line, which must be the one error line: `error: <what> (<where>); K/N rows committed in
    <output>; rerun the same command to resume (traceback: <file>)`."""
    assert not [line for line in lines if "Traceback" in line], lines
    found = re.fullmatch(
        r"error: (?P<what>.+); (?P<committed>\d+)/(?P<total>\d+) rows committed in (?P<output>\S+); "
        + re.escape(RERUN)
        + r" \(traceback: (?P<traceback>\S+)\)",
        lines[-1],
    )
    assert found, lines[-1]
    assert Path(found["traceback"]).is_file() and "Traceback" in Path(found["traceback"]).read_text()
    return found


def assert_resumes(manifest: Path, output: Path, model: Path, *extra: str, already: int) -> None:
    """The same command again, without the fault: the ids not yet committed, each exactly once."""
    status, lines = finish(caption(manifest, output, model, *extra))
    assert status == 0, lines
    assert sorted(committed_ids(output)) == [f"img-{i:02d}" for i in range(ROWS)]  # each id exactly once
    assert f"skipped {already} already committed" in "\n".join(lines)
    assert not list((output / "_tmp").glob("part-*"))  # no temporary shard left behind


@pytest.mark.parametrize(
    ("fault", "what"),
    [
        # Ray Data appends a note to a failed task's exception, which costs an OSError its file name:
        # the line names the output folder instead, where the rows are committed.
        ("enospc:2", "the disk is full (no space left on device)"),
        ("eacces:2", "permission denied"),
    ],
)
def test_a_write_that_fails_mid_run_ends_in_one_line_and_the_rerun_resumes(
    fault, what, manifest, tiny_checkpoint, tmp_path
):
    output = tmp_path / "out"
    status, lines = finish(caption(manifest, output, tiny_checkpoint, fault=fault))
    assert status == EXIT_FAULT, lines
    found = fault_line(lines)
    assert re.fullmatch(
        re.escape(what.format(output=output)) + r" \(in Ray task write_shard_batch on node [\d.]+\)",
        found["what"],
    ), found["what"]
    done = committed_ids(output)
    assert int(found["committed"]) == len(done) >= 4 and int(found["total"]) == ROWS  # 2 shards of 2 rows
    assert found["output"] == str(output)
    assert_resumes(manifest, output, tiny_checkpoint, already=len(done))


def test_a_disk_that_fills_up_for_real(manifest, tiny_checkpoint, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"this machine does not let the tests mount a tmpfs ({mounted.stderr.decode().strip()})")
    try:
        output = disk / "out"
        status, lines = finish(caption(manifest, output, tiny_checkpoint, "embedding=last_token"))
        assert status == EXIT_FAULT, lines
        found = fault_line(lines)
        assert found["what"].startswith("the disk is full (no space left on device)"), found["what"]
        assert int(found["committed"]) == len(committed_ids(output)) < ROWS
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)  # space again
        assert_resumes(
            manifest, output, tiny_checkpoint, "embedding=last_token", already=int(found["committed"])
        )
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_model_folder_a_replica_cannot_read_ends_in_one_line(manifest, tiny_checkpoint, tmp_path):
    output = tmp_path / "out"
    status, lines = finish(caption(manifest, output, tiny_checkpoint, fault="model_unreadable"))
    assert status == EXIT_FAULT, lines
    found = fault_line(lines)
    assert re.fullmatch(
        re.escape(
            f"{tiny_checkpoint}/model.safetensors could not be read (PermissionError: [Errno 13] Permission "
            "denied); re-download it"
        )
        + r" \(in Ray task CaptionPredictor on node [\d.]+\)",
        found["what"],
    ), found["what"]
    assert found["committed"] == "0" and committed_ids(output) == []


def test_ctrl_c_ends_in_one_line_and_the_rerun_resumes(manifest, tiny_checkpoint, tmp_path):
    output = tmp_path / "out"
    job = caption(manifest, output, tiny_checkpoint, "max_new_tokens=48")
    wait_for_committed(job, output)
    job.send_signal(signal.SIGINT)
    status, lines = finish(job)
    assert status == EXIT_INTERRUPTED, lines
    found = fault_line(lines)
    assert found["what"] == "interrupted (Ctrl-C)"
    assert int(found["committed"]) == len(committed_ids(output))
    assert_resumes(manifest, output, tiny_checkpoint, "max_new_tokens=48", already=int(found["committed"]))


def test_a_job_that_commits_nothing_for_too_long_is_stopped_with_what_ray_waits_for(
    manifest, tiny_checkpoint, tmp_path
):
    output = tmp_path / "out"
    # Started as a nightly script starts it, SIGINT ignored: the watchdog's interruption does not need it.
    job = caption(
        manifest,
        output,
        tiny_checkpoint,
        "stall_report_s=3",
        "stall_timeout_s=8",
        fault="hang",
        background=True,
    )
    status, lines = finish(job)
    assert status == EXIT_FAULT, lines
    stalled = [line for line in lines if line.startswith("stalled: ")]
    assert stalled and all(
        re.fullmatch(r"stalled: no row committed for 0:0[3-8]; Ray is waiting for: .+", line)
        for line in stalled
    ), lines
    found = fault_line(lines)
    assert re.fullmatch(
        r"no row committed for 0:0[89] \(stall_timeout_s=8\); Ray was waiting for: nothing: no resource demand "
        r"is pending, so the running stages are busy or stuck \(see Ray's logs\)",
        found["what"],
    ), found["what"]
    assert found["committed"] == "0"


def test_a_cluster_address_where_nothing_answers_is_refused_at_once(manifest, tiny_checkpoint, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the test connects
    started = time.monotonic()
    status, lines = finish(
        caption(manifest, tmp_path / "out", tiny_checkpoint, "--address", f"127.0.0.1:{port}")
    )
    assert status == EXIT_USAGE and time.monotonic() - started < 60, lines
    assert lines == [
        f"error: no Ray cluster answers at 127.0.0.1:{port} (Connection refused); start one there "
        "(`ray start --head`), or pass the head node's address (host:6379, or ray://host:10001 for Ray Client), "
        "or leave --address out to run on this machine"
    ]
