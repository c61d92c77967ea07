"""Fixtures of the index tests: small clustered embedding outputs on disk and a fake query model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from index_fixtures import DIM, FAKE_MODEL, FakeEmbeddingModel, folder_bytes

from ovis_batch.index.provenance import EmbeddingProvenance
from ovis_batch.index.settings import IndexSettings
from ovis_batch.index.synthetic import clustered_unit_vectors, embedding_table, write_embedding_output


@pytest.fixture
def fake_model() -> FakeEmbeddingModel:
    return FakeEmbeddingModel()


@pytest.fixture
def settings() -> IndexSettings:
    """Defaults, with a recall sample small enough for a few thousand vectors."""
    return IndexSettings(recall={"queries": 200})


@pytest.fixture
def write_output():
    """write_output(folder, vectors, shards=, first_id=, provenance=) -> folder, in the batch job's layout."""

    def write(folder: Path, vectors: np.ndarray, **kwargs) -> Path:
        kwargs.setdefault("provenance", EmbeddingProvenance(FAKE_MODEL, "last_token", vectors.shape[1]))
        write_embedding_output(folder, vectors, **kwargs)
        return folder

    return write


@pytest.fixture
def write_table():
    """write_table(path, ids, vectors, **embedding_table kwargs): one Parquet file (fake provenance)."""

    def write(path: Path, ids: list[str], vectors: np.ndarray | None, **kwargs) -> Path:
        dim = vectors.shape[1] if vectors is not None else DIM
        kwargs.setdefault("provenance", EmbeddingProvenance(FAKE_MODEL, "last_token", dim))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(embedding_table(ids, vectors, **kwargs), path)
        return path

    return write


@pytest.fixture(scope="session")
def small_vectors() -> np.ndarray:
    """3000 clustered unit vectors of dim 16."""
    return clustered_unit_vectors(3000, DIM, clusters=60, seed=0, centres_seed=1)


@pytest.fixture
def snapshot():
    return folder_bytes
