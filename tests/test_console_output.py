"""What a person sees: the demo run into a log file prints its own few lines (where Ray's logs are,
progress, summary), and Ray's output goes to the session's log folder unless `verbose`."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

from ovis_batch.ray_session import DRIVER_LOG, DRIVER_STDERR, OWN_THREADS, _other_output_to

# Lines of Ray's that a quiet run must not show: tracebacks, warnings, the executor's logs and
# plans, the core's actor-argument message, worker output streamed to the driver.
NOISE = (
    "Traceback",
    "WARNING",
    "Warning",
    "INFO",
    "Running Dataset",
    "Execution plan",
    "core_worker",
    "(pid=",
)


def test_demo_into_a_log_file_prints_only_its_own_lines(tmp_path, tiny_checkpoint):
    workdir = tmp_path / "demo"
    workdir.mkdir()
    (workdir / "tiny-ovis2.5-random").symlink_to(tiny_checkpoint)  # the demo uses it instead of writing one
    command = [sys.executable, "-m", "ovis_batch.cli", "demo", "--workdir", str(workdir)]
    run = subprocess.run(
        [*command, "--progress-interval", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # as in `ovis-batch demo > run.log 2>&1`: no terminal
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-3000:]
    lines = run.stdout.splitlines()

    logs = re.fullmatch(r"Ray logs: (\S+) \(shown here with --verbose\)", lines[0])
    assert logs, lines[0]
    assert (Path(logs[1]) / "ray-data" / "ray-data.log").is_file()  # Ray Data's logs went there
    assert (Path(logs[1]) / DRIVER_LOG).is_file() and (Path(logs[1]) / DRIVER_STDERR).is_file()

    progress = [line for line in lines if line.startswith("progress: ")]
    assert progress and lines[1 : 1 + len(progress)] == progress  # one block, right after the first line
    committed = [int(re.match(r"progress: (\d+)/5 rows", line)[1]) for line in progress]
    assert committed == sorted(committed)
    assert progress[-1].startswith("progress: 5/5 rows (100%), 4 ok, 1 error | ")  # the sample's 4 + 1

    expected = [
        "output: ",
        "this run: 5 rows (4 ok, 1 error) in ",
        "stage busy time: ",
        "error rows by type: file_not_found: 1",
        "NOTE: the model has RANDOM WEIGHTS",
        "summary: ",
        "",
        "first rows of ",
        *(f"  {image_id} " for image_id in ("astronaut", "chelsea", "coffee", "missing-file", "rocket")),
    ]
    rest = lines[1 + len(progress) :]
    assert len(rest) == len(expected), run.stdout
    assert all(line.startswith(start) for line, start in zip(rest, expected, strict=True)), run.stdout
    assert not [noise for noise in NOISE if noise in run.stdout], run.stdout

    again = subprocess.run(command, capture_output=True, text=True, timeout=120)  # resumes: nothing to do
    assert again.returncode == 0 and "Ray logs" not in again.stderr and again.stderr == ""


SESSION = """
import logging, os, sys
import ray
from ovis_batch.ray_session import ray_session

@ray.remote
def worker_task():
    print("printed by a worker", flush=True)
    return os.getpid()

with ray_session(None, num_cpus=1, verbose=sys.argv[1] == "verbose") as folder:
    worker_pid = ray.get(worker_task.remote())
    logging.getLogger("ray").warning("a Ray core warning")
    logging.getLogger("ray.data").warning("a Ray Data warning")
    os.write(2, b"written to fd 2 by native code\\n")
    print("the job's own line", file=sys.stderr)
print(f"folder={folder} worker={worker_pid}", file=sys.stderr)
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_ray_output_goes_to_the_log_folder_unless_verbose(mode):
    run = subprocess.run([sys.executable, "-c", SESSION, mode], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    found = re.search(r"folder=(\S+) worker=(\d+)", run.stderr)
    folder, worker = Path(found[1]), found[2]
    ray_lines = ["a Ray core warning", "a Ray Data warning", "written to fd 2 by native code"]
    if mode == "quiet":
        assert run.stderr.splitlines() == [
            f"Ray logs: {folder} (shown here with --verbose)",
            "the job's own line",
            found[0],
        ]
        assert "a Ray core warning" in (folder / DRIVER_LOG).read_text()
        assert "a Ray Data warning" in (folder / "ray-data" / "ray-data.log").read_text()
        assert "written to fd 2 by native code" in (folder / DRIVER_STDERR).read_text()
        (worker_out,) = folder.glob(f"worker-*-{worker}.out")
        assert "printed by a worker" in worker_out.read_text()
        assert run.stdout == ""  # not streamed to the driver (with verbose it is, asynchronously)
    else:
        assert f"Ray logs: {folder}" in run.stderr.splitlines()  # after Ray's start-up warnings
        assert all(line in run.stderr for line in ray_lines), run.stderr
        assert not (folder / DRIVER_STDERR).exists()


def test_ray_relay_threads_write_to_the_driver_log_and_the_job_to_the_console(tmp_path, monkeypatch):
    console_out, console_err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", console_out)
    monkeypatch.setattr(sys, "stderr", console_err)
    log = tmp_path / DRIVER_LOG

    def relay():  # what Ray's log-relay thread prints when a node dies
        print("(raylet) The node with node id: abc and address: 127.0.0.2 has been marked dead")
        print("(raylet) a state dump", file=sys.stderr)

    def progress():
        print("progress: 3/24 rows")

    with _other_output_to(log):
        print("Ray logs: /somewhere")
        for target, name in ((relay, "ray_print_logs"), (progress, OWN_THREADS[0])):
            thread = threading.Thread(target=target, name=name)
            thread.start()
            thread.join()
        warnings.warn("ray_remote_args_fn is deprecated", UserWarning, stacklevel=1)
    print("summary: after the session")

    assert console_out.getvalue().splitlines() == [
        "Ray logs: /somewhere",
        "progress: 3/24 rows",
        "summary: after the session",
    ]
    assert console_err.getvalue() == ""
    logged = log.read_text()
    assert "(raylet) The node with node id: abc and address: 127.0.0.2 has been marked dead\n" in logged
    assert "(raylet) a state dump\n" in logged
    assert "UserWarning: ray_remote_args_fn is deprecated" in logged
    assert "progress:" not in logged and "Ray logs" not in logged
