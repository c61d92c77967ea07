"""The suite report of `bench run` over scripted answers (no model run: the predictions are written as the
caption job writes them, complete): benchmarks x metrics, per-category tables, error and unparseable
counts, deltas against a previous run; and the guards around a benchmark folder."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bench_files import photo_base64, write_tsv

from ovis_batch.bench.prepare import prepare_benchmark
from ovis_batch.bench.settings import BenchConfig
from ovis_batch.checkpoints.trend import RunCheckpoint, checkpoint_scores
from ovis_batch.config import load_config
from ovis_batch.pipeline.output import OutputError
from ovis_batch.storage import location
from workflows.bench import bench_run

POPE = [
    ("1", "adversarial", "Yes"),
    ("2", "adversarial", "No"),
    ("3", "popular", "Yes"),
    ("4", "random", "No"),
]
MME = [
    ("1", "OCR", "a", "Yes"),
    ("2", "OCR", "a", "No"),
    ("3", "code_reasoning", "b", "Yes"),
    ("4", "code_reasoning", "b", "No"),
]


@pytest.fixture
def suite(tmp_path, photos) -> Path:
    image = photo_base64(photos["coffee"], 32, 32)
    pope = [
        {"index": i, "image": image, "question": f"Is there a thing {i}?", "answer": a, "category": c}
        for i, c, a in POPE
    ]
    mme = [
        {
            "index": i,
            "image": image,
            "image_path": f"{c}/{k}.jpg",
            "question": f"Q{i}?",
            "answer": a,
            "category": c,
        }
        for i, c, k, a in MME
    ]
    write_tsv(tmp_path / "POPE.tsv", pope)
    write_tsv(tmp_path / "MME.tsv", mme)
    config = tmp_path / "bench.yaml"
    config.write_text(
        "settings: {max_new_tokens: 4}\n"
        f"benchmarks:\n  - {{name: POPE, file: {tmp_path / 'POPE.tsv'}}}\n"
        f"  - {{name: MME, file: {tmp_path / 'MME.tsv'}, settings: {{thinking: true}}}}\n"
    )
    return config


def scripted(config: Path, out: Path, answers: dict[str, list[str | None]]) -> None:
    """Prepared folders and complete predictions with these answers (None: an error row)."""
    suite = load_config(BenchConfig, config)
    for benchmark in suite.benchmarks:
        folder = out / benchmark.name
        prepare_benchmark(benchmark.file, folder, suite.prepare_options(benchmark))
        said = answers[benchmark.name]
        n = len(said)
        shard = {
            "index": [str(i) for i in range(1, n + 1)],
            "status": ["ok" if a is not None else "error" for a in said],
            "error_type": [None if a is not None else "inference_error" for a in said],
            "error_message": pa.nulls(n, pa.string()),
            "caption": said,
            "reasoning": pa.nulls(n, pa.string()),
        }
        (folder / "predictions").mkdir()
        pq.write_table(pa.table(shard), folder / "predictions" / "part-scripted.parquet")
        (folder / "predictions" / "_run.json").write_text(json.dumps({"complete": True}))


def test_suite_report_and_deltas_against_a_previous_run(suite, tmp_path, tiny_checkpoint, capsys):
    first, second = tmp_path / "night-1", tmp_path / "night-2"
    # Night 1: POPE right on 1 and 4, "Yes" on 2, nothing parseable on 3; MME: OCR right, code one wrong.
    scripted(suite, first, {"POPE": ["Yes", "Yes", "Hard to say.", "No"], "MME": ["Yes", "No", "Yes", "Yes"]})
    # Night 2: POPE all right; MME: all right but one error row in OCR; one answer still carries its
    # thinking trace, whose "No" must not count: the answer is read after the reasoning.
    trace = "<think>\nDoes it print No? No, it prints the sum.\n</think>\n\nFinal answer: Yes"
    scripted(suite, second, {"POPE": ["Yes", "No", "Yes", "No"], "MME": ["Yes", None, trace, "No"]})

    before = bench_run(suite, str(tiny_checkpoint), first)
    capsys.readouterr()
    after = bench_run(suite, str(tiny_checkpoint), second, compare=str(first))
    printed = capsys.readouterr().out

    # By hand. POPE night 1: truth Y N Y N, said Y Y N(unparseable) N: accuracy 2/4, tp 1, fp 1, fn 1.
    pope1 = before["benchmarks"]["POPE"]
    assert pope1["metrics"]["accuracy"]["value"] == 0.5
    assert pope1["metrics"]["F1"]["value"] == pytest.approx(0.5)
    assert pope1["metrics"]["yes ratio"]["value"] == 0.5
    assert (pope1["questions"], pope1["error_rows"], pope1["unparseable"]) == (4, 0, 1)
    # MME night 1: OCR 100 + 100; code_reasoning acc 50, acc+ 0 -> perception 200, cognition 50.
    assert before["metrics"]["MME perception"]["value"] == 200.0
    assert before["metrics"]["MME cognition"]["value"] == 50.0
    # Night 2: POPE accuracy 1; MME OCR acc 50 (the error row is wrong), acc+ 0 -> 50; code 200.
    assert after["metrics"]["POPE accuracy"]["value"] == 1.0
    assert (
        after["metrics"]["MME perception"]["value"] == 50.0 and after["benchmarks"]["MME"]["error_rows"] == 1
    )
    deltas = after["comparison"]["deltas"]
    assert deltas["POPE accuracy"]["delta"] == pytest.approx(0.5)
    assert deltas["MME perception"]["delta"] == pytest.approx(-150.0)
    assert deltas["MME cognition"]["delta"] == pytest.approx(150.0)
    assert deltas["error rate"]["delta"] == pytest.approx(1 / 8)

    # The printed table: benchmarks x metrics with the counts and the deltas.
    table = [line for line in printed.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table]
    assert cells[0] == [
        "benchmark",
        "questions",
        "error rows",
        "unparseable",
        "metric",
        "value",
        "Δ vs previous",
    ]
    assert ["POPE", "4", "0", "0", "accuracy", "1.0000", "+0.5000"] in cells
    assert ["", "", "", "", "cognition", "200", "+150.0000"] in cells
    assert ["MME", "4", "1", "0", "perception", "50", "-150.0000"] in cells
    report = (second / "report.md").read_text()
    assert after["benchmarks"]["MME"]["thinking"] and not after["benchmarks"]["POPE"]["thinking"]
    mme_row = next(line for line in report.splitlines() if line.startswith("| [MME]"))
    assert [c.strip() for c in mme_row.split("|")][7] == "on"  # the thinking column
    assert "\n".join(table) in report
    assert "## POPE by split" in report and "| adversarial |" in report.replace("  ", " ")
    assert "## MME by category" in report and "code_reasoning" in report
    # Each benchmark's own report compares with the same benchmark of the previous run.
    own = json.loads((second / "POPE" / "report" / "metrics.json").read_text())
    assert own["comparison"]["deltas"]["accuracy"]["delta"] == pytest.approx(0.5)


def test_a_suite_report_is_a_checkpoint_evaluation_for_the_trend(suite, tmp_path, tiny_checkpoint):
    """eval-checkpoints --bench writes the suite into checkpoint-N/eval/: the trend reads its metrics."""
    evaluation = tmp_path / "checkpoint-7" / "eval"
    scripted(suite, evaluation, {"POPE": ["Yes", "No", "Yes", "Yes"], "MME": ["Yes", "No", "No", "No"]})
    bench_run(suite, str(tiny_checkpoint), evaluation, quiet=True)
    layout = SimpleNamespace(path=tmp_path / "run" / "checkpoint-7", trainer_state=None)
    checkpoint = RunCheckpoint(7, layout, "stamp", location(tmp_path / "checkpoint-7"))
    row = checkpoint_scores(checkpoint, tmp_path)
    # POPE: 3 of 4 right; MME code_reasoning: one of its two questions right (acc 50), not both (acc+ 0)
    assert row.metrics["POPE accuracy"] == 0.75 and row.metrics["MME cognition"] == 50.0
    assert row.metrics["error rate"] == 0.0 and row.higher_is_better["error rate"] is False
    assert row.report == "checkpoint-7/eval/report.md"


def test_a_changed_benchmark_file_does_not_mix_with_earlier_predictions(suite, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    scripted(suite, out, {"POPE": ["Yes", "No", "Yes", "No"], "MME": ["Yes", "No", "Yes", "No"]})
    bench_run(suite, str(tiny_checkpoint), out, quiet=True)
    prepared = (out / "POPE" / "prepared.json").read_text()
    pope = tmp_path / "POPE.tsv"
    pope.write_text(pope.read_text().replace("Is there a thing 1?", "Is there a thing one?"))
    with pytest.raises(OutputError, match=r"holds predictions for another version of POPE.*--overwrite"):
        bench_run(suite, str(tiny_checkpoint), out, quiet=True)
    assert (out / "POPE" / "prepared.json").read_text() == prepared  # nothing was touched


def test_the_command_line_refuses_a_bad_compare_folder_and_knows_every_scoring(suite, tmp_path, capsys):
    from ovis_batch.cli import main
    from ovis_batch.commands import bench
    from ovis_batch.eval.benchmarks import SCORINGS, TASK_TYPES

    assert ["auto", *SCORINGS] == bench.SCORINGS and ["auto", *TASK_TYPES] == bench.TASKS
    command = ["bench", "run", "--config", str(suite), "--model", "unused", "--output", str(tmp_path / "out")]
    assert main([*command, "--compare", str(tmp_path / "nowhere")]) == 2
    assert "no metrics.json there (is it a bench run output?)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any work
