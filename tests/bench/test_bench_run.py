"""`bench run` end to end on the tiny model, over a 200-question MMBench-style file (50 circular groups,
a question with two images, an image that is not one): resumed from what a killed run leaves, one
progress line and one table, the output folder, the scores read from the predictions by the rules, and
a finished benchmark left alone on the next run. The slow test kills a real run with SIGKILL."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bench_files import circular_rows, photo_base64, write_tsv
from caption_cli import committed_ids, wait_for_committed

from ovis_batch.bench.prepare import PrepareOptions, prepare_benchmark
from ovis_batch.eval import answers as ans

SETTINGS = """
settings:
  max_new_tokens: 8
  min_pixels: 4096
  max_pixels: 16384
  decode_workers: 1
benchmarks:
  - name: MMBench_DEV_EN
    file: {file}
"""
ENV = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")


def benchmark_file(tmp_path: Path, photos) -> tuple[Path, list[dict]]:
    rows = circular_rows(photos, 50)  # 50 groups x 4 rotations = 200 questions
    rows[45]["image"] = str([photo_base64(photos["chelsea"], 40, 30), photo_base64(photos["coffee"], 60, 60)])
    rows[41]["image"] = base64.b64encode(b"these bytes are no picture at all; " * 4).decode()
    config = tmp_path / "bench.yaml"
    config.write_text(SETTINGS.format(file=write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows)))
    return config, rows


def bench_command(config: Path, model: Path, out: Path) -> list[str]:
    command = [sys.executable, "-m", "ovis_batch.cli", "bench", "run", "--config", str(config)]
    return [*command, "--model", str(model), "--output", str(out), "--progress-interval", "3600"]


def test_bench_run_on_200_questions(tmp_path, tiny_checkpoint, photos):
    config, rows = benchmark_file(tmp_path, photos)
    out = tmp_path / "out"
    bench = out / "MMBench_DEV_EN"
    # What a killed run leaves: the prepared folder and a committed shard, here the first five groups
    # answered right (20 questions), as the caption job writes them.
    prepare_benchmark(str(tmp_path / "MMBench_DEV_EN.tsv"), bench, PrepareOptions("MMBench_DEV_EN"))
    first = rows[:20]
    (bench / "predictions").mkdir()
    shard = {
        "index": [str(r["index"]) for r in first],
        "status": ["ok"] * 20,
        "error_type": pa.nulls(20, pa.string()),
        "error_message": pa.nulls(20, pa.string()),
        "caption": [f"It is clear.\nFinal answer: {r['answer']}" for r in first],
        "reasoning": pa.nulls(20, pa.string()),
    }
    pq.write_table(pa.table(shard), bench / "predictions" / "part-earlier.parquet")

    # The run resumes: only the 180 missing questions; one progress line, one table.
    run = subprocess.run(
        bench_command(config, tiny_checkpoint, out), env=ENV, capture_output=True, text=True, timeout=400
    )
    assert run.returncode == 0, run.stderr[-3000:]
    progress = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(progress) == 1 and progress[0].startswith(
        "progress [MMBench_DEV_EN]: 180/180 rows (100%), 179 ok, 1 error | "
    )
    stdout = run.stdout.splitlines()
    table = [line for line in stdout if line.startswith("|")]
    assert stdout == [*table, stdout[-1]] and stdout[-1].startswith(f"report: {out / 'report.md'}")
    header = [cell.strip() for cell in table[0].split("|")[1:-1]]
    assert header == ["benchmark", "questions", "error rows", "unparseable", "metric", "value"]
    summary = json.loads((bench / "predictions" / "_run.json").read_text())
    assert summary["skipped_already_done"] == 20 and summary["this_run"]["rows"] == 180
    assert sorted(committed_ids(bench / "predictions", "index")) == sorted(
        str(r["index"]) for r in rows
    )  # exactly once

    # The output folder: manifest, references, predictions, the benchmark's report, the suite's.
    for name in (
        "manifest.parquet",
        "references.parquet",
        "prepared.json",
        "report/metrics.json",
        "report/report.md",
    ):
        assert (bench / name).is_file(), name
    assert (out / "report.md").is_file() and (out / "metrics.json").is_file()
    suite = json.loads((out / "metrics.json").read_text())
    entry = suite["benchmarks"]["MMBench_DEV_EN"]
    assert (entry["questions"], entry["error_rows"]) == (200, 1)  # the bytes that are no picture
    assert entry["images"]["questions_with_several"] == 1

    # Every number in the table is the report's; the report's are the predictions read by the rules.
    values = {cells[4].strip(): cells[5].strip() for cells in (line.split("|")[1:-1] for line in table[2:])}
    assert values == {m: f"{e['value']:.4f}" for m, e in entry["metrics"].items()}
    scores = pd.read_parquet(bench / "report" / "scores.parquet").set_index("id")
    predictions = pq.read_table(bench / "predictions").to_pandas().set_index("index")
    references = pd.read_parquet(bench / "references.parquet").set_index("id")
    for index, row in predictions.iterrows():
        if row["status"] != "ok":
            assert scores.loc[index, "rule"] == "error row" and scores.loc[index, "correct"] == 0
            continue
        options = dict(
            zip(references.loc[index, "option_letters"], references.loc[index, "options"], strict=True)
        )
        reading = ans.infer_choice(ans.final_answer_tail(row["caption"]), options)
        assert scores.loc[index, "rule"] == reading.rule
        assert scores.loc[index, "correct"] == float(reading.letter == references.loc[index, "answer"])
    by_group = scores.groupby("group")["correct"].min()
    assert by_group[[str(g) for g in range(1, 6)]].tolist() == [1.0] * 5  # the scripted groups
    assert entry["metrics"]["circular accuracy"]["value"] == pytest.approx(by_group.mean())
    assert entry["unparseable"] == int(scores["unparseable"].sum())

    # Run again: the finished benchmark is not run again (no progress line, its report untouched).
    stamp = (bench / "report" / "metrics.json").stat().st_mtime_ns
    again = subprocess.run(
        bench_command(config, tiny_checkpoint, out), env=ENV, capture_output=True, text=True, timeout=400
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr == "" and again.stdout.splitlines()[:-1] == table
    assert (bench / "report" / "metrics.json").stat().st_mtime_ns == stamp


@pytest.mark.slow  # two runs of the 200 questions, ~60 s; the test above covers resuming from that state
def test_bench_run_resumes_after_sigkill(tmp_path, tiny_checkpoint, photos, kill_process_tree):
    config, rows = benchmark_file(tmp_path, photos)
    out = tmp_path / "out"
    predictions = out / "MMBench_DEV_EN" / "predictions"
    command = bench_command(config, tiny_checkpoint, out)
    job = subprocess.Popen(
        [*command, "rows_per_shard=4", "batch_rows=4", "decode_batch_rows=4"],  # small shards: killed midway
        env=ENV,
        start_new_session=True,  # one SIGKILL reaches the command and every Ray process it started
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_committed(job, predictions, 8, id_column="index")
    finally:
        kill_process_tree(job)
    before = committed_ids(predictions, "index")
    assert 8 <= len(before) < 200 and not (out / "metrics.json").exists()

    rerun = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    missing = 200 - len(before)
    lease, progress = rerun.stderr.splitlines()[:2]
    assert lease.startswith(
        f"taking over the lease of {predictions} from a job that ended: "
    )  # the killed run's
    assert progress.startswith(f"progress [MMBench_DEV_EN]: {missing}/{missing} rows (100%)")
    summary = json.loads((predictions / "_run.json").read_text())
    assert summary["skipped_already_done"] == len(before) and summary["this_run"]["rows"] == missing
    assert sorted(committed_ids(predictions, "index")) == sorted(
        str(r["index"]) for r in rows
    )  # every question once
    suite = json.loads((out / "metrics.json").read_text())
    assert suite["benchmarks"]["MMBench_DEV_EN"]["questions"] == 200
