"""Resume after a real SIGKILL of the job midway: the rerun processes only the ids not yet committed,
and the union of shards holds every manifest id exactly once."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from caption_cli import caption_command, committed_ids, wait_for_committed
from PIL import Image

N_ROWS = 160
SETTINGS = [
    # ~1024 visual tokens and 48 new tokens per row: slow enough on the tiny model to be killed midway
    "min_pixels=1048576",
    "max_pixels=1048576",
    "max_new_tokens=48",
    "rows_per_shard=2",
    "batch_rows=2",
    "decode_batch_rows=2",
    "decode_workers=1",
]


def test_sigkill_midway_then_resume(tmp_path, tiny_checkpoint, photos, kill_process_tree):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_ROWS):
        name = ["astronaut", "chelsea", "coffee"][i % 3]
        crop = photos[name][rng.integers(0, 40) :, rng.integers(0, 40) :]
        Image.fromarray(crop).save(tmp_path / f"{i}.jpg", quality=85)
        rows.append({"image_id": f"row-{i:03d}", "image": f"{i}.jpg"})
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    output = tmp_path / "out"
    command = caption_command(manifest, output, tiny_checkpoint, *SETTINGS)
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    # A session of its own, so that one SIGKILL reaches the driver and every Ray process it started.
    job = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_committed(job, output, 6)
    finally:
        kill_process_tree(job)
    before = committed_ids(output)
    assert 6 <= len(before) < N_ROWS, "the kill must land midway"
    assert len(before) == len(set(before))
    assert not (output / "_run.json").exists()  # written last: its absence marks the killed run

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((output / "_run.json").read_text())
    after = committed_ids(output)
    assert sorted(after) == sorted(r["image_id"] for r in rows)  # every id, exactly once
    assert summary["skipped_already_done"] == len(before)
    assert summary["this_run"]["rows"] == N_ROWS - len(before)  # only the missing ids were processed
    assert summary["complete"] and summary["duplicates_repaired"] == 0
