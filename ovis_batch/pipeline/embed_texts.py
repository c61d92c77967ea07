"""Text embeddings of reference captions, for retrieval scoring and text search: the text side of the
embedding space the caption job writes for images.

Input: a Parquet file or folder keyed by the id column, with either a list-of-strings column
(`references`, as the evaluation reads them) or one caption per row (`caption`). Output: the *text
embeddings Parquet* that `ovis_batch.eval.retrieval` defines (id, caption, embedding; one row per
caption) plus the same `ovis_batch` key-value metadata as the caption job's shards (model identity,
embedding strategy and dimension), written atomically as one file. Runs in one process: a text costs a
short LLM prefill, a thousand times less than an image with its vision pass.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import ovis_batch
from ovis_batch.checkpoints import model_identity
from ovis_batch.pipeline.manifest import ManifestError, open_manifest
from ovis_batch.pipeline.output import METADATA_KEY, TMP_DIR, OutputFolder

EMBEDDINGS_FILE = "text_embeddings.parquet"


def read_captions(references: str, id_column: str, column: str | None) -> tuple[list[Any], list[str]]:
    """(ids, captions), one pair per caption, in file order; empty captions are an error naming the id."""
    manifest = open_manifest(references, [id_column])
    names = manifest.schema.names
    column = column or next((c for c in ("references", "caption", "captions") if c in names), None)
    if column is None or column not in names:
        raise ManifestError(
            f"references {references} have no caption column (looked for {column or 'references, caption'}); "
            f"columns are {names}. Pass --column"
        )
    ids, captions = [], []
    for path in manifest.files:
        table = pq.read_table(path, columns=[id_column, column], filesystem=manifest.fs)
        for image_id, value in zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True):
            texts = value if isinstance(value, list) else [value]
            if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
                raise ManifestError(f"references {path}: id {image_id!r} has an empty or missing caption")
            ids += [image_id] * len(texts)
            captions += texts
    return ids, captions


def embed_texts_to_parquet(
    references: str,
    output: str | os.PathLike,
    model_source: str,
    *,
    strategy: str = "last_token",
    id_column: str = "image_id",
    column: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
) -> dict[str, Any]:
    """Embed every reference caption; returns a summary (rows, dim, path)."""
    ids, captions = read_captions(references, id_column, column)
    identity = model_identity(model_source)
    folder = OutputFolder.open(output)
    folder.prepare()
    model = ovis_batch.load_model(model_source, device=device)
    vectors = []
    for start in range(0, len(captions), batch_size):
        vectors.extend(model.embed_texts(captions[start : start + batch_size], strategy=strategy))
    dim = model.hidden_size
    metadata = {
        "format_version": 1,
        "package_version": ovis_batch.__version__,
        "model": {
            k: identity[k] for k in ("name", "revision", "weights_sha256", "model_type", "random_weights")
        },
        "embedding": {"strategy": strategy, "dim": dim},
        "id_column": id_column,
        "references": str(references),
    }
    table = pa.table(
        {
            id_column: ids,
            "caption": pa.array(captions, pa.string()),
            "embedding": pa.array([v.tolist() for v in vectors], pa.list_(pa.float32(), dim)),
        }
    ).replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    target = folder.file(EMBEDDINGS_FILE)
    target.write_bytes(sink.getvalue().to_pybytes(), staging=folder.file(TMP_DIR))
    return {
        "rows": table.num_rows,
        "images": len(set(ids)),
        "dim": dim,
        "strategy": strategy,
        "path": target.uri,
    }
