"""PNG plots for the evaluation report (matplotlib, Agg backend: no display needed).

Each function writes one PNG file (a local path or a URI, through `ovis_batch.storage`) and returns its URI; the report links them. Nothing here computes a
metric.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from ovis_batch.storage import Location


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def metric_by_group(
    target: Location,
    title: str,
    table: Mapping[str, Mapping[str, float | int | None]],
    metrics: Sequence[str],
) -> str:
    """Horizontal bars of each metric per group (category, answer type), with the group sizes."""
    plt = _pyplot()
    groups = list(table)
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(4.2 * len(metrics), 0.45 * len(groups) + 1.6), squeeze=False, sharey=True
    )
    y = np.arange(len(groups))
    for ax, metric in zip(axes[0], metrics, strict=True):
        values = [table[g].get(metric) for g in groups]
        ax.barh(y, [v if v is not None else 0 for v in values], color="#4C72B0")
        for yi, v in zip(y, values, strict=True):
            ax.text(
                v if v is not None else 0,
                yi,
                f" {v:.3f}" if v is not None else " n/a",
                va="center",
                fontsize=8,
            )
        ax.set_title(metric)
        ax.set_yticks(y, [f"{g} (n={table[g]['n']})" for g in groups])
        ax.invert_yaxis()
        ax.margins(x=0.25)
    fig.suptitle(title)
    return _save(fig, plt, target)


def length_histograms(target: Location, answer_words: np.ndarray, reasoning_words: np.ndarray) -> str:
    """Histograms of answer length and reasoning-trace length, in words."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, values, label in (
        (axes[0], answer_words, "answer length (words)"),
        (axes[1], reasoning_words, "reasoning length (words)"),
    ):
        if len(values):
            ax.hist(values, bins=min(40, max(5, len(np.unique(values)))), color="#55A868")
            ax.axvline(float(np.median(values)), color="black", linestyle="--", linewidth=1, label="median")
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(label)
        ax.set_ylabel("rows")
    return _save(fig, plt, target)


def error_breakdown(target: Location, errors_by_type: Mapping[str, int]) -> str:
    """Bars of error rows per error type."""
    plt = _pyplot()
    types = list(errors_by_type)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(types) + 1.4))
    ax.barh(np.arange(len(types)), [errors_by_type[t] for t in types], color="#C44E52")
    ax.set_yticks(np.arange(len(types)), types)
    ax.invert_yaxis()
    ax.set_xlabel("error rows")
    ax.set_title("error rows by type")
    return _save(fig, plt, target)


def recall_bars(target: Location, recalls: Mapping[str, Mapping[int, float]]) -> str:
    """Grouped bars of Recall@k per retrieval direction."""
    plt = _pyplot()
    directions = list(recalls)
    ks = sorted({k for r in recalls.values() for k in r})
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / len(directions)
    for i, direction in enumerate(directions):
        values = [recalls[direction][k] for k in ks]
        bars = ax.bar(np.arange(len(ks)) + i * width, values, width, label=direction)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(np.arange(len(ks)) + width * (len(directions) - 1) / 2, [f"R@{k}" for k in ks])
    ax.set_ylim(0, 1.1)
    ax.legend()
    ax.set_title("retrieval recall")
    return _save(fig, plt, target)


def _save(fig, plt, target: Location) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    target.write_bytes(buffer.getvalue())
    return target.uri
