"""Synthetic embedding outputs in the batch job's layout, for tests, demos and the index benchmark.

`clustered_unit_vectors` draws unit vectors around random centres (real embeddings are clustered, and
uniform random vectors in high dimension are a needlessly hard and unrealistic case for IVF);
`write_embedding_output` writes them as Parquet shards with the output contract's columns and the
`ovis_batch` provenance metadata. Nothing here is used by the index itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ovis_batch.index.provenance import EmbeddingProvenance, ModelIdentity
from ovis_batch.storage import Location, location

SYNTHETIC_MODEL = ModelIdentity(name="synthetic/unit-vectors", revision="0", weights_sha256="0" * 64)


def clustered_unit_vectors(
    n: int,
    dim: int,
    *,
    clusters: int = 1000,
    spread: float = 0.5,
    seed: int = 0,
    centres_seed: int | None = None,
) -> np.ndarray:
    """float32 [n, dim] unit vectors, each a random centre plus Gaussian noise of norm ~`spread`.

    `centres_seed` fixes the centres separately from the points, so that fresh queries (another `seed`)
    come from the same distribution as the indexed vectors.
    """
    centres = np.random.default_rng(seed if centres_seed is None else centres_seed).standard_normal(
        (clusters, dim), dtype=np.float32
    )
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, 1])
    points = centres[rng.integers(0, clusters, n)]
    points += rng.standard_normal((n, dim), dtype=np.float32) * (spread / np.sqrt(dim))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points


def embedding_table(
    ids: Sequence[str],
    vectors: np.ndarray | None,
    *,
    captions: Sequence[str | None] | None = None,
    status: Sequence[str] | None = None,
    provenance: EmbeddingProvenance | None = None,
    id_column: str = "image_id",
) -> pa.Table:
    """A table in the output contract's shape (id, status, caption, fixed-size float32 embedding)."""
    n = len(ids)
    dim = provenance.dim if provenance else (vectors.shape[1] if vectors is not None else 0)
    provenance = provenance or EmbeddingProvenance(SYNTHETIC_MODEL, "last_token", dim)
    if vectors is None:
        embedding = pa.nulls(n, pa.list_(pa.float32(), dim))
    else:
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
        embedding = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    status = list(status) if status is not None else ["ok"] * n
    table = pa.table(
        {
            id_column: pa.array(list(ids), pa.string()),
            "status": pa.array(status, pa.string()),
            "error_type": pa.array([None if s == "ok" else "synthetic" for s in status], pa.string()),
            "caption": pa.array(list(captions) if captions is not None else [f"caption of {i}" for i in ids]),
            "embedding": embedding,
        }
    )
    return table.replace_schema_metadata(provenance.to_metadata({"generator": "ovis_batch.index.synthetic"}))


def write_embedding_output(
    folder: str | os.PathLike,
    vectors: np.ndarray,
    *,
    shards: int = 4,
    id_prefix: str = "img",
    first_id: int = 0,
    provenance: EmbeddingProvenance | None = None,
) -> list[Location]:
    """Write `vectors` as `shards` Parquet files `part-00000.parquet`... with ids `{prefix}{number:09d}`."""
    folder = location(folder)
    folder.make_dirs()
    paths = []
    for shard, rows in enumerate(np.array_split(np.arange(len(vectors)), shards)):
        ids = [f"{id_prefix}{first_id + r:09d}" for r in rows]
        path = folder.join(f"part-{shard:05d}.parquet")
        pq.write_table(
            embedding_table(ids, vectors[rows], provenance=provenance), path.path, filesystem=path.fs
        )
        paths.append(path)
    return paths
