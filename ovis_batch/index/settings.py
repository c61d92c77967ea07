"""Typed settings for building and growing an index, read from YAML (`configs/index.yaml`).

Unknown keys and impossible values are rejected when the file is read, with the field named. Library
functions take the small pieces they need (a kind, a list count, a recall floor), never this object.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ovis_batch.index.errors import RetrievalIndexError
from ovis_batch.storage import StorageError, location

IndexKindChoice = Literal["auto", "flat", "ivf", "hnsw"]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IvfSettings(_Settings):
    """Inverted-file index: vectors are bucketed by their nearest of `nlist` trained centroids."""

    nlist: int | None = Field(
        None, ge=1, description="number of lists; null picks lists_per_sqrt_n * sqrt(count)"
    )
    lists_per_sqrt_n: float = Field(
        4.0, gt=0, description="list count per sqrt(vector count) when nlist is null"
    )
    train_points_per_list: int = Field(
        40, ge=1, description="training sample size per list (FAISS wants at least 39)"
    )
    kmeans_iterations: int = Field(10, ge=1, le=100, description="k-means iterations when training the lists")
    max_nprobe: int | None = Field(
        None, ge=1, description="largest nprobe the recall tuning may pick; null allows all lists"
    )


class HnswSettings(_Settings):
    """Graph index: more memory and a slow build, fast queries; replacing ids rebuilds the graph."""

    m: int = Field(32, ge=4, le=256, description="graph degree (links per node)")
    ef_construction: int = Field(80, ge=8, description="candidate list size while building the graph")
    max_ef_search: int = Field(1024, ge=16, description="largest efSearch the recall tuning may pick")


class RecallSettings(_Settings):
    """How the approximate index is checked against exact search when it is built or grown."""

    k: int = Field(10, ge=1, le=1000, description="recall@k: the neighbour count compared")
    queries: int = Field(1000, ge=10, description="held-out vectors used as queries for the measurement")
    floor: float = Field(0.95, gt=0, le=1, description="warn (and record it) when recall@k falls below this")
    target: float = Field(
        0.97, gt=0, le=1, description="tuning picks the cheapest nprobe / efSearch reaching this (>= floor)"
    )

    @model_validator(mode="after")
    def _target_not_below_floor(self) -> RecallSettings:
        if self.target < self.floor:
            raise ValueError(f"recall.target ({self.target}) must be >= recall.floor ({self.floor})")
        return self


class IndexSettings(_Settings):
    """Settings of `ovis-batch index build` and `index add`."""

    kind: IndexKindChoice = Field(
        "auto", description="auto: flat below auto_flat_threshold vectors, else ivf"
    )
    id_column: str = Field("image_id", min_length=1, description="the id column of the embedding Parquet")
    auto_flat_threshold: int = Field(100_000, ge=1, description="auto builds exact (flat) below this count")
    batch_rows: int = Field(16_384, ge=1, description="rows read per Parquet record batch")
    bad_vectors: Literal["error", "skip"] = Field(
        "error", description="NaN, infinite or zero vectors in ok rows: stop with an error, or skip and count"
    )
    workers: int = Field(1, ge=1, description="parallel readers/adders; 1 streams in this process")
    executor: Literal["processes", "ray"] = Field("processes", description="what runs the workers when > 1")
    ray_address: str | None = Field(None, description="Ray cluster address for executor: ray; null = local")
    seed: int = Field(0, description="seed of the training and query samples")
    recall: RecallSettings = RecallSettings()
    ivf: IvfSettings = IvfSettings()
    hnsw: HnswSettings = HnswSettings()


def load_index_settings(path: str | os.PathLike | None = None, **overrides: Any) -> IndexSettings:
    """Settings from a YAML file (or the defaults), with top-level `overrides` that are not None."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(location(path).read_text()) or {}
        except (OSError, yaml.YAMLError, StorageError) as err:
            raise RetrievalIndexError(f"cannot read index settings {path}: {err}") from err
        if not isinstance(data, dict):
            raise RetrievalIndexError(f"{path} must hold a mapping of settings, not {type(data).__name__}")
    data.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return IndexSettings.model_validate(data)
    except ValidationError as err:
        source = path or "index settings"
        raise RetrievalIndexError(f"invalid {source}:\n{err}") from err
