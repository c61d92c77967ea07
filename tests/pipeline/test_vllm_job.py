"""The caption job with `engine: vllm` on a real vLLM, run as a user runs it (the `ovis-batch caption`
command): the same rows as `engine: hf` in every column, error rows and embeddings included; a job's
output free of engine errors; a kill and a Ctrl-C midway, each resumed to every row exactly once, with
no engine process left behind.

    .venv-vllm/bin/python -m pytest -q -m vllm      # the environment with vLLM's CPU build (README.md)

vLLM's CPU build in CI (CPU replicas, `gpus_per_replica: 0`), its CUDA build on a GPU machine (one GPU
per replica); skipped without vLLM. The checkpoint is the `vllm_checkpoint` fixture, float32, greedy.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from caption_cli import caption_command, committed_ids, sigint_as_in_a_terminal, wait_for_committed
from PIL import Image

pytestmark = pytest.mark.vllm

# Thinking with a budget: every row runs the two-phase budget (phase 2 included) and the embedding runtime
# beside the engine computes the embedding column.
SETTINGS = ["dtype=float32", "max_new_tokens=48", "thinking=true", "thinking_budget=8", "embedding=vte_mean"]
PHOTOS = {"r0": ("astronaut", (1024, 448)), "r1": ("chelsea", (640, 448)), "r2": ("coffee", (896, 608))}
ENGINE_FAILURES = re.compile(r"EngineDeadError|Traceback|KeyError|\bERROR\b")


def engine_settings(device: str) -> list[str]:
    gpus = 1 if device == "cuda" else 0
    return ["engine=vllm", f"gpus_per_replica={gpus}", "vllm_kv_cache_gib=0.25", "vllm_enforce_eager=true"]


def jpeg(photos, name: str, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photos[name]).resize(size).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, photos) -> Path:
    """Three photos, a file that is not an image and one too small to caption."""
    rows = [{"image_id": i, "image": jpeg(photos, name, size)} for i, (name, size) in PHOTOS.items()]
    rows.append({"image_id": "broken", "image": b"not an image"})
    rows.append({"image_id": "small", "image": jpeg(photos, "coffee", (24, 16))})
    path = tmp_path_factory.mktemp("manifest") / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def run_job(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def rows_by_id(output: Path) -> dict[str, dict]:
    return {r["image_id"]: r for r in pq.read_table(output).to_pylist()}


def ray_logs(stderr: str) -> Path:
    """The Ray session's log folder the job announced (`Ray logs: ...`)."""
    return Path(re.search(r"Ray logs: (\S+)", stderr).group(1))


def engine_failures(stdout: str, stderr: str, logs: Path) -> list[str]:
    """Lines of the job's output and of its Ray workers' logs that report an engine failure or a traceback."""
    texts = {"stdout": stdout, "stderr": stderr}
    texts |= {p.name: p.read_text(errors="replace") for p in sorted(logs.glob("worker-*"))}
    return [
        f"{name}: {line}"
        for name, text in texts.items()
        for line in text.splitlines()
        if ENGINE_FAILURES.search(line)
    ]


@pytest.fixture(scope="module")
def hf_rows(tmp_path_factory, manifest, vllm_checkpoint) -> dict[str, dict]:
    output = tmp_path_factory.mktemp("hf") / "out"
    run_job(caption_command(manifest, output, vllm_checkpoint, "engine=hf", *SETTINGS))
    return rows_by_id(output)


def test_vllm_job_writes_the_hf_jobs_rows_and_no_engine_error(
    tmp_path, manifest, vllm_checkpoint, vllm_replica_device, hf_rows
):
    output = tmp_path / "vllm"
    command = caption_command(
        manifest, output, vllm_checkpoint, *engine_settings(vllm_replica_device), *SETTINGS
    )
    done = run_job(command)
    ours = rows_by_id(output)
    assert sorted(ours) == sorted(hf_rows) == ["broken", "r0", "r1", "r2", "small"]
    for image_id, theirs in hf_rows.items():
        row = ours[image_id]
        # The same runtime computes the embeddings beside either engine, in batches of other sizes.
        a, b = theirs.pop("embedding"), row.pop("embedding")
        assert (a is None) == (b is None), image_id
        if a is not None:
            np.testing.assert_allclose(b, a, atol=1e-5)
        assert row == theirs, image_id
    assert ours["broken"]["error_type"] == "not_an_image" and ours["small"]["status"] == "error"
    # Both budget branches ran on vLLM: rows cut at the budget (phase 2 after the forced ending) and rows
    # that ended or closed their thinking inside it.
    assert {ours[i]["thinking_truncated"] for i in PHOTOS} == {True, False}
    summary = json.loads((output / "_run.json").read_text())
    assert summary["complete"] and summary["this_run"]["rows"] == 5
    assert engine_failures(done.stdout, done.stderr, ray_logs(done.stderr)) == []


def test_releasing_the_model_stage_stops_its_engine(manifest, vllm_checkpoint, vllm_replica_device):
    """What Ray Data does with a replica at the end of a job: drop the stage. Its engine's processes must
    stop then (`__del__`), not when the actor's process ends: Ray ends an exiting actor's children
    first, which the engine would report as its failure. So nothing may keep the stage alive."""
    import asyncio
    import gc

    from test_stages import decode_stage

    from ovis_batch.pipeline.stages import VllmCaptionPredictor

    def run_one_batch() -> list[psutil.Process]:
        stage = VllmCaptionPredictor(
            model_source=str(vllm_checkpoint),
            id_column="image_id",
            passthrough=[],
            device=vllm_replica_device,
            dtype="float32",
            generation={"max_new_tokens": 4},
            embedding=None,
            embedding_dim=None,
            min_pixels=448 * 448,
            max_pixels=1792 * 1792,
            vllm={
                "gpu_memory_utilization": None,
                "kv_cache_gib": 0.25,
                "max_model_len": 2048,
                "max_num_seqs": 4,
                "enforce_eager": True,
            },
        )
        batch = decode_stage(min_pixels=448 * 448, max_pixels=1792 * 1792)(pq.read_table(manifest))
        with asyncio.Runner() as runner:
            out = runner.run(stage(batch))
        assert out.column("status").to_pylist() == ["ok", "ok", "ok", "error", "error"]
        return engine_processes(os.getpid())

    engine = run_one_batch()
    assert engine, "vLLM runs its engine in processes of its own"
    gc.collect()
    _, alive = psutil.wait_procs(engine, timeout=60)
    assert not alive, f"the dropped stage's engine still runs: {[p.pid for p in alive]}"


def engine_processes(pid: int) -> list[psutil.Process]:
    """The vLLM processes below `pid` (its engine core and workers name themselves `VLLM::...`)."""
    found = []
    for process in psutil.Process(pid).children(recursive=True):
        try:
            if process.name().startswith("VLLM::") or "VLLM::" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def start_and_wait(command: list[str], output: Path, shards: int) -> tuple[subprocess.Popen, list]:
    """Start the job in a session of its own; return once `shards` shards are committed, with its engine
    processes."""
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    job = subprocess.Popen(
        command,
        env=env,
        start_new_session=True,
        preexec_fn=sigint_as_in_a_terminal,  # Ctrl-C reaches it whatever this test runner inherited
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_committed(job, output, shards, timeout_s=600)
    engines = engine_processes(job.pid)
    assert engines, "the vLLM replica runs its engine in processes of its own"
    return job, engines


def test_kill_and_ctrl_c_midway_then_resume(
    tmp_path, photos, vllm_checkpoint, vllm_replica_device, hf_rows, kill_process_tree
):
    """SIGKILL of everything (a lost machine), then Ctrl-C of the rerun, then a rerun to the end: every
    id exactly once, each row the hf job's row for its photo, and no engine process outliving its job."""
    rows = [
        {"image_id": f"{i}-{k:03d}", "image": jpeg(photos, *PHOTOS[i])} for k in range(40) for i in PHOTOS
    ]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    output = tmp_path / "out"
    slow = ["rows_per_shard=1", "batch_rows=1", "vllm_batches_in_flight=1", "decode_batch_rows=1"]
    command = caption_command(
        manifest, output, vllm_checkpoint, *engine_settings(vllm_replica_device), *SETTINGS, *slow
    )

    job, engines = start_and_wait(command, output, shards=3)
    kill_process_tree(job)
    killed = committed_ids(output)
    assert 3 <= len(killed) < len(rows) and len(set(killed)) == len(killed)
    assert not any(p.is_running() for p in engines)

    job, engines = start_and_wait(command, output, shards=len(killed) + 3)
    os.killpg(job.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole foreground group
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: interrupted (Ctrl-C); ") and "rerun the same command to resume" in last
    assert "Traceback" not in stderr and "Traceback" not in stdout
    _, alive = psutil.wait_procs(engines, timeout=60)
    assert not alive, f"engine processes outlived the interrupted job: {[p.pid for p in alive]}"
    interrupted = committed_ids(output)
    assert len(killed) < len(interrupted) < len(rows) and len(set(interrupted)) == len(interrupted)

    done = run_job(command)
    summary = json.loads((output / "_run.json").read_text())
    assert sorted(committed_ids(output)) == sorted(r["image_id"] for r in rows)  # every id, exactly once
    assert summary["skipped_already_done"] == len(interrupted)
    assert summary["this_run"]["rows"] == len(rows) - len(interrupted)
    assert summary["complete"] and summary["duplicates_repaired"] == 0
    for image_id, row in rows_by_id(output).items():
        expected = hf_rows[image_id.split("-")[0]]
        assert (row["caption"], row["reasoning"], row["output_tokens"]) == (
            expected["caption"],
            expected["reasoning"],
            expected["output_tokens"],
        ), image_id
    assert engine_failures(done.stdout, done.stderr, ray_logs(done.stderr)) == []
