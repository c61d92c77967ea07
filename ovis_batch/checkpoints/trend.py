"""Evaluating a training run checkpoint by checkpoint: where each result lives, and the trend report.

The report folder of `ovis-batch eval-checkpoints`:

    REPORT/
      trend.md, trend.csv, plots/*.png     every metric against the global step, beside the training loss
      trend.json                           the same numbers; written last, so it marks a complete report
      checkpoints/checkpoint-N/
        checkpoint.json                    which checkpoint files (names, sizes, times) these results are of
        predictions/                       the batch job's output (resumable)
        eval/                              the evaluation report (its metrics.json marks it complete)

REPORT is a local folder or a URI (s3://, gs://, ...): everything under it goes through
`ovis_batch.storage`. A checkpoint is "already scored" when its `eval/metrics.json` exists and `checkpoint.json` still
matches the checkpoint's files; a checkpoint rewritten since (a restarted run) is scored afresh.

What does not live here: running the batch job or the evaluation (`workflows/eval_checkpoints.py`
calls them), and metrics (`ovis_batch.eval`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ovis_batch.checkpoints.layout import (
    CheckpointLayout,
    checkpoint_stamp,
    describe_checkpoint,
    local_folder,
    training_run_checkpoints,
)
from ovis_batch.model.checkpoint import CheckpointError
from ovis_batch.storage import Location, location

TREND_FORMAT = "ovis-batch-trend/1"
STAMP_FILE = "checkpoint.json"
EVAL_METRICS = "metrics.json"  # the evaluation report's completion marker
# Run-health figures shown beside the task metrics (name in the evaluation's metrics.json health section).
HEALTH_SHOWN = ("error rate",)


@dataclass(frozen=True)
class RunCheckpoint:
    """One `checkpoint-N` of a run, checked, with where its results go."""

    step: int
    layout: CheckpointLayout
    stamp: str
    folder: Location  # REPORT/checkpoints/checkpoint-N

    @property
    def path(self) -> Path:
        return self.layout.path

    @property
    def predictions(self) -> Location:
        return self.folder.join("predictions")

    @property
    def eval_dir(self) -> Location:
        return self.folder.join("eval")

    def is_scored(self) -> bool:
        """Evaluated completely, and of these very checkpoint files."""
        return self.eval_dir.join(EVAL_METRICS).is_file() and self._recorded_stamp() == self.stamp

    def prepare(self) -> None:
        """Make the folder ready: results of an older version of this checkpoint are removed first."""
        if self._recorded_stamp() != self.stamp:
            self.folder.delete_tree()
        record = {"checkpoint": str(self.path.resolve()), "global_step": self.step, "stamp": self.stamp}
        self.folder.join(STAMP_FILE).write_text(json.dumps(record, indent=2) + "\n")

    def _recorded_stamp(self) -> str | None:
        try:
            return json.loads(self.folder.join(STAMP_FILE).read_bytes()).get("stamp")
        except (FileNotFoundError, json.JSONDecodeError, AttributeError):
            return None


def find_run_checkpoints(run_dir: str | os.PathLike, report_dir: str | os.PathLike) -> list[RunCheckpoint]:
    """Every `checkpoint-N` of the run, in step order, each checked before any work starts."""
    run_dir = local_folder(run_dir, "training run")
    report = location(report_dir)
    found = training_run_checkpoints(run_dir)
    if not found:
        raise CheckpointError(
            f"{run_dir} holds no checkpoint-N folders; pass the Trainer's output_dir of the training run"
        )
    checkpoints = []
    for step, path in found:
        layout = describe_checkpoint(path)  # every bad input stops here, naming its file
        if layout.trainer_state is not None and layout.trainer_state.global_step != step:
            layout.notes.append(f"trainer_state.json says global step {layout.trainer_state.global_step}")
        folder = report.join("checkpoints", path.name)
        checkpoints.append(RunCheckpoint(step, layout, checkpoint_stamp(layout), folder))
    return checkpoints


@dataclass
class CheckpointScores:
    """One row of the trend: a checkpoint's step, training state and evaluation scores."""

    step: int
    checkpoint: str
    epoch: float | None
    train_loss: float | None  # the last training loss logged at or before this step
    metrics: dict[str, float | None] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    report: str | None = None  # the evaluation's report.md, relative to the trend report


def checkpoint_scores(checkpoint: RunCheckpoint, report_dir: str | os.PathLike) -> CheckpointScores:
    """Read a scored checkpoint's evaluation `metrics.json` into a trend row."""
    metrics_file = checkpoint.eval_dir.join(EVAL_METRICS)
    try:
        document = json.loads(metrics_file.read_bytes())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{metrics_file} is missing or not valid JSON ({exc}); evaluate it again"
        ) from exc
    state = checkpoint.layout.trainer_state
    row = CheckpointScores(
        step=checkpoint.step,
        checkpoint=checkpoint.path.name,
        epoch=state.epoch if state else None,
        train_loss=state.last_loss if state else None,
        report=posixpath.relpath(checkpoint.eval_dir.join("report.md").path, location(report_dir).path),
    )
    health = (document.get("health") or {}).get("metrics") or {}
    entries = {**document.get("metrics", {}), **{k: health[k] for k in HEALTH_SHOWN if k in health}}
    for name, entry in entries.items():
        value = entry.get("value")
        row.metrics[name] = float(value) if isinstance(value, int | float) and math.isfinite(value) else None
        row.higher_is_better[name] = bool(entry.get("higher_is_better", True))
    return row


def write_trend_report(
    report_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    rows: list[CheckpointScores],
    loss_curve: tuple[tuple[int, float], ...] = (),
) -> dict[str, Any]:
    """trend.csv, trend.md and one PNG per metric (metric and training loss against the step); trend.json last."""
    report = location(report_dir)
    rows = sorted(rows, key=lambda r: r.step)
    names = list(dict.fromkeys(name for row in rows for name in row.metrics))
    plots = {name: _plot_metric(report, name, rows, loss_curve) for name in names}
    best = {name: _best(rows, name) for name in names}
    report.join("trend.csv").write_text(_csv(rows, names))
    report.join("trend.md").write_text(_markdown(run_dir, rows, names, best, plots))
    document = {
        "format": TREND_FORMAT,
        "run": str(Path(run_dir).resolve()),
        "metrics": names,
        "checkpoints": [row.__dict__ for row in rows],
        "best": best,
        "loss_curve": [list(point) for point in loss_curve],
        "files": {"table": "trend.md", "csv": "trend.csv", "plots": plots},
    }
    report.join("trend.json").write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    return document


# ------------------------------------------------------------------------------------------- internals


def _best(rows: list[CheckpointScores], name: str) -> dict[str, Any] | None:
    scored = [r for r in rows if r.metrics.get(name) is not None]
    if not scored:
        return None
    pick = max if scored[0].higher_is_better.get(name, True) else min
    top = pick(scored, key=lambda r: r.metrics[name])
    return {"step": top.step, "checkpoint": top.checkpoint, "value": top.metrics[name]}


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _csv(rows: list[CheckpointScores], names: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["step", "checkpoint", "epoch", "train_loss", *names])
    for r in rows:
        writer.writerow([r.step, r.checkpoint, r.epoch, r.train_loss, *(r.metrics.get(n) for n in names)])
    return out.getvalue()


def _markdown(
    run_dir: str | os.PathLike,
    rows: list[CheckpointScores],
    names: list[str],
    best: dict[str, Any],
    plots: dict[str, str],
) -> str:
    header = ["step", "checkpoint", "epoch", "train loss", *names]
    lines = [
        f"# Checkpoint trend: {Path(run_dir).name}",
        "",
        f"Training run `{Path(run_dir).resolve()}`, {len(rows)} checkpoint(s). Training loss: the last value "
        "logged at or before each step (`trainer_state.json`).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i != 1 else ":---" for i in range(len(header))) + "|",
    ]
    for r in rows:
        link = f"[{r.checkpoint}]({r.report})" if r.report else r.checkpoint
        cells = [
            str(r.step),
            link,
            _number(r.epoch),
            _number(r.train_loss),
            *(_number(r.metrics.get(n)) for n in names),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Best checkpoint per metric", ""]
    for name in names:
        b = best[name]
        lines.append(
            f"- {name}: "
            + ("n/a" if b is None else f"{_number(b['value'])} at step {b['step']} ({b['checkpoint']})")
        )
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def _plot_metric(
    report: Location, name: str, rows: list[CheckpointScores], loss_curve: tuple[tuple[int, float], ...]
) -> str:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    points = [(r.step, r.metrics.get(name)) for r in rows if r.metrics.get(name) is not None]
    if points:
        ax.plot(*zip(*points, strict=True), marker="o", color="tab:blue", label=name)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("global step")
    ax.set_ylabel(name, color="tab:blue")
    ax.set_title(f"{name} by checkpoint")
    losses = list(loss_curve) or [(r.step, r.train_loss) for r in rows if r.train_loss is not None]
    if losses:
        twin = ax.twinx()
        twin.plot(*zip(*losses, strict=True), color="tab:gray", alpha=0.7, label="training loss")
        twin.set_ylabel("training loss", color="tab:gray")
    fig.tight_layout()
    filename = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() + ".png"
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    report.join("plots", filename).write_bytes(image.getvalue())
    return f"plots/{filename}"
