"""The caption job on a real two-node Ray cluster started with `ray start` on this machine (a head on
127.0.0.1, a worker on 127.0.0.2, token authentication on), run as a user runs it: the command line in a
process of its own with `--address`, output into a log file.

- settings whose actor pools take every CPU of the cluster run to the end (they used to leave the job at
  0 rows forever: the manifest's read task waited for a CPU the pools held);
- a plan that cannot fit is refused before any work, with the numbers;
- losing the worker node mid-run: the job finishes with every id exactly once, and what Ray prints about
  the lost node stays in its log folder;
- a driver without the cluster's auth mode is told what to set.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from caption_cli import caption_command, committed_ids, photo_manifest, wait_for_committed
from cluster_helpers import LocalCluster

from ovis_batch.errors import EXIT_USAGE

ROWS = 24
SETTINGS = ["max_new_tokens=6", "min_pixels=4096", "max_pixels=50176", "rows_per_shard=3", "batch_rows=3"]
# Lines a person sees: where Ray's logs are, progress, the summary. Nothing of Ray's own.
OWN_LINE = re.compile(
    r"^(Ray logs: |progress: |stalled: |output: |this run: |stage busy time: |error rows by type: |NOTE: |summary: )"
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, photos) -> Path:
    return photo_manifest(tmp_path_factory.mktemp("cluster-manifest"), photos, ROWS)


@pytest.fixture
def cluster(tmp_path_factory):
    """Head: 2 CPUs on 127.0.0.1; worker: 2 CPUs on 127.0.0.2. Stopped (only its own processes) after."""
    temp_dir = (
        Path("/tmp") / f"ovis-batch-ray-{os.getpid()}-{time.monotonic_ns() % 10**8}"
    )  # short: socket paths
    cluster = LocalCluster.start(temp_dir, head_cpus=2)
    try:
        cluster.add_worker("127.0.0.2", cpus=2)
        yield cluster
    finally:
        cluster.stop()


def caption(cluster: LocalCluster, manifest: Path, output: Path, model: Path, *settings: str, env=None):
    """`ovis-batch caption ... --address` in a process of its own, stdout and stderr into one log."""
    command = caption_command(
        manifest,
        output,
        model,
        "--address",
        cluster.address,
        "--progress-interval",
        "2",
        *SETTINGS,
        *settings,
    )
    return subprocess.Popen(
        command, env=env or cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_actor_pools_that_take_every_cpu_leave_room_for_reading_and_writing(
    cluster, manifest, tiny_checkpoint, tmp_path
):
    # 2 decode workers + 2 replicas = the cluster's 4 CPUs: the job used to wait forever for a CPU to read.
    job = caption(cluster, manifest, tmp_path / "out", tiny_checkpoint, "decode_workers=2", "replicas=2")
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out
    assert sorted(committed_ids(tmp_path / "out")) == [f"img-{i:03d}" for i in range(ROWS)], out
    assert all(OWN_LINE.match(line) for line in out.splitlines()), out


def test_a_plan_that_cannot_fit_is_refused_before_work_with_the_numbers(
    cluster, manifest, tiny_checkpoint, tmp_path
):
    job = caption(cluster, manifest, tmp_path / "out", tiny_checkpoint, "decode_workers=2", "replicas=3")
    out, _ = job.communicate(timeout=120)
    assert job.returncode == EXIT_USAGE, out
    nodes = "; ".join(sorted([f"{cluster.head_ip}: 2 CPU", "127.0.0.2: 2 CPU"]))
    assert out.splitlines()[-1] == (
        "error: the job's actors do not fit the Ray cluster (not every one of the decode workers finds room "
        "once the others are placed): it needs 3 model replicas x (1 CPU) + 2 decode workers x (1 CPU) = 5 CPU; "
        f"the cluster has 4 CPU ({nodes}). Lower replicas, cpus_per_replica, gpus_per_replica or "
        "decode_workers, or add nodes"
    ), out
    assert not [line for line in out.splitlines() if line.startswith("progress: ")], out  # no work began
    assert committed_ids(tmp_path / "out") == []


OTHER_JOB = """
import sys, time
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == sys.argv[2])

@ray.remote(num_cpus=2)
class OtherJob:
    def ready(self):
        return True

other = OtherJob.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
ray.get(other.ready.remote())
print("holding the head", flush=True)
time.sleep(3600)
"""


def test_losing_the_worker_node_mid_run_loses_no_row_and_prints_nothing_of_rays(
    cluster, manifest, tiny_checkpoint, tmp_path
):
    # Another job holds the head's CPUs, so this job's actors go to the worker node.
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_JOB, cluster.address, cluster.head_ip],
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert other.stdout.readline().strip() == "holding the head"
        output = tmp_path / "out"
        job = caption(cluster, manifest, output, tiny_checkpoint, "decode_workers=1", "max_new_tokens=96")
        wait_for_committed(job, output)  # the first shard: the actors work on the worker node
        cluster.kill_node("127.0.0.2")
        before = committed_ids(output)
    finally:
        other.kill()  # the head is free again: the job's actors can be placed there
        other.wait()
    assert len(before) < ROWS  # the node was lost mid-run
    out, _ = job.communicate(timeout=400)
    assert job.returncode == 0, out
    ids = committed_ids(output)
    assert sorted(ids) == [f"img-{i:03d}" for i in range(ROWS)], out  # every id, exactly once
    # Whatever Ray says of the loss (when its heartbeat check marks the node dead before the job ends: a
    # matter of timing) goes to the driver's log; test_console_output checks where such lines go.
    assert [line for line in out.splitlines() if not OWN_LINE.match(line)] == [], out


def test_a_driver_without_the_clusters_auth_mode_is_told_what_to_set(
    cluster, manifest, tiny_checkpoint, tmp_path
):
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    job = caption(cluster, manifest, tmp_path / "out", tiny_checkpoint, env=env)
    out, _ = job.communicate(timeout=180)
    assert job.returncode == EXIT_USAGE, out
    last = out.splitlines()[-1]
    assert last.startswith(f"error: could not join the Ray cluster at {cluster.address} ("), out
    assert "set RAY_AUTH_MODE=token" in last and "Traceback" not in out, out
