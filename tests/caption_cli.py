"""For tests that run the caption job as a user does, in a process of its own: a manifest of real photos
referred to by relative paths, the `ovis-batch caption` command line, and the ids an output holds."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ovis_batch.storage import Location, location


def photo_manifest(
    folder: Path, photos: dict[str, np.ndarray], rows: int, *, id_format: str = "img-{:03d}", size=None
) -> Path:
    """`rows` JPEGs of the photos in turn (resized to `size` when given), and a manifest naming them by
    paths relative to it; ids `id_format.format(i)`."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(photos)
    table = []
    for i in range(rows):
        image = Image.fromarray(photos[names[i % len(names)]])
        (image.resize(size) if size else image).save(folder / f"{i:03d}.jpg", quality=90)
        table.append({"image_id": id_format.format(i), "image": f"{i:03d}.jpg"})
    pq.write_table(pa.Table.from_pylist(table), folder / "manifest.parquet")
    return folder / "manifest.parquet"


def caption_args(manifest: str | Path, output: str | Path, model: str | Path, *args: str) -> list[str]:
    """`caption --manifest ... --output ... --model ...` and `args`: the command line's arguments."""
    return ["caption", "--manifest", str(manifest), "--output", str(output), "--model", str(model), *args]


def caption_command(manifest: str | Path, output: str | Path, model: str | Path, *args: str) -> list[str]:
    """`python -m ovis_batch.cli caption ...` (`caption_args`) for a process of its own."""
    return [sys.executable, "-m", "ovis_batch.cli", *caption_args(manifest, output, model, *args)]


def committed_ids(output: str | Path | Location, id_column: str = "image_id") -> list[str]:
    """Every id in the output's committed shards, duplicates included; a local path or any URI."""
    ids = []
    for shard in location(output).files():
        if shard.name.startswith("part-") and shard.name.endswith(".parquet"):
            ids += pq.read_table(io.BytesIO(shard.read_bytes()), columns=[id_column]).column(0).to_pylist()
    return ids


def wait_for_committed(
    job: subprocess.Popen,
    output: str | Path | Location,
    count: int = 1,
    *,
    id_column: str = "image_id",
    timeout_s: float = 240,
) -> None:
    """Return once `output` holds `count` committed ids while `job` runs (to stop it midway). Fails when
    the job ends first (with its output, when it is captured: make the job longer) or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while len(committed_ids(output, id_column)) < count:
        if job.poll() is not None:
            said = job.communicate()[0] if job.stdout else ""
            raise AssertionError(
                f"the job ended (exit {job.returncode}) before {count} ids were committed; make it longer\n{said}"
            )
        assert time.monotonic() < deadline, f"fewer than {count} ids committed within {timeout_s:g} s"
        time.sleep(0.2)


def sigint_as_in_a_terminal() -> None:
    """`preexec_fn` for a job that Ctrl-C must reach: SIGINT handled as in a terminal's foreground job,
    whatever the test runner inherited (a runner started with `&` passes SIGINT on ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def sigint_ignored() -> None:
    """`preexec_fn` for a job started as a script starts it in the background (`ovis-batch caption ... &`,
    cron): SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
