"""`ovis-batch eval-checkpoints`: every checkpoint of a run captioned and scored, then the trend report."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ovis_batch.checkpoints.trend import checkpoint_scores, find_run_checkpoints, write_trend_report
from ovis_batch.cli import main
from ovis_batch.model.checkpoint import CheckpointError


def fake_evaluation(checkpoint, cider: float, error_rate: float) -> None:
    """What the evaluation leaves behind, reduced to the parts the trend reads."""
    document = {
        "metrics": {
            "CIDEr-D": {"value": cider, "higher_is_better": True},
            "METEOR": {"value": None, "higher_is_better": True},
        },
        "health": {"metrics": {"error rate": {"value": error_rate, "higher_is_better": False}}},
    }
    checkpoint.eval_dir.join("metrics.json").write_text(json.dumps(document))


def test_trend_report_puts_every_metric_beside_the_training_loss(trainer_run, tmp_path):
    report = tmp_path / "report"
    checkpoints = find_run_checkpoints(trainer_run.run_dir, report)
    assert [c.step for c in checkpoints] == [1, 2, 3]
    for c, cider, errors in zip(checkpoints, [0.1, 0.5, 0.3], [0.2, 0.0, 0.1], strict=True):
        c.prepare()
        fake_evaluation(c, cider, errors)
    rows = [checkpoint_scores(c, report) for c in checkpoints]
    losses = checkpoints[-1].layout.trainer_state.losses
    document = write_trend_report(report, trainer_run.run_dir, rows, losses)

    assert document["best"]["CIDEr-D"] == {"step": 2, "checkpoint": "checkpoint-2", "value": 0.5}
    assert document["best"]["error rate"]["step"] == 2  # lower is better
    assert document["best"]["METEOR"] is None
    table = list(csv.DictReader(io.StringIO((report / "trend.csv").read_text())))
    assert [int(r["step"]) for r in table] == [1, 2, 3]
    assert [float(r["train_loss"]) for r in table] == [loss for _, loss in losses]  # logged every step
    assert [float(r["CIDEr-D"]) for r in table] == [0.1, 0.5, 0.3]
    markdown = (report / "trend.md").read_text()
    assert "[checkpoint-2](checkpoints/checkpoint-2/eval/report.md)" in markdown
    for path in document["files"]["plots"].values():
        assert (report / path).stat().st_size > 1000  # a real PNG
    assert json.loads((report / "trend.json").read_text())["format"] == "ovis-batch-trend/1"


def test_a_checkpoint_is_scored_once_unless_its_files_change(trainer_run, tmp_path):
    run = shutil.copytree(trainer_run.run_dir, tmp_path / "run")
    checkpoint = find_run_checkpoints(run, tmp_path / "report")[0]
    assert not checkpoint.is_scored()
    checkpoint.prepare()
    fake_evaluation(checkpoint, 0.1, 0.0)
    assert checkpoint.is_scored()
    assert find_run_checkpoints(run, tmp_path / "report")[0].is_scored()
    weights = run / "checkpoint-1" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten
    rewritten = find_run_checkpoints(run, tmp_path / "report")[0]
    assert not rewritten.is_scored()
    rewritten.prepare()
    assert not rewritten.eval_dir.exists()  # the old results are gone


def test_a_run_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint-N folders"):
        find_run_checkpoints(tmp_path, tmp_path / "report")


@pytest.mark.slow  # three batch jobs on a local Ray, ~60 s; the two tests above cover the trend and skipping
def test_eval_checkpoints_over_a_run_of_three_checkpoints(trainer_run, tmp_path, photos, capsys):
    rows, refs = [], []
    for name in ("astronaut", "chelsea", "coffee"):
        buffer = io.BytesIO()
        Image.fromarray(photos[name]).resize((96, 96)).save(buffer, "PNG")
        rows.append({"image_id": name, "image": buffer.getvalue()})
        refs.append({"image_id": name, "references": [f"a photo of {name}", "a small picture"]})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    pq.write_table(pa.Table.from_pylist(refs), tmp_path / "refs.parquet")
    report = tmp_path / "report"
    command = [
        "eval-checkpoints",
        str(trainer_run.run_dir),
        "--manifest",
        str(tmp_path / "manifest.parquet"),
        "--references",
        str(tmp_path / "refs.parquet"),
        "--report",
        str(report),
        "--no-meteor",
        *("--set", "max_new_tokens=6", "--set", "device=cpu", "--set", "decode_workers=1"),
        *("--set", "min_pixels=1024", "--set", "max_pixels=16384"),
    ]
    assert main(command) == 0
    trend = json.loads((report / "trend.json").read_text())
    assert [c["step"] for c in trend["checkpoints"]] == [1, 2, 3]
    assert {"CIDEr-D", "BLEU-4", "error rate"} <= set(trend["metrics"])
    assert all(c["train_loss"] is not None for c in trend["checkpoints"])
    for step in (1, 2, 3):
        predictions = pq.read_table(report / "checkpoints" / f"checkpoint-{step}" / "predictions")
        assert sorted(predictions.column("image_id").to_pylist()) == ["astronaut", "chelsea", "coffee"]
    capsys.readouterr()

    assert main(command) == 0  # nothing changed: every checkpoint is skipped, the trend rewritten
    assert capsys.readouterr().out.count("already scored, skipped") == 3


@pytest.mark.slow  # a batch job on a local Ray, ~50 s; tests/bench cover bench run and the trend reading its report
def test_eval_checkpoints_scores_a_checkpoint_on_a_benchmark_suite(trainer_run, tmp_path, photos, capsys):
    """`--bench`: the suite's report is the checkpoint's evaluation; the trend has a row per benchmark metric."""
    run = shutil.copytree(trainer_run.run_dir, tmp_path / "run")
    for step in (1, 2):
        shutil.rmtree(run / f"checkpoint-{step}")  # one checkpoint is enough to see the wiring
    buffer = io.BytesIO()
    Image.fromarray(photos["coffee"]).resize((48, 48)).save(buffer, "PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    rows = [
        {
            "index": i,
            "image": image,
            "question": f"Is there a cup {i}?",
            "answer": "Yes" if i % 2 else "No",
            "category": ["adversarial", "random"][i % 2],
        }
        for i in range(6)
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "POPE.tsv", sep="\t", index=False)
    suite = tmp_path / "bench.yaml"
    suite.write_text(
        "settings: {max_new_tokens: 4, min_pixels: 1024, max_pixels: 16384, decode_workers: 1, device: cpu}\n"
        f"benchmarks:\n  - {{name: POPE, file: {tmp_path / 'POPE.tsv'}}}\n"
    )
    report = tmp_path / "report"
    command = ["eval-checkpoints", str(run), "--bench", str(suite), "--report", str(report)]
    assert main(command) == 0
    evaluation = report / "checkpoints" / "checkpoint-3" / "eval"
    assert json.loads((evaluation / "metrics.json").read_text())["benchmarks"]["POPE"]["questions"] == 6
    predictions = pq.read_table(evaluation / "POPE" / "predictions").column("index").to_pylist()
    assert sorted(predictions) == [str(i) for i in range(6)]
    trend = json.loads((report / "trend.json").read_text())
    assert {"POPE accuracy", "POPE F1", "POPE yes ratio", "error rate"} <= set(trend["metrics"])
    assert "[checkpoint-3](checkpoints/checkpoint-3/eval/report.md)" in (report / "trend.md").read_text()
    capsys.readouterr()
    assert main(command) == 0  # scored: skipped
    assert "already scored, skipped" in capsys.readouterr().out
    assert (
        main(["eval-checkpoints", str(run), "--bench", str(suite), "--manifest", "x", "--report", "r"]) == 2
    )
