"""The whole chain on the tiny checkpoint, one caption run shared by every step: caption job (Ray) ->
evaluate captions -> embed-texts -> evaluate retrieval -> index build -> search by id, text and image."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ovis_batch.cli import main as cli
from workflows.caption import run_caption

# Non-default pixel limits on purpose: query images must be embedded the way the job embedded them.
SETTINGS = [
    "min_pixels=4096",
    "max_pixels=40000",
    "max_new_tokens=8",
    "embedding=last_token",
    "decode_workers=1",
]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_checkpoint, photos):
    root = tmp_path_factory.mktemp("chain")
    (root / "images").mkdir()
    rows = []
    for name in ("astronaut", "chelsea", "coffee"):
        Image.fromarray(photos[name]).save(root / "images" / f"{name}.jpg", quality=90)
        rows.append({"image_id": name, "image": f"images/{name}.jpg"})
    rows.append({"image_id": "lost", "image": "images/lost.jpg"})  # an error row
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    output = root / "captions"
    run_caption(
        str(root / "manifest.parquet"), str(output), str(tiny_checkpoint), overrides=SETTINGS, quiet=True
    )
    predictions = {r["image_id"]: r for r in pq.ParquetDataset(str(output)).read().to_pylist()}
    # References: the astronaut's first reference is its own caption, so that scores are not all zero.
    refs = {
        "astronaut": [predictions["astronaut"]["caption"], "a person in a space suit"],
        "chelsea": ["an orange cat lying on a rug", "a cat"],
        "coffee": ["a cup of coffee on a saucer", "coffee"],
        "lost": ["whatever was in the lost file"],
    }
    pq.write_table(
        pa.table({"image_id": list(refs), "references": list(refs.values())}), root / "refs.parquet"
    )
    return root, output, predictions


def test_evaluate_captions_on_the_job_output(chain):
    root, output, _ = chain
    report = root / "report-captions"
    assert (
        cli(
            [
                "evaluate",
                "--predictions",
                str(output),
                "--references",
                str(root / "refs.parquet"),
                "--task",
                "captions",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["counts"]["error_rows_excluded"] == 1 and metrics["counts"]["scored"] == 3
    assert metrics["inputs"]["prediction_metadata"]["ovis_batch"]["model"]["random_weights"] is True
    assert 0 < metrics["metrics"]["BLEU-1"]["value"] <= 1  # one caption matches its reference exactly
    text = (report / "report.md").read_text()
    for name in ("BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert f"{metrics['metrics'][name]['value']:.4f}" in text  # the report shows the metrics.json values
    for link in [
        line.split("](")[1].split(")")[0] for line in text.splitlines() if "](" in line and ".png" in line
    ]:
        assert (report / link).is_file(), link


def test_retrieval_scores_from_embed_texts_match_brute_force(chain, tiny_model):
    root, output, predictions = chain
    texts = root / "text-embeddings"
    assert (
        cli(
            [
                "embed-texts",
                "--references",
                str(root / "refs.parquet"),
                "--output",
                str(texts),
                "--model",
                str(tiny_model.name),
            ]
        )
        == 0
    )
    table = pq.read_table(texts / "text_embeddings.parquet")
    captions = table.column("caption").to_pylist()
    np.testing.assert_allclose(
        np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
        tiny_model.embed_texts(captions),
        atol=1e-5,
    )
    report = root / "report-retrieval"
    assert (
        cli(
            [
                "evaluate",
                "--predictions",
                str(output),
                "--references",
                str(texts / "text_embeddings.parquet"),
                "--task",
                "retrieval",
                "--report",
                str(report),
                "--allow-partial",
            ]
        )
        == 0
    )
    metrics = json.loads((report / "metrics.json").read_text())["metrics"]
    # Oracle: the full similarity matrix over the ok images and the captions of those images.
    ok = sorted(i for i, r in predictions.items() if r["status"] == "ok")
    images = np.stack([predictions[i]["embedding"] for i in ok])
    owners = [i for i in table.column("image_id").to_pylist()]
    keep = [k for k, owner in enumerate(owners) if owner in ok]
    text_vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))[keep]
    owner_index = np.array([ok.index(owners[k]) for k in keep])
    sims = images @ text_vectors.T
    for k in (1, 5, 10):
        i2t = np.mean(
            [
                owner_index[np.argsort(-sims[i], kind="stable")[:k]].tolist().count(i) > 0
                for i in range(len(ok))
            ]
        )
        t2i = np.mean(
            [owner_index[t] in np.argsort(-sims[:, t], kind="stable")[:k] for t in range(len(keep))]
        )
        assert metrics[f"image->text R@{k}"]["value"] == pytest.approx(i2t)
        assert metrics[f"text->image R@{k}"]["value"] == pytest.approx(t2i)


def test_index_from_the_job_output_searches_by_id_text_and_image(chain, tiny_model, capsys):
    root, output, predictions = chain
    index = root / "index"
    assert cli(["index", "build", "--embeddings", str(output), "--index", str(index)]) == 0
    capsys.readouterr()
    assert cli(["index", "search", "--index", str(index), "--id", "coffee", "--format", "json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert hits[0]["id"] == "coffee" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert {h["id"] for h in hits} == {"astronaut", "chelsea", "coffee"}  # the error row is not indexed
    assert cli(["index", "search", "--index", str(index), "--text", "a cat", "--format", "json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    query = tiny_model.embed_texts(["a cat"])[0]
    for hit in hits:
        assert hit["score"] == pytest.approx(
            float(np.dot(query, predictions[hit["id"]]["embedding"])), abs=1e-5
        )
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    image = root / "images" / "chelsea.jpg"
    assert cli(["index", "search", "--index", str(index), "--image", str(image), "--format", "json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert hits[0]["id"] == "chelsea" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
