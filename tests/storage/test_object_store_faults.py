"""An object store that cannot be reached, that denies access, or that goes away mid-run: one line and an
exit status, never a traceback. Each case runs the command line in a process of its own against a moto
server of its own (a process this test can stop), started with the standard environment variables."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid

import pytest
from caption_cli import caption_command, photo_manifest

from ovis_batch.errors import EXIT_FAULT, EXIT_USAGE

ROWS = 12
SETTINGS = ["max_new_tokens=48", "min_pixels=4096", "max_pixels=16384", "rows_per_shard=2", "batch_rows=2"]
KEYS = {
    "AWS_ACCESS_KEY_ID": "ovis-batch-test",
    "AWS_SECRET_ACCESS_KEY": "secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoProcess:
    """moto's S3 server in a process of its own; `enforce_auth`: every request is checked against IAM,
    which knows no user, so every request is denied as a real store denies unknown keys."""

    def __init__(self, *, enforce_auth: bool = False) -> None:
        self.port = free_port()
        env = dict(os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if enforce_auth else {}))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto's server did not start"
                time.sleep(0.2)
        self.env = dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.port}", **KEYS)

    def bucket(self) -> str:
        import boto3

        name = f"ovis-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], **_boto_keys()).create_bucket(
            Bucket=name
        )
        return f"s3://{name}"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def _boto_keys() -> dict[str, str]:
    return {
        "aws_access_key_id": KEYS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"],
        "region_name": KEYS["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, photos):
    return photo_manifest(tmp_path_factory.mktemp("store-faults"), photos, ROWS, size=(160, 120))


def run(command: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, list[str]]:
    done = subprocess.run(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    assert "Traceback" not in done.stdout, done.stdout
    return done.returncode, done.stdout.splitlines()


def test_a_store_nobody_answers_for_is_refused_before_work(manifest, tiny_checkpoint):
    port = free_port()
    env = dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", **KEYS)
    status, lines = run(caption_command(manifest, "s3://nightly/out", tiny_checkpoint, *SETTINGS), env)
    assert status == EXIT_USAGE, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "s3://nightly/out" in lines[0] and f"127.0.0.1:{port}" in lines[0], lines
    assert "AWS_ENDPOINT_URL" in lines[0], lines  # what to check


def test_a_store_that_denies_access_is_refused_before_work(manifest, tiny_checkpoint):
    store = MotoProcess(enforce_auth=True)
    try:
        status, lines = run(
            caption_command(manifest, "s3://nightly/out", tiny_checkpoint, *SETTINGS), store.env
        )
    finally:
        store.stop()
    assert status == EXIT_USAGE, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "s3://nightly/out" in lines[0] and "ACCESS_DENIED" in lines[0], lines
    assert "AWS_ACCESS_KEY_ID" in lines[0], lines  # what to check


def test_a_store_lost_mid_run_ends_in_one_line(manifest, tiny_checkpoint):
    store = MotoProcess()
    output = f"{store.bucket()}/out"
    job = subprocess.Popen(
        caption_command(manifest, output, tiny_checkpoint, "--progress-interval", "1", *SETTINGS),
        env=store.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:  # the first committed shard: the run is under way
            from ovis_batch.storage import location

            try:
                with pytest.MonkeyPatch.context() as patch:
                    patch.setenv("AWS_ENDPOINT_URL", store.env["AWS_ENDPOINT_URL"])
                    for key, value in KEYS.items():
                        patch.setenv(key, value)
                    if any(f.name.startswith("part-") for f in location(output).files()):
                        break
            except Exception:
                pass
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0]
            time.sleep(0.3)
    finally:
        store.stop()  # the store goes away mid-run
    out, _ = job.communicate(timeout=400)
    lines = out.splitlines()
    assert job.returncode == EXIT_FAULT, out
    assert "Traceback" not in out, out
    found = re.fullmatch(
        r"error: the object store is unreachable \((?P<cause>.+)\) \(in Ray task write_shard_batch on node [\d.]+\); "
        r"at least (?P<committed>\d+)/12 rows committed in "
        + re.escape(output)
        + r"; rerun the same command to "
        r"resume \(traceback: \S+\)",
        lines[-1],
    )
    assert found, lines[-1]  # "at least": the store that holds the shards cannot be listed any more
