"""Search by stored id, by text and by image (injected embedders and the real tiny model)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from index_fixtures import FAKE_MODEL, FAKE_PROVENANCE, FakeEmbeddingModel
from PIL import Image

from ovis_batch.index.errors import IncompatibleEmbeddingsError, RetrievalIndexError
from ovis_batch.index.provenance import EmbeddingProvenance, ModelIdentity
from ovis_batch.index.search import (
    RetrievalIndex,
    load_query_image,
    model_query_embedder,
    query_embedder_for,
)
from ovis_batch.index.synthetic import embedding_table
from workflows.build_index import build_index

CAPTIONS = [f"a photo of thing number {i}" for i in range(40)]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0)]


@pytest.fixture
def captioned_index(tmp_path, fake_model, settings):
    """An index whose vectors are the fake model's embeddings of its captions and of coloured images."""
    vectors = [fake_model.vector(f"text:{c}") for c in CAPTIONS]
    vectors += [fake_model.vector(f"colour:{c}") for c in COLOURS]
    ids = [f"cap{i}" for i in range(len(CAPTIONS))] + [f"colour{i}" for i in range(len(COLOURS))]
    table = embedding_table(ids, np.stack(vectors), captions=CAPTIONS + [str(c) for c in COLOURS])
    (tmp_path / "emb").mkdir()
    pq.write_table(
        table.replace_schema_metadata(FAKE_PROVENANCE.to_metadata()), tmp_path / "emb" / "p.parquet"
    )
    build_index(tmp_path / "emb", tmp_path / "idx", settings)
    return RetrievalIndex(tmp_path / "idx")


def test_search_by_id_uses_the_stored_vector_and_finds_itself_first(captioned_index):
    hits = captioned_index.search_id("cap7", k=4)
    assert [h.rank for h in hits] == [1, 2, 3, 4]
    assert (hits[0].id, hits[0].caption) == ("cap7", CAPTIONS[7])
    assert hits[0].score == pytest.approx(1.0, abs=1e-6)
    assert hits[1].score <= hits[0].score


def test_search_by_an_unknown_id_says_so(captioned_index):
    with pytest.raises(RetrievalIndexError, match="id 'nope' is not in the index"):
        captioned_index.search_id("nope")


def test_search_by_text_with_an_injected_embedder(captioned_index, fake_model):
    embedder = query_embedder_for(fake_model, FAKE_MODEL, captioned_index.provenance)
    hits = captioned_index.search_text(CAPTIONS[12], embedder.embed_text, k=3)
    assert hits[0].id == "cap12" and hits[0].score == pytest.approx(1.0, abs=1e-6)
    assert fake_model.strategies == ["last_token"]  # the index's strategy, read from index.json


def test_search_by_image_with_an_injected_embedder(captioned_index, fake_model, tmp_path):
    Image.new("RGB", (32, 32), COLOURS[2]).save(tmp_path / "query.png")
    embedder = query_embedder_for(fake_model, FAKE_MODEL, captioned_index.provenance)
    hits = captioned_index.search_image(load_query_image(tmp_path / "query.png"), embedder.embed_image, k=2)
    assert hits[0].id == "colour2" and hits[0].caption == str(COLOURS[2])


def test_k_larger_than_the_index_returns_everything_once(captioned_index):
    hits = captioned_index.search_id("cap0", k=1000)
    assert len(hits) == 44 and len({h.id for h in hits}) == 44


def test_a_query_model_that_differs_from_the_index_is_refused(captioned_index):
    other = ModelIdentity("fake/ovis", "r2", "ef" * 32)
    with pytest.raises(
        IncompatibleEmbeddingsError, match=r"not the model the index was built with.*weights_sha256"
    ):
        query_embedder_for(FakeEmbeddingModel(other), other, captioned_index.provenance)


def test_query_vectors_of_the_wrong_dimension_or_zero_are_refused(captioned_index):
    with pytest.raises(IncompatibleEmbeddingsError, match=r"shape \(1, 8\) but the index holds 16-dim"):
        captioned_index.search_text("x", lambda texts: np.ones((1, 8), np.float32))
    with pytest.raises(RetrievalIndexError, match="NaN, infinite or zero"):
        captioned_index.search_vectors(np.zeros((1, 16), np.float32))


def test_an_unreadable_query_image_is_named(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(RetrievalIndexError, match=r"cannot read the query image .*broken\.jpg"):
        load_query_image(tmp_path / "broken.jpg")


def test_index_built_from_the_tiny_models_embeddings_is_searched_with_that_model(
    tmp_path, tiny_model, tiny_checkpoint, upstream_dir, settings
):
    """The real runtime end to end: embed images with the tiny model, index, search by image and text."""
    images = [Image.new("RGB", (64, 48), colour) for colour in COLOURS]
    for i, image in enumerate(images):
        image.save(tmp_path / f"img{i}.png")
    vectors = tiny_model.embed_images(images, strategy="last_token")
    info = tiny_model.model_info()
    provenance = EmbeddingProvenance(ModelIdentity.from_dict(info), "last_token", vectors.shape[1])
    table = embedding_table([f"img{i}" for i in range(4)], vectors, provenance=provenance)
    (tmp_path / "emb").mkdir()
    pq.write_table(table, tmp_path / "emb" / "part.parquet")
    build_index(tmp_path / "emb", tmp_path / "idx", settings)
    index = RetrievalIndex(tmp_path / "idx")
    assert index.manifest.model["weights_sha256"] == info["weights_sha256"]

    embedder = model_query_embedder(tiny_checkpoint, index.provenance, device="cpu")
    hits = index.search_image(load_query_image(tmp_path / "img2.png"), embedder.embed_image, k=4)
    assert hits[0].id == "img2" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    text_vector = tiny_model.embed_texts(["a yellow square"], strategy="last_token")[0]
    hits = index.search_text("a yellow square", embedder.embed_text, k=4)
    expected = np.argsort(-(vectors @ text_vector))
    assert [h.id for h in hits] == [f"img{i}" for i in expected]
    np.testing.assert_allclose([h.score for h in hits], (vectors @ text_vector)[expected], atol=1e-5)

    with pytest.raises(IncompatibleEmbeddingsError, match="not the model the index was built with"):
        model_query_embedder(upstream_dir / "checkpoint", index.provenance, device="cpu")
