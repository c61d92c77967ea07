"""The report folder: `metrics.json` (machine-readable), `report.md` (people), `scores.parquet`, plots.

The folder is a local path or a URI (s3://, gs://, ...), written through `ovis_batch.storage`.
`metrics.json` tags every score with its scale and tokenizer, records the inputs (paths, files, the
model metadata the batch job wrote into its Parquet files), the row counts, run health and errors, and
with `--compare` the delta of every headline metric against a previous report. It is written last,
through a temporary name, so its presence marks a complete report. `report.md` shows the same numbers
as tables that read well in a terminal and on a web page, and links the PNG plots.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import pandas as pd

from ovis_batch.eval import plots
from ovis_batch.eval.data import EvalInputError
from ovis_batch.eval.health import RunHealth
from ovis_batch.eval.tasks import NO_CATEGORY, Metric, TaskResult
from ovis_batch.storage import Location, StorageError, location

FORMAT = "ovis-batch-eval/1"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
SCORES_FILE = "scores.parquet"
PLOTS_DIR = "plots"
HEALTH_TOKENIZER = "none"

# Run-health figures that get a delta in comparisons: (name, key in health summary, scale, higher is better)
HEALTH_METRICS = (
    ("error rate", "error_rate", "0-1", False),
    ("reasoning rate", "reasoning_rate", "0-1", True),
    ("thinking truncated rate", "thinking_truncated_rate", "0-1", False),
    ("answer words (mean)", "answer_words_mean", "words", True),
    ("reasoning words (mean)", "reasoning_words_mean", "words", True),
)


def load_previous(report_dir: str) -> dict[str, Any]:
    """The metrics.json of a previous report folder (for --compare)."""
    path = location(report_dir).join(METRICS_FILE)
    try:
        previous = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise EvalInputError(
            f"--compare {report_dir!r}: no {METRICS_FILE} there (is it a report folder?)"
        ) from None
    except StorageError as err:
        raise EvalInputError(f"--compare {report_dir!r}: {err}") from err
    if previous.get("format") != FORMAT:
        raise EvalInputError(f"--compare {path!r} has format {previous.get('format')!r}, expected {FORMAT!r}")
    return previous


def build_metrics(
    result: TaskResult,
    health: RunHealth,
    inputs: Mapping[str, Any],
    task_reason: str,
    previous: Mapping[str, Any] | None = None,
    previous_dir: str | None = None,
) -> dict[str, Any]:
    """The content of metrics.json (plots and files are filled in by `write_report`)."""
    info = {m.name: m for m in result.metrics}
    metrics = {m.name: _metric_entry(m) for m in result.metrics}
    health_metrics = {
        name: {
            "value": health.summary.get(key),
            "scale": scale,
            "tokenizer": HEALTH_TOKENIZER,
            "higher_is_better": up,
        }
        for name, key, scale, up in HEALTH_METRICS
    }
    document: dict[str, Any] = {
        "format": FORMAT,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "ovis_batch_version": _version(),
        "task": result.task,
        "task_reason": task_reason,
        "inputs": dict(inputs),
        "counts": result.counts,
        "metrics": metrics,
        "categories": _tagged_groups(result.categories, info),
        "breakdowns": {name: _tagged_groups(table, info) for name, table in result.breakdowns.items()},
        "health": {"metrics": health_metrics, "summary": health.summary},
        "errors_by_type": health.errors_by_type,
        "notes": result.notes,
        "comparison": None,
    }
    if previous is not None:
        document["comparison"] = compare_documents(document, previous, previous_dir)
    return document


def write_report(
    report_dir: str, document: dict[str, Any], result: TaskResult, health: RunHealth
) -> dict[str, Any]:
    """Write plots, scores.parquet, report.md and finally metrics.json into `report_dir` (a local folder
    or a URI; each file is written whole, so metrics.json marks a complete report)."""
    folder = location(report_dir)
    plot_files = _write_plots(folder, result, health)
    scores = io.BytesIO()
    result.items.to_parquet(scores, index=False)
    folder.join(SCORES_FILE).write_bytes(scores.getvalue())
    document["files"] = {"report": REPORT_FILE, "scores": SCORES_FILE, "plots": plot_files}
    folder.join(REPORT_FILE).write_text(render_markdown(document))
    text = json.dumps(json_safe(document), indent=2, allow_nan=False)
    folder.join(METRICS_FILE).write_text(text + "\n")
    return document


def check_report_folder(report_dir: str) -> None:
    """Before scoring: the report folder can be written (StorageError says why not and what to do)."""
    location(report_dir).check_writable("report folder")


# --------------------------------------------------------------------------------------------------
# metrics.json pieces
# --------------------------------------------------------------------------------------------------


def _metric_entry(metric: Metric) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "value": metric.value,
        "scale": metric.scale,
        "tokenizer": metric.tokenizer,
        "n": metric.n,
        "higher_is_better": metric.higher_is_better,
    }
    if metric.note:
        entry["note"] = metric.note
    return entry


def _tagged_groups(
    table: Mapping[str, Mapping[str, float | int | None]], info: Mapping[str, Metric]
) -> dict[str, Any]:
    out = {}
    for group, row in table.items():
        values = {}
        for name, value in row.items():
            if name == "n":
                continue
            metric = info.get(name)
            values[name] = {
                "value": value,
                "scale": metric.scale if metric else "0-1",
                "tokenizer": metric.tokenizer if metric else HEALTH_TOKENIZER,
            }
        out[group] = {"n": row["n"], "metrics": values}
    return out


def compare_documents(
    document: Mapping[str, Any], previous: Mapping[str, Any], previous_dir: str | None
) -> dict[str, Any]:
    """The delta of every metric of `document` (its `metrics` and `health.metrics` sections) against the
    same name in `previous`; a delta only where scale and tokenizer agree (else "not comparable")."""
    deltas: dict[str, Any] = {}
    sections = (
        (document["metrics"], previous.get("metrics", {})),
        (document["health"]["metrics"], previous.get("health", {}).get("metrics", {})),
    )
    for current_section, previous_section in sections:
        for name, current in current_section.items():
            before = previous_section.get(name)
            entry: dict[str, Any] = {"previous": None, "delta": None, "comparable": False}
            if before is None:
                entry["note"] = "not in the previous report"
            elif (before.get("tokenizer"), before.get("scale")) != (
                current.get("tokenizer"),
                current.get("scale"),
            ):
                entry["previous"] = before.get("value")
                entry["note"] = (
                    f"not comparable: previous used tokenizer {before.get('tokenizer')!r} and scale "
                    f"{before.get('scale')!r}"
                )
            else:
                entry["previous"] = before.get("value")
                entry["comparable"] = True
                if current.get("value") is not None and before.get("value") is not None:
                    entry["delta"] = current["value"] - before["value"]
            deltas[name] = entry
    return {
        "previous_report": previous_dir,
        "previous_created_utc": previous.get("created_utc"),
        "previous_task": previous.get("task"),
        "deltas": deltas,
    }


# --------------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------------


def render_markdown(document: Mapping[str, Any]) -> str:
    """report.md from the metrics.json document (so the two cannot disagree)."""
    lines: list[str] = [f"# Evaluation report: {document['task']}", ""]
    inputs = document["inputs"]
    comparison = document.get("comparison")
    lines += markdown_table(
        ["", ""],
        [
            ["predictions", f"`{inputs['predictions']}` ({_files(inputs.get('prediction_files'))})"],
            ["references", f"`{inputs['references']}` ({_files(inputs.get('reference_files'))})"],
            ["model", model_line(inputs.get("prediction_metadata") or {})],
            ["task", f"{document['task']} ({document['task_reason']})"],
            ["created (UTC)", document["created_utc"]],
            *(
                [
                    [
                        "compared with",
                        f"`{comparison['previous_report']}` ({comparison['previous_created_utc']})",
                    ]
                ]
                if comparison
                else []
            ),
        ],
        align="ll",
    )
    deltas = comparison["deltas"] if comparison else {}

    lines += ["", "## Headline", ""]
    header = ["metric", "value", *(["Δ vs previous"] if comparison else []), "n", "scale", "tokenizer"]
    rows = []
    for name, entry in document["metrics"].items():
        value = format_number(entry["value"]) if entry["value"] is not None else "skipped"
        rows.append(
            [
                name,
                value,
                *([format_delta(deltas.get(name))] if comparison else []),
                str(entry["n"]),
                entry["scale"],
                entry["tokenizer"],
            ]
        )
    lines += markdown_table(header, rows, align="lr" + ("r" if comparison else "") + "rll")
    notes = [f"{name}: {entry['note']}" for name, entry in document["metrics"].items() if entry.get("note")]
    notes += document.get("notes", [])
    if notes:
        lines += [""] + [f"- {note}" for note in notes]

    counts = document["counts"]
    lines += ["", "## Rows", ""]
    lines += markdown_table(
        ["", "rows"], [[k.replace("_", " "), str(v)] for k, v in counts.items()], align="lr"
    )

    plot_files = document.get("files", {}).get("plots", [])
    for title, table in _group_sections(document):
        lines += ["", f"## By {title}", ""]
        metric_names = list(next(iter(table.values()))["metrics"]) if table else []
        lines += markdown_table(
            [title, "n", *metric_names],
            [
                [group, str(row["n"]), *(format_number(row["metrics"][m]["value"]) for m in metric_names)]
                for group, row in table.items()
            ],
            align="lr" + "r" * len(metric_names),
        )
        plot = _plot_name(f"metric_by_{title}")
        if plot in plot_files:
            lines += ["", f"![metrics by {title}]({plot})"]
    recall_plot = _plot_name("recall")
    if recall_plot in plot_files:
        lines += ["", f"![retrieval recall]({recall_plot})"]

    health = document["health"]
    lines += ["", "## Reasoning health", ""]
    rows = []
    for name, entry in health["metrics"].items():
        rows.append(
            [name, format_number(entry["value"]), *([format_delta(deltas.get(name))] if comparison else [])]
        )
    lines += markdown_table(
        ["", "value", *(["Δ vs previous"] if comparison else [])],
        rows,
        align="lr" + ("r" if comparison else ""),
    )
    summary = health["summary"]
    lines += [
        "",
        f"Prediction rows in the run: {summary['rows']} ({summary['ok_rows']} ok, {summary['error_rows']} error). "
        f"Among the ok rows: with a reasoning trace {summary['with_reasoning']}, with an empty answer "
        f"{summary['empty_answers']}, with the trace left inline in the caption "
        f"{summary['reasoning_inline_in_caption']}.",
    ]
    if _plot_name("lengths") in plot_files:
        lines += ["", f"![length distributions]({_plot_name('lengths')})"]

    lines += ["", "## Errors", ""]
    errors = document["errors_by_type"]
    if errors:
        lines += markdown_table(["error type", "rows"], [[t, str(c)] for t, c in errors.items()], align="lr")
        lines += ["", "Error rows are counted here and excluded from every score above."]
        if _plot_name("errors") in plot_files:
            lines += ["", f"![errors by type]({_plot_name('errors')})"]
    else:
        lines += ["No error rows."]
    return "\n".join(lines) + "\n"


def _group_sections(document: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    sections = []
    categories = document.get("categories") or {}
    if categories and set(categories) != {NO_CATEGORY}:
        sections.append(("category", categories))
    for name, table in (document.get("breakdowns") or {}).items():
        if table:
            sections.append((name, table))
    return sections


def _write_plots(folder: Location, result: TaskResult, health: RunHealth) -> list[str]:
    written = []

    def plot(name: str) -> Location:
        written.append(_plot_name(name))
        return folder.join(_plot_name(name))

    groups = []
    if result.categories and set(result.categories) != {NO_CATEGORY}:
        groups.append(("category", result.categories))
    groups += list(result.breakdowns.items())
    for title, table in groups:
        if table and result.category_metrics:
            plots.metric_by_group(
                plot(f"metric_by_{title}"),
                f"{result.task}: metrics by {title}",
                table,
                result.category_metrics,
            )
    if result.task == "retrieval":
        recalls: dict[str, dict[int, float]] = {}
        for metric in result.metrics:
            found = re.fullmatch(r"(.+) R@(\d+)", metric.name)
            if found and metric.value is not None:
                recalls.setdefault(found.group(1), {})[int(found.group(2))] = metric.value
        plots.recall_bars(plot("recall"), recalls)
    plots.length_histograms(plot("lengths"), health.answer_words, health.reasoning_words)
    if health.errors_by_type:
        plots.error_breakdown(plot("errors"), health.errors_by_type)
    return written


def _plot_name(name: str) -> str:
    return f"{PLOTS_DIR}/{re.sub(r'[^A-Za-z0-9_]+', '_', name)}.png"


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A Markdown table, padded so that it also reads as plain text; `align` is "l" or "r" per column."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    widths = [max(w, 3) for w in widths]

    def line(cells: list[str]) -> str:
        padded = [
            str(c).rjust(w) if a == "r" else str(c).ljust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "| "
        + " | ".join(
            ("-" * (w - 1) + ":") if a == "r" else "-" * w for w, a in zip(widths, align, strict=True)
        )
        + " |"
    )
    return [line(header), rule, *(line(r) for r in rows)]


def _files(count: int | None) -> str:
    return "? files" if count is None else f"{count} file{'s' if count != 1 else ''}"


def format_number(value: float | int | None) -> str:
    """A score for a table: whole numbers from 10 up without decimals, others with four."""
    if value is None:
        return "n/a"
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 10):
        return f"{value:.0f}"
    return f"{value:.4f}"


def format_delta(entry: Mapping[str, Any] | None) -> str:
    """A delta entry of `compare_documents` for a table: signed, "n/a" when not comparable."""
    if not entry:
        return ""
    if not entry["comparable"]:
        return "n/a"
    if entry["delta"] is None:
        return "n/a"
    return f"{entry['delta']:+.4f}"


def model_line(metadata: Mapping[str, Any]) -> str:
    """What produced the predictions, from the batch job's `ovis_batch` Parquet metadata."""
    job = metadata.get("ovis_batch")
    if not isinstance(job, Mapping):
        return "(no ovis_batch metadata in the prediction files)"
    model = job.get("model") or {}
    shown = [str(model.get("name", "?"))]
    if model.get("revision"):
        shown.append(f"revision {model['revision']}")
    if model.get("weights_sha256"):
        shown.append(f"weights {str(model['weights_sha256'])[:12]}")
    if model.get("random_weights"):
        shown.append("RANDOM WEIGHTS")
    if job.get("prompt"):
        shown.append(f"prompt {json.dumps(job['prompt'])}")
    embedding = job.get("embedding") or {}
    if embedding.get("strategy"):
        shown.append(f"embedding {embedding['strategy']} (dim {embedding.get('dim')})")
    if job.get("package_version"):
        shown.append(f"ovis-batch {job['package_version']}")
    return "; ".join(shown)


def json_safe(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _version() -> str:
    from ovis_batch import __version__

    return __version__


def scores_frame(path: str) -> pd.DataFrame:
    """The per-item scores of a report folder (`scores.parquet`)."""
    return pd.read_parquet(io.BytesIO(location(path).join(SCORES_FILE).read_bytes()))
