"""`bench run` and `bench prepare` against a real S3-protocol server (moto on 127.0.0.1): a suite whose
output is on the bucket (one benchmark file on the local disk, one on the bucket), a rerun that finds its
benchmarks finished, `--compare` of a suite report on the bucket, and destinations that cannot be
written refused before work. Every file lands in the bucket and nothing on the local disk (no folder
named `s3:`)."""

from __future__ import annotations

import contextlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bench_files import circular_rows, photo_base64, write_tsv
from s3_helpers import objects, scheme_named_folders

import workflows.bench
from ovis_batch.cli import main
from ovis_batch.storage import location

SUITE = """
settings: {{max_new_tokens: 4, min_pixels: 4096, max_pixels: 16384, decode_workers: 1, batch_rows: 4}}
benchmarks:
  - {{name: POPE, file: {pope}}}
  - {{name: MMBench_DEV_EN, file: {mmbench}}}
"""
POPE = [("1", "adversarial", "Yes"), ("2", "popular", "No"), ("3", "random", "Yes"), ("4", "random", "No")]
NAMES = ("POPE", "MMBench_DEV_EN")
PREPARED = {"manifest.parquet", "references.parquet", "prepared.json"}


def read_json(uri: str) -> dict:
    return json.loads(location(uri).read_bytes())


def file_keys(folder: str) -> set[str]:
    """The files under `s3://bucket/folder`, relative to it (directory markers left out)."""
    prefix = folder.split("/", 3)[3] + "/"
    return {k.removeprefix(prefix) for k in objects(folder) if not k.endswith("/")}


def predicted_indexes(predictions: str) -> list[str]:
    ids = []
    for shard in location(predictions).parquet_files():
        ids += pq.read_table(io.BytesIO(shard.read_bytes()), columns=["index"]).column(0).to_pylist()
    return ids


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """The command line in this process, with what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def table_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("|")]


@pytest.fixture
def spies(monkeypatch):
    """Which benchmarks the workflow captions and scores (the real functions still run)."""
    calls: dict[str, list[str]] = {"captioned": [], "scored": []}
    run_caption, score = workflows.bench.run_caption, workflows.bench.score_benchmark_folder

    def captioning(manifest, *args, **kwargs):
        calls["captioned"].append(kwargs["progress_label"])
        return run_caption(manifest, *args, **kwargs)

    def scoring(folder, *args, **kwargs):
        calls["scored"].append(folder.name)
        return score(folder, *args, **kwargs)

    monkeypatch.setattr(workflows.bench, "run_caption", captioning)
    monkeypatch.setattr(workflows.bench, "score_benchmark_folder", scoring)
    return calls


@pytest.fixture(scope="module")
def night_one(bucket, tiny_checkpoint, photos, tmp_path_factory):
    """A suite of two small benchmarks (POPE on the local disk, MMBench-style on the bucket) run by the
    command line with its output on the bucket, from an empty working folder."""
    files = tmp_path_factory.mktemp("bench-files")
    image = photo_base64(photos["coffee"], 40, 40)
    pope = write_tsv(
        files / "POPE.tsv",
        [
            {"index": i, "image": image, "question": f"Is there a cup {i}?", "answer": a, "category": c}
            for i, c, a in POPE
        ],
    )
    mmbench_rows = circular_rows(photos, 1)  # one question and its three rotations
    mmbench = write_tsv(f"{bucket}/in/MMBench_DEV_EN.tsv", mmbench_rows)
    config = files / "bench.yaml"
    config.write_text(SUITE.format(pope=pope, mmbench=mmbench))
    output = f"{bucket}/bench/night-1"
    command = ["bench", "run", "--config", str(config), "--model", str(tiny_checkpoint)]
    argv = [*command, "--output", output, "--progress-interval", "3600"]
    workdir = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        code, stdout, stderr = run_cli(argv)
    return {
        "code": code,
        "stdout": stdout,
        "stderr": stderr,
        "command": command,
        "argv": argv,
        "output": output,
        "files": files,
        "workdir": workdir,
        "sources": {"POPE": str(pope), "MMBench_DEV_EN": mmbench},
        "answers": {
            "POPE": {i: a for i, _, a in POPE},
            "MMBench_DEV_EN": {str(r["index"]): r["answer"] for r in mmbench_rows},
        },
    }


def test_bench_run_writes_every_file_on_the_bucket(night_one, bucket):
    assert night_one["code"] == 0, night_one["stderr"][-3000:]
    output = night_one["output"]
    # One progress line per benchmark, saying which one it counts.
    lines = [line for line in night_one["stderr"].splitlines() if line.strip()]
    assert [line.split(":")[0] for line in lines] == ["progress [POPE]", "progress [MMBench_DEV_EN]"]
    assert all(": 4/4 rows (100%), " in line for line in lines)

    keys = file_keys(output)
    for name in NAMES:
        own = {k.removeprefix(f"{name}/") for k in keys if k.startswith(f"{name}/")}
        shards = {k for k in own if k.startswith("predictions/part-") and k.endswith(".parquet")}
        plots = {k for k in own if k.startswith("report/plots/") and k.endswith(".png")}
        reports = {f"report/{f}" for f in ("metrics.json", "report.md", "scores.parquet")}
        runs = {"predictions/_job.json", "predictions/_run.json"}
        assert shards and own == PREPARED | runs | reports | shards | plots, name
        assert sorted(predicted_indexes(f"{output}/{name}/predictions")) == sorted(night_one["answers"][name])
    assert keys == {k for k in keys if "/" in k} | {"metrics.json", "report.md"}

    suite = read_json(f"{output}/metrics.json")
    assert suite["output"] == output
    for name in NAMES:
        entry = suite["benchmarks"][name]
        assert (entry["questions"], entry["source"]) == (4, night_one["sources"][name])
        assert read_json(f"{output}/{name}/report/metrics.json")["metrics"] == entry["metrics"]
    # The printed table is the report's, and the last line names the report on the bucket.
    stdout = night_one["stdout"].splitlines()
    assert stdout[-1].startswith(f"report: {output}/report.md  (Ray logs: ")
    assert "\n".join(table_lines(night_one["stdout"])) in location(f"{output}/report.md").read_text()

    # Nothing on the local disk: the working folder is empty, the benchmark files' folder as it was.
    assert list(night_one["workdir"].iterdir()) == [] and not scheme_named_folders(night_one["workdir"])
    assert sorted(p.name for p in night_one["files"].iterdir()) == ["POPE.tsv", "bench.yaml"]


def test_a_rerun_does_not_run_a_finished_benchmark_again(night_one, spies, tmp_path, monkeypatch):
    """As if the first run had been killed after captioning MMBench, before scoring it: the rerun leaves
    POPE alone, finds every MMBench question committed on the bucket (no caption runs) and scores it."""
    assert night_one["code"] == 0
    output = night_one["output"]
    pope_report = location(f"{output}/POPE/report/metrics.json").read_bytes()
    before = read_json(f"{output}/metrics.json")
    location(f"{output}/MMBench_DEV_EN/report").delete_tree()
    location(f"{output}/metrics.json").delete()  # a killed run has no suite report yet

    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_cli(night_one["argv"])
    assert code == 0, stderr[-3000:]
    assert spies == {"captioned": ["MMBench_DEV_EN"], "scored": ["MMBench_DEV_EN"]}
    assert stderr == ""  # no progress line: nothing was left to caption
    resumed = read_json(f"{output}/MMBench_DEV_EN/predictions/_run.json")
    assert (resumed["skipped_already_done"], resumed["this_run"]["rows"]) == (4, 0)
    assert location(f"{output}/POPE/report/metrics.json").read_bytes() == pope_report
    after = read_json(f"{output}/metrics.json")
    assert after["metrics"] == before["metrics"]
    assert table_lines(stdout) == table_lines(night_one["stdout"])
    assert list(tmp_path.iterdir()) == []


def test_compare_reads_a_suite_report_on_the_bucket(night_one, spies, bucket, tmp_path, monkeypatch):
    """Night 2, prepared by `bench prepare` onto the bucket and answered right on every question (scripted
    predictions, as the caption job writes them): each delta is 1 minus night 1's value."""
    assert night_one["code"] == 0
    monkeypatch.chdir(tmp_path)
    night_two = f"{bucket}/bench/night-2"
    for name in NAMES:
        code, stdout, stderr = run_cli(
            ["bench", "prepare", night_one["sources"][name], f"{night_two}/{name}"]
        )
        assert code == 0, stderr
        assert (
            stdout.splitlines()[-1]
            == f"written: {night_two}/{name}/ (manifest.parquet, references.parquet, prepared.json)"
        )
        assert file_keys(f"{night_two}/{name}") == PREPARED
        said = {
            "POPE": lambda answer: f"{answer}.",
            "MMBench_DEV_EN": lambda answer: f"It is clear.\nFinal answer: {answer}",
        }[name]
        answers = night_one["answers"][name]
        shard = {
            "index": list(answers),
            "status": ["ok"] * len(answers),
            "error_type": pa.nulls(len(answers), pa.string()),
            "error_message": pa.nulls(len(answers), pa.string()),
            "caption": [said(a) for a in answers.values()],
            "reasoning": pa.nulls(len(answers), pa.string()),
        }
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(shard), sink)
        location(f"{night_two}/{name}/predictions/part-scripted.parquet").write_bytes(
            sink.getvalue().to_pybytes()
        )
        location(f"{night_two}/{name}/predictions/_run.json").write_text(json.dumps({"complete": True}))

    argv = [*night_one["command"], "--output", night_two, "--compare", night_one["output"]]
    code, stdout, stderr = run_cli(argv)
    assert code == 0, stderr[-3000:]
    assert spies == {"captioned": list(NAMES), "scored": list(NAMES)}
    assert stderr == ""  # every question is answered already: nothing is captioned
    first = read_json(f"{night_one['output']}/metrics.json")
    second = read_json(f"{night_two}/metrics.json")
    assert second["metrics"]["POPE accuracy"]["value"] == 1.0
    assert second["metrics"]["MMBench_DEV_EN circular accuracy"]["value"] == 1.0
    comparison = second["comparison"]
    assert comparison["previous_report"] == night_one["output"]
    for metric in ("POPE accuracy", "MMBench_DEV_EN circular accuracy"):
        expected = 1.0 - first["metrics"][metric]["value"]
        assert comparison["deltas"][metric]["delta"] == pytest.approx(expected), metric
    # Each benchmark's own report compares with the same benchmark of night 1, on the bucket.
    for name in NAMES:
        own = read_json(f"{night_two}/{name}/report/metrics.json")["comparison"]
        assert own["previous_report"] == f"{night_one['output']}/{name}/report"
    assert "Δ vs previous" in table_lines(stdout)[0]
    assert list(tmp_path.iterdir()) == []


def test_what_cannot_be_read_or_written_is_refused_before_work(
    night_one, spies, bucket, tmp_path, monkeypatch
):
    assert night_one["code"] == 0
    monkeypatch.chdir(tmp_path)
    missing = "s3://no-such-bucket-ovis/bench"
    run = night_one["command"]
    for argv in (
        [*run, "--output", missing],
        ["bench", "prepare", night_one["sources"]["POPE"], f"{missing}/POPE"],
    ):
        code, _, stderr = run_cli(argv)
        assert code == 2, argv
        assert stderr.startswith("error: ") and len(stderr.splitlines()) == 1, stderr
        assert f"{missing}" in stderr and "cannot be written" in stderr and "AWS_ENDPOINT_URL" in stderr

    fresh = f"{bucket}/bench/night-3"
    code, _, stderr = run_cli([*run, "--output", fresh, "--compare", f"{bucket}/bench/nowhere"])
    assert code == 2 and "no metrics.json there (is it a bench run output?)" in stderr
    assert objects(fresh) == {}  # refused before the output was touched
    assert spies == {"captioned": [], "scored": []}
    assert list(tmp_path.iterdir()) == []
