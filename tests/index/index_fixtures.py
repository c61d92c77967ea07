"""Helpers of the index tests (importable: tests/index is on sys.path): a fake query model, constants."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ovis_batch.index.provenance import EmbeddingProvenance, ModelIdentity

DIM = 16
FAKE_MODEL = ModelIdentity(name="fake/ovis", revision="r1", weights_sha256="ab" * 32)
FAKE_PROVENANCE = EmbeddingProvenance(FAKE_MODEL, "last_token", DIM)


class FakeEmbeddingModel:
    """The model runtime's query API with deterministic vectors: a text (or an image's colour) hashes
    to a seed, the seed to a unit vector. Indexing those same vectors makes the expected hit known."""

    def __init__(self, identity: ModelIdentity = FAKE_MODEL, dim: int = DIM) -> None:
        self.identity, self.dim = identity, dim
        self.strategies: list[str] = []

    def model_info(self) -> dict:
        return {**self.identity.to_dict(), "model_type": "fake"}

    def embed_texts(self, texts: list[str], strategy: str = "last_token") -> np.ndarray:
        self.strategies.append(strategy)
        return np.stack([self.vector(f"text:{t}") for t in texts])

    def embed_images(self, images: list, strategy: str = "last_token") -> np.ndarray:
        self.strategies.append(strategy)
        return np.stack([self.vector(f"colour:{image.getpixel((0, 0))}") for image in images])

    def vector(self, key: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a folder with its content (to prove that a failed write changed nothing)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
