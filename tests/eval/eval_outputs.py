"""Synthetic batch-job outputs for evaluation tests: Parquet shards following the output contract.

The shards look like the job's: several part files, error rows with a type and message, reasoning
traces (some truncated, one left inline in the caption), embeddings, token counts, model metadata, and
the non-data files a job leaves (`_run.json`, a hidden temporary part) that readers must skip.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

EMBEDDING_DIM = 8
# what the caption job writes under the `ovis_batch` key (ovis_batch/pipeline/job.py)
METADATA = {
    "format_version": 1,
    "package_version": "0.1.0",
    "model": {
        "name": "tiny-ovis",
        "revision": None,
        "weights_sha256": "ab12" * 16,
        "model_type": "ovis2_5",
        "random_weights": True,
    },
    "generation": {"max_new_tokens": 64, "do_sample": False},
    "prompt": "Describe the image.",
    "embedding": {"strategy": "last_token", "dim": EMBEDDING_DIM},
    "id_column": "image_id",
}


def contract_schema(dim: int = EMBEDDING_DIM) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("status", pa.string()),
            ("error_type", pa.string()),
            ("error_message", pa.string()),
            ("caption", pa.string()),
            ("reasoning", pa.string()),
            ("thinking_truncated", pa.bool_()),
            ("embedding", pa.list_(pa.float32(), dim)),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("input_width", pa.int32()),
            ("input_height", pa.int32()),
            ("visual_tokens", pa.int32()),
            ("prompt_tokens", pa.int32()),
            ("output_tokens", pa.int32()),
            ("reasoning_tokens", pa.int32()),
        ],
        metadata={"ovis_batch": json.dumps(METADATA, sort_keys=True)},
    )


def write_predictions(folder: Path, rows: list[dict], shards: int = 3, dim: int = EMBEDDING_DIM) -> Path:
    """Write `rows` (dicts with at least image_id, status and caption or error fields) as part files."""
    folder.mkdir(parents=True, exist_ok=True)
    schema = contract_schema(dim)
    full = []
    for row in rows:
        ok = row["status"] == "ok"
        caption = row.get("caption") if ok else None
        reasoning = row.get("reasoning")
        full.append(
            {
                "image_id": row["image_id"],
                "status": row["status"],
                "error_type": row.get("error_type") if not ok else None,
                "error_message": row.get("error_message") if not ok else None,
                "caption": caption,
                "reasoning": reasoning,
                "thinking_truncated": bool(row.get("thinking_truncated", False)) if ok else None,
                "embedding": row.get("embedding") if ok else None,
                "width": 640,
                "height": 480,
                "input_width": 640 if ok else None,
                "input_height": 480 if ok else None,
                "visual_tokens": 300 if ok else None,
                "prompt_tokens": 320 if ok else None,
                "output_tokens": (len((caption or "").split()) + len((reasoning or "").split()))
                if ok
                else None,
                "reasoning_tokens": len((reasoning or "").split()) if ok else None,
            }
        )
    for shard, part in enumerate(np.array_split(np.arange(len(full)), shards)):
        table = pa.Table.from_pylist([full[i] for i in part], schema=schema)
        pq.write_table(table, folder / f"part-{shard:05d}.parquet")
    # what a job leaves besides data: a run manifest and an unfinished temporary part
    (folder / "_run.json").write_text(json.dumps({"complete": True}))
    pq.write_table(pa.Table.from_pylist(full[:1], schema=schema), folder / ".part-00099.parquet.tmp.parquet")
    return folder


def write_references(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_text_embeddings(
    path: Path, ids: list[str], captions: list[str], vectors: np.ndarray, metadata: dict | None = None
) -> Path:
    """The text embeddings Parquet format of `ovis_batch.eval.retrieval` (as `ovis-batch embed-texts`)."""
    table = pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.astype(np.float32).ravel()), vectors.shape[1]
            ),
        }
    )
    if metadata is not None:
        table = table.replace_schema_metadata({"ovis_batch": json.dumps(metadata, sort_keys=True)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
