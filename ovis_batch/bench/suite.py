"""Where a suite's results live, each benchmark's report, and the suite report.

The output folder of `ovis-batch bench run`:

    OUT/
      report.md                     the suite: scores (benchmarks x metrics, deltas), questions, error and
                                    unparseable counts, per-category tables
      metrics.json                  the same numbers (and a flat `metrics` section for trend reports);
                                    written last: it marks a complete suite
      NAME/                         one folder per benchmark
        manifest.parquet, references.parquet, prepared.json    (`ovis_batch.bench.prepare`)
        predictions/                the caption job's output (resumable, exactly once)
        report/                     metrics.json, report.md, scores.parquet (per question), plots/

A benchmark is finished when `NAME/report/metrics.json` exists and records the same stamp (model
weights, caption settings, prepared references) as the run now: it is not run again. OUT (and a
`--compare` folder) is a local folder or a URI (s3://, gs://, ...): everything under it is joined, read
and written through `ovis_batch.storage`.
"""

from __future__ import annotations

import datetime
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ovis_batch.bench.prepare import (
    ID_COLUMN,
    MANIFEST_FILE,
    REFERENCES_FILE,
    PrepareOptions,
    prepare_benchmark,
    prepared_is_current,
    read_prepared,
)
from ovis_batch.config import CaptionConfig
from ovis_batch.eval.benchmarks import score_benchmark
from ovis_batch.eval.data import EvalInputError, load_predictions
from ovis_batch.eval.health import run_health
from ovis_batch.eval.report import (
    METRICS_FILE,
    REPORT_FILE,
    build_metrics,
    compare_documents,
    format_delta,
    format_number,
    json_safe,
    load_previous,
    markdown_table,
    model_line,
    write_report,
)
from ovis_batch.eval.tasks import NO_CATEGORY
from ovis_batch.pipeline.output import RUN_FILE, OutputError
from ovis_batch.storage import Location, StorageError, location

SUITE_FORMAT = "ovis-batch-bench/1"
PREDICTIONS_DIR = "predictions"
BENCHMARK_REPORT_DIR = "report"


@dataclass(frozen=True)
class BenchmarkFolder:
    """`OUT/NAME`: one benchmark's prepared files, predictions and report."""

    root: Location

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def manifest(self) -> Location:
        return self.root.join(MANIFEST_FILE)

    @property
    def predictions(self) -> Location:
        return self.root.join(PREDICTIONS_DIR)

    @property
    def report_dir(self) -> Location:
        return self.root.join(BENCHMARK_REPORT_DIR)

    def prepare(self, source: str, options: PrepareOptions, *, overwrite: bool = False) -> None:
        """Prepare the benchmark here unless it is prepared from the same file with the same options; a
        folder whose predictions answer another version of the benchmark is refused (`overwrite`: the
        folder is removed and prepared afresh)."""
        if overwrite:
            self.root.delete_tree()
        if prepared_is_current(self.root, source, options):
            return
        if self.predictions.exists():
            raise OutputError(
                f"{self.root} holds predictions for another version of {self.name} (another file or other "
                "options); they do not answer these questions. Use another --output, or --overwrite to start afresh"
            )
        prepare_benchmark(source, self.root, options)

    def stamp(self, weights_sha256: str, settings: CaptionConfig) -> dict[str, Any]:
        """What the benchmark's scores depend on: the model weights, the caption settings that decide the
        outputs, and the prepared questions (source file and options)."""
        prepared = read_prepared(self.root)
        return {
            "weights_sha256": weights_sha256,
            "settings": settings.generation_settings(),
            "prepared": {k: prepared[k] for k in ("source", "options")},
        }

    def captions_complete(self) -> bool:
        """The caption job's last run over this benchmark committed every question (its `_run.json`)."""
        try:
            return json.loads(self.predictions.join(RUN_FILE).read_bytes()).get("complete") is True
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    def report(self) -> dict[str, Any] | None:
        """The benchmark's metrics.json, or None when it has not been scored."""
        try:
            return json.loads(self.report_dir.join(METRICS_FILE).read_bytes())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_scored(self, stamp: Mapping[str, Any]) -> bool:
        """Scored completely, by the same model and settings, on the same prepared references."""
        report = self.report()
        return report is not None and (report.get("inputs") or {}).get("bench_stamp") == json_safe(
            dict(stamp)
        )


def score_benchmark_folder(
    folder: BenchmarkFolder, stamp: Mapping[str, Any], previous_suite: str | None = None
) -> dict[str, Any]:
    """Score the predictions of a prepared benchmark and write its report folder; returns its metrics.json.

    `previous_suite`: a previous suite output; the benchmark's report there (if any) gets the deltas.
    """
    prepared = read_prepared(folder.root)
    if prepared is None:
        raise EvalInputError(f"{folder.root} is not a prepared benchmark (no complete prepared.json)")
    references_file = folder.root.join(REFERENCES_FILE)
    references = pd.read_parquet(io.BytesIO(references_file.read_bytes()))
    predictions = load_predictions(str(folder.predictions), id_column=ID_COLUMN)
    result = score_benchmark(prepared["name"], prepared["task"], prepared["scoring"], predictions, references)
    previous_dir = (
        location(previous_suite).join(folder.name, BENCHMARK_REPORT_DIR) if previous_suite else None
    )
    previous = (
        load_previous(str(previous_dir))
        if previous_dir and previous_dir.join(METRICS_FILE).exists()
        else None
    )
    inputs = {
        "predictions": str(folder.predictions),
        "prediction_files": len(predictions.files),
        "prediction_metadata": predictions.metadata,
        "references": str(references_file),
        "reference_files": 1,
        "id_column": ID_COLUMN,
        "benchmark": {k: prepared[k] for k in ("name", "source", "task", "scoring", "prompt", "images")}
        | {"questions": prepared["questions"], "skipped_without_image": prepared["skipped_without_image"]},
        "bench_stamp": dict(stamp),
    }
    reason = f"{prepared['task']} benchmark scored by {prepared['scoring']} ({prepared['scoring_reason']})"
    health = run_health(predictions.frame)
    document = build_metrics(
        result, health, inputs, reason, previous, str(previous_dir) if previous else None
    )
    return write_report(str(folder.report_dir), document, result, health)


# --------------------------------------------------------------------------------------------------
# the suite report
# --------------------------------------------------------------------------------------------------


def load_previous_suite(path: str) -> dict[str, Any]:
    """The metrics.json of a previous suite output (`--compare`): another night, another checkpoint."""
    file = location(path).join(METRICS_FILE)
    try:
        document = json.loads(file.read_bytes())
    except FileNotFoundError as exc:
        raise EvalInputError(
            f"--compare {path}: no {METRICS_FILE} there (is it a bench run output?)"
        ) from exc
    except StorageError as exc:
        raise EvalInputError(f"--compare {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise EvalInputError(f"--compare {file} is not valid JSON ({exc})") from exc
    if document.get("format") != SUITE_FORMAT:
        raise EvalInputError(
            f"--compare {file} has format {document.get('format')!r}, expected {SUITE_FORMAT!r}"
        )
    return document


def suite_document(
    output: str | os.PathLike | Location,
    model: str,
    reports: Mapping[str, Mapping[str, Any]],
    previous: Mapping[str, Any] | None = None,
    previous_dir: str | None = None,
) -> dict[str, Any]:
    """The suite's metrics.json from each benchmark's metrics.json (in suite order)."""
    benchmarks, flat = {}, {}
    questions = errors = 0
    for name, report in reports.items():
        counts, info = report["counts"], report["inputs"]["benchmark"]
        benchmarks[name] = {
            "task": info["task"],
            "scoring": info["scoring"],
            "source": info["source"]["uri"],
            "questions": counts["questions"],
            "error_rows": counts["error_rows_scored_wrong"],
            "unparseable": counts["unparseable"],
            "skipped_without_image": info["skipped_without_image"]["count"],
            "prompt": info["prompt"],
            "images": info["images"],
            "thinking": bool(report["inputs"]["bench_stamp"]["settings"].get("thinking")),
            "metrics": report["metrics"],
            "categories": report["categories"],
            "breakdowns": report["breakdowns"],
            "notes": report["notes"],
            "report": f"{name}/{BENCHMARK_REPORT_DIR}/{REPORT_FILE}",
        }
        flat |= {f"{name} {metric}": entry for metric, entry in report["metrics"].items()}
        questions += counts["questions"]
        errors += counts["error_rows_scored_wrong"]
    first = next(iter(reports.values()))
    document: dict[str, Any] = {
        "format": SUITE_FORMAT,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "output": str(output),
        "model": model,
        "model_metadata": first["inputs"].get("prediction_metadata") or {},
        "benchmarks": benchmarks,
        "metrics": flat,
        "health": {
            "metrics": {
                "error rate": {
                    "value": errors / questions if questions else None,
                    "scale": "0-1",
                    "tokenizer": "none",
                    "higher_is_better": False,
                }
            }
        },
        "comparison": None,
    }
    if previous is not None:
        document["comparison"] = compare_documents(document, previous, previous_dir)
    return document


def write_suite_report(output: str | os.PathLike | Location, document: dict[str, Any]) -> dict[str, Any]:
    """report.md, then metrics.json (last: it marks a complete suite)."""
    folder = location(output)
    folder.join(REPORT_FILE).write_text(render_suite(document))
    text = json.dumps(json_safe(document), indent=2, allow_nan=False)
    folder.join(METRICS_FILE).write_text(text + "\n")
    return document


def scores_table(document: Mapping[str, Any]) -> list[str]:
    """Benchmarks x metrics, with the question, error-row and unparseable counts (and deltas)."""
    comparison = document.get("comparison")
    deltas = comparison["deltas"] if comparison else {}
    header = ["benchmark", "questions", "error rows", "unparseable", "metric", "value"]
    header += ["Δ vs previous"] if comparison else []
    rows = []
    for name, bench in document["benchmarks"].items():
        for i, (metric, entry) in enumerate(bench["metrics"].items()):
            counts = [str(bench["questions"]), str(bench["error_rows"]), str(bench["unparseable"])]
            row = [name if i == 0 else "", *(counts if i == 0 else ["", "", ""]), metric]
            row.append(format_number(entry["value"]))
            if comparison:
                row.append(format_delta(deltas.get(f"{name} {metric}")))
            rows.append(row)
    return markdown_table(header, rows, align="lrrrlr" + ("r" if comparison else ""))


def render_suite(document: Mapping[str, Any]) -> str:
    """The suite's report.md from its metrics.json document."""
    comparison = document.get("comparison")
    facts = [
        [
            "model",
            model_line(document["model_metadata"]) if document["model_metadata"] else document["model"],
        ],
        ["output", f"`{document['output']}`"],
        ["created", document["created_utc"]],
    ]
    if comparison:
        facts.append(
            ["compared with", f"`{comparison['previous_report']}` ({comparison['previous_created_utc']})"]
        )
    lines = ["# Benchmark report", "", *markdown_table(["", ""], facts, align="ll")]
    lines += ["", "## Scores", "", *scores_table(document)]
    lines += [
        "",
        "Scores are on a 0-1 scale (MME: points), computed by VLMEvalKit's rules without an LLM judge; "
        "error rows and unparseable answers count as wrong.",
    ]

    lines += ["", "## Questions and prompts", ""]
    rows = []
    for name, bench in document["benchmarks"].items():
        images = bench["images"]
        rows.append(
            [
                f"[{name}]({bench['report']})",
                bench["task"],
                bench["scoring"],
                str(bench["questions"]),
                str(bench["skipped_without_image"]),
                str(images["questions_with_several"]),
                "on" if bench["thinking"] else "off",
                bench["prompt"]["instruction"],
            ]
        )
    header = ["benchmark", "task", "scoring", "questions", "skipped (no image)", "several images"]
    lines += markdown_table([*header, "thinking", "closing instruction"], rows, align="lllrrrll")
    policies = {b["images"]["policy"] for b in document["benchmarks"].values() if b["images"]["policy"]}
    lines += [""] + [f"- {policy}" for policy in sorted(policies)]
    lines += [f"- prompts: {next(iter(document['benchmarks'].values()))['prompt']['style']}"]

    for name, bench in document["benchmarks"].items():
        sections = []
        if bench["categories"] and set(bench["categories"]) != {NO_CATEGORY}:
            sections.append(("category", bench["categories"]))
        sections += [(title, table) for title, table in bench["breakdowns"].items() if table]
        for title, table in sections:
            metric_names = list(next(iter(table.values()))["metrics"])
            lines += ["", f"## {name} by {title}", ""]
            lines += markdown_table(
                [title, "n", *metric_names],
                [
                    [group, str(row["n"]), *(format_number(row["metrics"][m]["value"]) for m in metric_names)]
                    for group, row in table.items()
                ],
                align="lr" + "r" * len(metric_names),
            )
        if bench["notes"]:
            lines += ["", f"{name}:", *(f"- {note}" for note in bench["notes"])]
    return "\n".join(lines) + "\n"
