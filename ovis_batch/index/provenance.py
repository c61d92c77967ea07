"""What produced an embedding: the model identity, the embedding strategy and the dimension.

The batch job records these in each output file's key-value metadata under the key `b"ovis_batch"` as
JSON; the index reads them from there, copies them into `index.json`, and refuses to mix vectors whose
provenance differs (they live in different vector spaces even when the dimension matches). The JSON
looks like:

    {"model": {"name": "AIDC-AI/Ovis2.5-2B", "revision": "abc123", "weights_sha256": "9f..."},
     "embedding": {"strategy": "last_token", "dim": 2048}, ...other job settings...}

Only `model.name`, `embedding.strategy` and `embedding.dim` are required; other keys are ignored here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ovis_batch.index.errors import EmbeddingInputError

METADATA_KEY = b"ovis_batch"


@dataclass(frozen=True)
class ModelIdentity:
    """Which weights made a vector. `weights_sha256`, when both sides have it, decides on its own."""

    name: str
    revision: str | None = None
    weights_sha256: str | None = None

    def differences(self, other: ModelIdentity) -> list[str]:
        """Human-readable reasons why `other` is not the same model; empty when it is.

        Identical weight hashes mean the same vector space even when the name differs (a copied or
        renamed checkpoint folder), so the hash wins when both sides record one. Otherwise the name
        must match, and the revision too when both sides record one.
        """
        if self.weights_sha256 and other.weights_sha256:
            if self.weights_sha256 == other.weights_sha256:
                return []
            return [f"weights_sha256 {self.weights_sha256[:16]}… vs {other.weights_sha256[:16]}…"]
        reasons = []
        if self.name != other.name:
            reasons.append(f"model {self.name!r} vs {other.name!r}")
        if self.revision and other.revision and self.revision != other.revision:
            reasons.append(f"revision {self.revision!r} vs {other.revision!r}")
        return reasons

    def describe(self) -> str:
        """One line for messages: name, revision, short weight hash."""
        parts = [self.name]
        if self.revision:
            parts.append(f"revision {self.revision}")
        if self.weights_sha256:
            parts.append(f"weights {self.weights_sha256[:12]}…")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, str | None]:
        """The `model` object of the metadata and of index.json."""
        return {"name": self.name, "revision": self.revision, "weights_sha256": self.weights_sha256}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelIdentity:
        """From a `model` object or `model_info()`; other keys are ignored."""
        return cls(
            name=str(data["name"]),
            revision=_optional_str(data.get("revision")),
            weights_sha256=_optional_str(data.get("weights_sha256")),
        )


@dataclass(frozen=True)
class EmbeddingProvenance:
    """The model, strategy and dimension shared by every vector of one index."""

    model: ModelIdentity
    strategy: str
    dim: int
    # (min_pixels, max_pixels) the images were embedded at: query images must be preprocessed the same way
    pixels: tuple[int, int] | None = None

    def differences(self, other: EmbeddingProvenance) -> list[str]:
        """Why vectors with provenance `other` cannot share an index with these; empty when they can."""
        reasons = self.model.differences(other.model)
        if self.strategy != other.strategy:
            reasons.append(f"embedding strategy {self.strategy!r} vs {other.strategy!r}")
        if self.dim != other.dim:
            reasons.append(f"dimension {self.dim} vs {other.dim}")
        return reasons

    def describe(self) -> str:
        """One line for messages."""
        return f"{self.model.describe()}; strategy {self.strategy}; dim {self.dim}"

    def to_metadata(self, extra: dict[str, Any] | None = None) -> dict[bytes, bytes]:
        """Schema metadata in the batch job's layout (for writers, tests and demos)."""
        payload = dict(extra or {})
        payload["model"] = self.model.to_dict()
        payload["embedding"] = {"strategy": self.strategy, "dim": self.dim}
        if self.pixels:
            payload.setdefault("generation", {}).update(min_pixels=self.pixels[0], max_pixels=self.pixels[1])
        return {METADATA_KEY: json.dumps(payload, sort_keys=True).encode()}


def provenance_from_metadata(metadata: dict[bytes, bytes] | None, source: str) -> EmbeddingProvenance:
    """Read the provenance from a Parquet file's key-value metadata; `source` names the file in errors."""
    if not metadata or METADATA_KEY not in metadata:
        raise EmbeddingInputError(
            f"{source} has no {METADATA_KEY.decode()!r} metadata, so the model and embedding strategy "
            "that made its vectors are unknown. Index only files written by the ovis-batch batch job "
            "(or write that metadata yourself: see ovis_batch.index.provenance)."
        )
    try:
        payload = json.loads(metadata[METADATA_KEY])
        model = payload["model"]
        embedding = payload["embedding"]
        if not isinstance(embedding, dict):
            raise TypeError("'embedding' is not an object")
        generation = payload.get("generation") or {}
        pixels = (
            (int(generation["min_pixels"]), int(generation["max_pixels"]))
            if "min_pixels" in generation and "max_pixels" in generation
            else None
        )
        return EmbeddingProvenance(
            model=ModelIdentity.from_dict(model),
            strategy=str(embedding["strategy"]),
            dim=int(embedding["dim"]),
            pixels=pixels,
        )
    except (ValueError, KeyError, TypeError) as err:
        raise EmbeddingInputError(
            f"{source}: the {METADATA_KEY.decode()!r} metadata does not say which model and embedding "
            f"strategy made the vectors ({type(err).__name__}: {err}). Was the batch job run with "
            "embeddings enabled? Re-run it with embeddings on, or index other files."
        ) from err


def _optional_str(value: Any) -> str | None:
    return None if value in (None, "") else str(value)
