"""Searching an index folder by vector, stored id, text or image, and printing the results.

`RetrievalIndex` opens a folder (FAISS file + index.json; the id map is read lazily per query) and
answers `search_vectors`, `search_id`, `search_text` and `search_image`. Text and image queries are
embedded by a callable the caller passes (`EmbedText`, `EmbedImage`), so this module needs no model;
`model_query_embedder` builds those callables from the model runtime and refuses a model whose identity
differs from the index's, since its vectors would live in another space.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ovis_batch.index.errors import IncompatibleEmbeddingsError, RetrievalIndexError
from ovis_batch.index.folder import ID_MAP_FILE, IdMap, open_index
from ovis_batch.index.kinds import set_search_parameter, stored_vector
from ovis_batch.index.provenance import EmbeddingProvenance, ModelIdentity
from ovis_batch.index.reader import MIN_VECTOR_NORM
from ovis_batch.storage import StorageError, location

EmbedText = Callable[[list[str]], np.ndarray]
EmbedImage = Callable[[list[Any]], np.ndarray]


@dataclass(frozen=True)
class SearchHit:
    """One result: rank from 1, the item's id, cosine score, caption."""

    rank: int
    id: str
    score: float
    caption: str | None


class RetrievalIndex:
    """An opened index folder, ready to answer queries."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = location(folder)
        self.manifest, self.index = open_index(self.folder)
        set_search_parameter(self.index, self.manifest.kind, self.manifest.search_value)
        self.id_map = IdMap(self.folder.join(ID_MAP_FILE))

    @property
    def provenance(self) -> EmbeddingProvenance:
        """The model, strategy and dimension queries must match."""
        return self.manifest.provenance()

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[SearchHit]]:
        """Top-k hits for each query vector (rows of `vectors`, any norm but not zero)."""
        queries = checked_query_vectors(vectors, self.provenance.dim, "query vectors")
        scores, faiss_ids = self.index.search(queries, min(k, max(self.index.ntotal, 1)))
        keys = self.id_map.lookup(np.unique(faiss_ids))
        results = []
        for row_scores, row_ids in zip(scores, faiss_ids, strict=True):
            hits = [(s, keys[int(f)]) for s, f in zip(row_scores, row_ids, strict=True) if f >= 0]
            results.append(
                [SearchHit(rank, i, float(s), c) for rank, (s, (i, c)) in enumerate(hits, start=1)]
            )
        return results

    def vector_of(self, item_id: str) -> np.ndarray:
        """The stored vector of `item_id`."""
        faiss_id = self.id_map.find(item_id)
        if faiss_id is None:
            raise RetrievalIndexError(f"id {item_id!r} is not in the index at {self.folder}")
        return stored_vector(self.index, faiss_id)

    def search_id(self, item_id: str, k: int = 10) -> list[SearchHit]:
        """Neighbours of a stored item, using its stored vector; the item itself comes first."""
        return self.search_vectors(self.vector_of(item_id)[None], k)[0]

    def search_text(self, text: str, embed_text: EmbedText, k: int = 10) -> list[SearchHit]:
        """Items nearest to `text`, embedded by `embed_text` (same model and strategy as the index)."""
        return self.search_vectors(embed_text([text]), k)[0]

    def search_image(self, image: Any, embed_image: EmbedImage, k: int = 10) -> list[SearchHit]:
        """Items nearest to `image` (a PIL image), embedded by `embed_image`."""
        return self.search_vectors(embed_image([image]), k)[0]


def checked_query_vectors(vectors: np.ndarray, dim: int, what: str) -> np.ndarray:
    """float32 [n, dim] unit vectors, or a clear error for a wrong shape, NaN or zero vector."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != dim:
        raise IncompatibleEmbeddingsError(
            f"{what} have shape {array.shape} but the index holds {dim}-dim vectors: "
            "embed queries with the model and strategy recorded in the index's index.json"
        )
    norms = np.linalg.norm(array, axis=1)
    if not np.isfinite(array).all() or (norms < MIN_VECTOR_NORM).any():
        raise RetrievalIndexError(f"{what} contain a NaN, infinite or zero vector; nothing to search with")
    return np.ascontiguousarray(array / norms[:, None])


@dataclass(frozen=True)
class QueryEmbedder:
    """Text and image embedders bound to the index's model and embedding strategy."""

    embed_text: EmbedText
    embed_image: EmbedImage
    model: ModelIdentity


def model_query_embedder(
    source: str | os.PathLike, provenance: EmbeddingProvenance, device: str | None = None
) -> QueryEmbedder:
    """Load the model runtime from `source` and check that it is the model the index was built with."""
    import ovis_batch

    try:
        # Query images are preprocessed at the pixel limits the indexed images were embedded at.
        pixels = (
            dict(zip(("min_pixels", "max_pixels"), provenance.pixels, strict=True))
            if provenance.pixels
            else {}
        )
        model = ovis_batch.load_model(source, device=device, **pixels)
    except (ImportError, OSError, ValueError, RuntimeError) as err:
        raise RetrievalIndexError(
            f"cannot load the query model {source}: {type(err).__name__}: {err}. Pass --model with the "
            f"checkpoint the index was built with ({provenance.model.describe()})."
        ) from err
    identity = ModelIdentity.from_dict(model.model_info())
    return query_embedder_for(model, identity, provenance)


def query_embedder_for(model: Any, identity: ModelIdentity, provenance: EmbeddingProvenance) -> QueryEmbedder:
    """Bind `model.embed_texts` / `embed_images` to the index's strategy after checking the identity."""
    if reasons := provenance.model.differences(identity):
        raise IncompatibleEmbeddingsError(
            f"the query model ({identity.describe()}) is not the model the index was built with "
            f"({provenance.model.describe()}): {'; '.join(reasons)}. Its vectors live in another space; "
            "pass --model with the index's checkpoint, or rebuild the index with this model's embeddings."
        )
    strategy = provenance.strategy
    return QueryEmbedder(
        embed_text=lambda texts: model.embed_texts(texts, strategy=strategy),
        embed_image=lambda images: model.embed_images(images, strategy=strategy),
        model=identity,
    )


def load_query_image(path: str | os.PathLike) -> Any:
    """A query image (a local path or a URI) as the batch job sees one: EXIF orientation applied, RGB."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        data = location(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, UnidentifiedImageError, StorageError) as err:
        raise RetrievalIndexError(f"cannot read the query image {path}: {err}") from err
