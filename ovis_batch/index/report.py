"""What the index commands print: run summaries, `index info`, and search results as a table or JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import pyarrow.fs as pafs

from ovis_batch.index.errors import IndexFolderError
from ovis_batch.index.folder import ID_MAP_FILE, IdMap, IndexManifest, read_manifest
from ovis_batch.index.search import SearchHit
from ovis_batch.storage import location


def format_run_summary(action: str, index_dir: str | os.PathLike, manifest: IndexManifest) -> str:
    """One paragraph on what a build or add did."""
    entry, recall = manifest.history[-1], manifest.recall
    if recall.parameter is None:
        measured = "exact search"
    else:
        measured = f"recall@{recall.k} {recall.value:.3f} at {recall.parameter} {recall.parameter_value}"
        if recall.below_floor:
            measured += f", BELOW the floor {recall.floor}"
    return (
        f"{action} {index_dir}: {manifest.kind} index of {manifest.count} vectors ({measured})\n"
        f"this run: {entry.added} added, {entry.replaced} replaced, {entry.duplicates_in_input} duplicate ids "
        f"in the input, {entry.error_rows} error rows, {entry.without_embedding} without embedding, "
        f"{entry.skipped_bad_vectors} bad vectors skipped; {entry.seconds:.1f} s"
    )


def describe_index(folder: str | os.PathLike) -> dict[str, Any]:
    """index.json plus the folder's file sizes, checked against the id map (the FAISS file is not loaded)."""
    folder = location(folder)
    manifest = read_manifest(folder)
    id_rows = IdMap(folder.join(ID_MAP_FILE)).rows()
    if id_rows != manifest.count:
        raise IndexFolderError(
            f"{folder} is inconsistent: the id map has {id_rows} rows, index.json says {manifest.count}; "
            "rebuild the index"
        )
    info = manifest.model_dump()
    info["files"] = {i.base_name: i.size for i in folder.list() if i.type == pafs.FileType.File}
    return info


def format_index_info(info: dict[str, Any], fmt: str) -> str:
    """`describe_index`'s result as JSON or as labelled lines."""
    if fmt == "json":
        return json.dumps(info, indent=2)
    recall, last = info["recall"], info["history"][-1]
    lines = {
        "model": ", ".join(f"{key} {value}" for key, value in info["model"].items() if value),
        "embedding": f"{info['embedding']['strategy']}, dim {info['embedding']['dim']}",
        "kind": f"{info['kind']} (asked: {info['requested_kind']}) {info['build']}",
        "count": f"{info['count']} vectors, id column {info['id_column']!r}",
        "search": ", ".join(f"{key} {value}" for key, value in info["search"].items()) or "exact",
        "recall": f"@{recall['k']} {recall['value']} on {recall['queries']} queries with "
        f"{recall['count_at_measurement']} vectors (floor {recall['floor']}"
        f"{', BELOW' if recall['below_floor'] else ''})",
        "history": f"{len(info['history'])} run(s); last: {last['action']} of {last['embeddings']} at {last['at']}",
        "files": ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in info["files"].items()),
        "format": f"version {info['format_version']}, written by ovis-batch {info['package_version']}",
    }
    return "\n".join(f"{key:>9}: {value}" for key, value in lines.items())


def format_hits(hits: Sequence[SearchHit], fmt: str, query: dict[str, str]) -> str:
    """Search results as an aligned table (captions cut to one line of 80 characters) or as JSON."""
    if fmt == "json":
        return json.dumps(
            {"query": query, "results": [asdict(h) for h in hits]}, indent=2, ensure_ascii=False
        )
    if not hits:
        return "no results (the index is empty)"
    rows = [("rank", "id", "score", "caption")] + [
        (str(h.rank), h.id, f"{h.score:.4f}", _one_line(h.caption, 80)) for h in hits
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        f"{r[0]:>{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip() for r in rows
    )


def _one_line(text: str | None, width: int) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
