"""`ovis-batch index build|add|search|info` round trip through `ovis_batch.cli.main`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from index_fixtures import FakeEmbeddingModel
from PIL import Image

import ovis_batch
from ovis_batch.cli import main
from ovis_batch.index.provenance import ModelIdentity


@pytest.fixture
def loaded_models(monkeypatch):
    """Replace the model runtime's loader by the fake model; records what was asked for."""
    calls = []

    def load_model(source, device=None):
        calls.append((str(source), device))
        return (
            FakeEmbeddingModel(ModelIdentity("other", None, "12" * 32))
            if "other" in str(source)
            else FakeEmbeddingModel()
        )

    monkeypatch.setattr(ovis_batch, "load_model", load_model, raising=False)
    return calls


def run(capsys, *argv):
    code = main(["index", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_build_add_info_and_search_round_trip(tmp_path, capsys, write_output, fake_model, loaded_models):
    captions_vectors = np.stack([fake_model.vector(f"text:caption of img{i:09d}") for i in range(300)])
    write_output(tmp_path / "day1", captions_vectors[:200], shards=2)
    write_output(tmp_path / "day2", captions_vectors[150:], first_id=150)

    code, out, _ = run(capsys, "build", "--embeddings", tmp_path / "day1", "--index", tmp_path / "idx")
    assert code == 0 and "flat index of 200 vectors (exact search)" in out
    code, out, _ = run(capsys, "add", "--embeddings", tmp_path / "day2", "--index", tmp_path / "idx")
    assert code == 0 and "flat index of 300 vectors" in out and "100 added, 50 replaced" in out

    code, out, _ = run(capsys, "info", "--index", tmp_path / "idx", "--format", "json")
    info = json.loads(out)
    assert (info["count"], info["kind"], info["embedding"], info["format_version"]) == (
        300,
        "flat",
        {"strategy": "last_token", "dim": 16},
        1,
    )
    assert [h["action"] for h in info["history"]] == ["build", "add"]
    assert set(info["files"]) == {"index.faiss", "id_map.parquet", "index.json"}
    code, out, _ = run(capsys, "info", "--index", tmp_path / "idx")
    assert code == 0 and "count: 300 vectors, id column 'image_id'" in out

    code, out, _ = run(
        capsys, "search", "--index", tmp_path / "idx", "--id", "img000000007", "--k", 3, "--format", "json"
    )
    result = json.loads(out)
    assert result["query"] == {"id": "img000000007"} and len(result["results"]) == 3
    assert result["results"][0] == {
        "rank": 1,
        "id": "img000000007",
        "score": pytest.approx(1.0, abs=1e-6),
        "caption": "caption of img000000007",
    }

    code, out, _ = run(
        capsys, "search", "--index", tmp_path / "idx", "--text", "caption of img000000250", "--device", "cpu"
    )
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["rank", "id", "score", "caption"]
    assert lines[1].split()[:3] == ["1", "img000000250", "1.0000"] and len(lines) == 11
    assert loaded_models == [("fake/ovis", "cpu")]  # the index's model, from index.json

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "q.png")
    code, out, _ = run(capsys, "search", "--index", tmp_path / "idx", "--image", tmp_path / "q.png", "--k", 2)
    assert code == 0 and len(out.splitlines()) == 3


def test_errors_print_what_to_do_and_exit_2(tmp_path, capsys, write_output, small_vectors, loaded_models):
    code, _, err = run(capsys, "build", "--embeddings", tmp_path / "missing", "--index", tmp_path / "idx")
    assert code == 2 and err.startswith("error: embeddings not found") and not (tmp_path / "idx").exists()

    write_output(tmp_path / "emb", small_vectors[:20])
    assert run(capsys, "build", "--embeddings", tmp_path / "emb", "--index", tmp_path / "idx")[0] == 0
    code, _, err = run(capsys, "search", "--index", tmp_path / "idx", "--text", "x", "--model", "other/model")
    assert code == 2 and "not the model the index was built with" in err
    code, _, err = run(capsys, "info", "--index", tmp_path / "nothing")
    assert code == 2 and "is not an index folder" in err
    (tmp_path / "bad.yaml").write_text("kind: auto\nrecal: {}\n")
    code, _, err = run(
        capsys,
        "add",
        "--embeddings",
        tmp_path / "emb",
        "--index",
        tmp_path / "idx",
        "--config",
        tmp_path / "bad.yaml",
    )
    assert code == 2 and "recal" in err and "Extra inputs are not permitted" in err


def test_shipped_index_config_is_valid():
    from pathlib import Path

    from ovis_batch.index.settings import IndexSettings, load_index_settings

    path = Path(__file__).parents[2] / "configs" / "index.yaml"
    assert load_index_settings(path) == IndexSettings()


@pytest.mark.slow
def test_index_of_the_caption_jobs_output_is_searched_by_image_text_and_id(tmp_path, capsys, tiny_checkpoint):
    """The real chain: caption job (Ray, tiny model, embeddings on) -> index build -> search."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (96, 64), colour).save(tmp_path / f"im{i}.png")
    manifest = pa.table({"image_id": [f"im{i}" for i in range(4)], "image": [f"im{i}.png" for i in range(4)]})
    pq.write_table(manifest, tmp_path / "manifest.parquet")
    job = [
        "--manifest",
        tmp_path / "manifest.parquet",
        "--output",
        tmp_path / "out",
        "--model",
        tiny_checkpoint,
    ]
    assert (
        main(["caption", *map(str, job), "embedding=last_token", "max_new_tokens=4", "decode_workers=1"]) == 0
    )
    capsys.readouterr()

    code, out, _ = run(capsys, "build", "--embeddings", tmp_path / "out", "--index", tmp_path / "idx")
    assert code == 0 and "flat index of 4 vectors" in out
    code, out, _ = run(
        capsys, "search", "--index", tmp_path / "idx", "--image", tmp_path / "im2.png", "--format", "json"
    )
    top = json.loads(out)["results"][0]
    assert code == 0 and top["id"] == "im2" and top["score"] == pytest.approx(1.0, abs=1e-4)
    code, out, _ = run(
        capsys, "search", "--index", tmp_path / "idx", "--text", "a blue square", "--format", "json"
    )
    assert code == 0 and len(json.loads(out)["results"]) == 4
    code, out, _ = run(
        capsys, "search", "--index", tmp_path / "idx", "--id", "im3", "--k", 1, "--format", "json"
    )
    assert json.loads(out)["results"][0]["id"] == "im3"
