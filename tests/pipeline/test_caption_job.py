"""The caption job end to end on a local Ray with the tiny checkpoint: real photos at high resolution
mixed with every kind of bad input, exactly-once output, resume, refusals, and checks before work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ovis_batch.model.checkpoint import CheckpointError
from ovis_batch.pipeline.manifest import ManifestError
from ovis_batch.pipeline.output import OutputError
from workflows.caption import run_caption

SETTINGS = [
    "min_pixels=4096",
    "max_pixels=50176",
    "max_new_tokens=6",
    "embedding=last_token",
    "rows_per_shard=4",
    "decode_workers=1",
    "batch_rows=4",
    "batch_visual_tokens=100",
    "pixel_ceiling=12000000",
    "passthrough_columns=[source]",
    "prompt_column=question",
]


def _jpeg(image: Image.Image, path: Path, **kwargs) -> None:
    image.save(path, "JPEG", quality=90, **kwargs)


def build_manifest(folder: Path, photos: dict[str, np.ndarray]) -> tuple[Path, dict[str, str | None]]:
    """A manifest of real photos scaled up to high resolution plus every kind of bad input.

    Returns the manifest path and, per id, the error type expected (None for a good row).
    """
    images = folder / "images"
    images.mkdir(parents=True)
    expected: dict[str, str | None] = {}
    rows = []

    def add(image_id, ref, error, question=""):
        rows.append({"image_id": image_id, "image": ref, "source": f"src-{image_id}", "question": question})
        expected[image_id] = error

    astronaut = Image.fromarray(photos["astronaut"]).resize((3072, 3072), Image.Resampling.BICUBIC)
    _jpeg(astronaut, images / "astronaut.jpg")
    add("astronaut", "images/astronaut.jpg", None)
    cat = Image.fromarray(photos["chelsea"]).resize((2706, 1800), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the model must see it upright, 1800 wide and 2706 tall
    _jpeg(cat, images / "cat-rotated.jpg", exif=exif)
    add("cat-rotated", "images/cat-rotated.jpg", None, "How many cats are there?")
    coffee = Image.fromarray(photos["coffee"]).resize((2400, 1600), Image.Resampling.BICUBIC)
    _jpeg(coffee.convert("CMYK"), images / "coffee-cmyk.jpg")
    add("coffee-cmyk", "images/coffee-cmyk.jpg", None)
    palette = Image.fromarray(photos["coffee"]).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    palette.save(images / "palette.png")
    add("palette", str(images / "palette.png"), None)  # an absolute path works too
    gray16 = Image.fromarray(np.asarray(Image.fromarray(photos["astronaut"]).convert("L"), np.uint16) * 257)
    gray16.save(images / "gray16.png")
    add("gray16", "images/gray16.png", None)
    Image.fromarray(photos["chelsea"]).convert("LA").save(images / "gray-alpha.png")
    add("gray-alpha", "images/gray-alpha.png", None)

    add("missing", "images/no-such-file.jpg", "file_not_found")
    (images / "empty.jpg").write_bytes(b"")
    add("empty", "images/empty.jpg", "empty_file")
    full = (images / "astronaut.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(full[: len(full) // 3])
    add("truncated", "images/truncated.jpg", "truncated_image")
    (images / "corrupt.jpg").write_bytes(full[:200] + bytes(range(256)) * 40)
    add("corrupt", "images/corrupt.jpg", "decode_error")
    (images / "notes.jpg").write_text("this is a text file, not a photo\n" * 20)
    add("not-an-image", "images/notes.jpg", "not_an_image")
    Image.new("L", (4000, 4000)).save(images / "bomb.png")  # 16 MP > the 12 MP ceiling of this test
    add("bomb", "images/bomb.png", "decompression_bomb")
    Image.new("RGB", (20, 300), (200, 10, 10)).save(images / "tiny.png")
    add("too-small", "images/tiny.png", "image_too_small")
    Image.new("RGB", (6600, 32), (10, 200, 10)).save(images / "thread.png")
    add("too-elongated", "images/thread.png", "aspect_ratio_too_large")
    (images / "vector.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n")
    add("unsupported-format", "images/vector.eps", "not_an_image")
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest, expected


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_checkpoint, photos):
    folder = tmp_path_factory.mktemp("job")
    manifest, expected = build_manifest(folder, photos)
    output = folder / "out"
    summary = run_caption(str(manifest), str(output), str(tiny_checkpoint), overrides=SETTINGS, quiet=True)
    return manifest, output, expected, summary


def read_output(output: Path) -> pa.Table:
    return pq.ParquetDataset(sorted(str(p) for p in output.glob("part-*.parquet"))).read()


def test_every_id_exactly_once_with_its_status(job):
    _, output, expected, summary = job
    table = read_output(output)
    ids = table.column("image_id").to_pylist()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    rows = {r["image_id"]: r for r in table.to_pylist()}
    for image_id, error in expected.items():
        row = rows[image_id]
        if error is None:
            assert row["status"] == "ok", (image_id, row["error_message"])
            assert row["error_type"] is None and row["caption"] is not None and row["output_tokens"] >= 1
        else:
            assert (row["status"], row["error_type"]) == ("error", error), (image_id, row["error_message"])
            assert row["error_message"] and row["caption"] is None and row["embedding"] is None
    assert summary["complete"] and summary["rows_committed"] == len(expected)
    errors = {k: v for k, v in expected.items() if v}
    assert summary["this_run"]["errors_by_type"] == {
        t: list(errors.values()).count(t) for t in set(errors.values())
    }
    assert summary["this_run"]["ok"] == len(expected) - len(errors)


def test_output_contract_passthrough_and_sizes(job):
    _, output, _, _ = job
    rows = {r["image_id"]: r for r in read_output(output).to_pylist()}
    assert all(r["source"] == f"src-{i}" for i, r in rows.items())
    astronaut, cat = rows["astronaut"], rows["cat-rotated"]
    assert (astronaut["width"], astronaut["height"]) == (3072, 3072)
    assert (cat["width"], cat["height"]) == (1800, 2706)  # EXIF orientation applied
    assert cat["input_height"] > cat["input_width"]
    for row in (astronaut, cat):
        assert row["input_width"] * row["input_height"] <= 50176
        assert row["visual_tokens"] == row["input_width"] * row["input_height"] // 1024
        vector = np.asarray(row["embedding"], dtype=np.float32)
        assert vector.shape == (48,) and abs(np.linalg.norm(vector) - 1) < 1e-5
        assert row["reasoning"] is None and row["thinking_truncated"] is False


def test_captions_equal_the_runtime_called_directly(job, tiny_model):
    """The pipeline changes nothing: same decode, same preprocessing, same answer and embedding."""
    from ovis_batch.model.images import decode_image
    from ovis_batch.model.preprocess import prepare_image

    manifest, output, _, _ = job
    rows = {r["image_id"]: r for r in read_output(output).to_pylist()}
    for image_id, question in [("astronaut", None), ("cat-rotated", "How many cats are there?")]:
        path = manifest.parent / "images" / f"{image_id}.jpg"
        decoded = decode_image(path, max_pixels=50176, fast=True)
        prepared = prepare_image(
            decoded.image, min_pixels=4096, max_pixels=50176, source_size=(decoded.width, decoded.height)
        )
        prompt = question or "Describe this image in one or two sentences."
        (result,) = tiny_model.generate([prepared], prompt, max_new_tokens=6, embedding="last_token")
        assert rows[image_id]["caption"] == result.text
        assert rows[image_id]["prompt_tokens"] == result.prompt_tokens
        np.testing.assert_allclose(rows[image_id]["embedding"], result.embedding, atol=1e-5)


def test_metadata_and_run_summary(job, tiny_model):
    _, output, _, summary = job
    shard = sorted(output.glob("part-*.parquet"))[0]
    meta = json.loads(pq.read_schema(shard).metadata[b"ovis_batch"])
    assert meta["model"]["weights_sha256"] == tiny_model.model_info()["weights_sha256"]
    assert meta["model"]["random_weights"] is True
    assert meta["generation"]["max_new_tokens"] == 6 and meta["embedding"] == {
        "strategy": "last_token",
        "dim": 48,
    }
    assert meta["package_version"]
    saved = json.loads((output / "_run.json").read_text())
    assert saved["rows_committed"] == summary["rows_committed"] and saved["complete"] is True
    assert set(saved["this_run"]["stage_busy_s"]) == {"decode", "inference"}
    assert saved["this_run"]["images_per_s"] > 0
    assert not list((output / "_tmp").iterdir())  # no temporary file left behind


def test_rerun_skips_everything_and_changed_settings_are_refused(job, tiny_checkpoint):
    manifest, output, expected, _ = job
    again = run_caption(str(manifest), str(output), str(tiny_checkpoint), overrides=SETTINGS, quiet=True)
    assert again["skipped_already_done"] == len(expected) and again["this_run"]["rows"] == 0
    with pytest.raises(OutputError, match=r"max_new_tokens: 6 -> 7.*--overwrite"):
        run_caption(
            str(manifest), str(output), str(tiny_checkpoint), overrides=[*SETTINGS, "max_new_tokens=7"]
        )
    assert len(read_output(output)) == len(expected)  # the refusal touched nothing


def test_another_model_is_refused(job, tmp_path):
    from ovis_batch.model.tiny import make_tiny_model

    manifest, output, _, _ = job
    other = make_tiny_model(tmp_path / "other", seed=3)
    with pytest.raises(OutputError, match="weights differ"):
        run_caption(str(manifest), str(output), str(other), overrides=SETTINGS)


def test_checks_before_any_work(tmp_path, tiny_checkpoint):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image_id": ["a", "b"], "path": ["x.jpg", "y.jpg"]}), manifest)
    with pytest.raises(ManifestError, match=r"no column\(s\) \['image'\]"):
        run_caption(str(manifest), str(tmp_path / "out"), str(tiny_checkpoint))
    pq.write_table(pa.table({"image_id": ["a", "b", "a"], "image": ["x", "y", "z"]}), manifest)
    with pytest.raises(ManifestError, match=r"1 duplicate 'image_id' value\(s\) \(e.g. \['a'\]\)"):
        run_caption(str(manifest), str(tmp_path / "out"), str(tiny_checkpoint))
    pq.write_table(pa.table({"image_id": ["a", None], "image": ["x", "y"]}), manifest)
    with pytest.raises(ManifestError, match="null 'image_id'"):
        run_caption(str(manifest), str(tmp_path / "out"), str(tiny_checkpoint))
    pq.write_table(pa.table({"image_id": ["a", "b"], "image": ["x", "y"]}), manifest)
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        run_caption(str(manifest), str(tmp_path / "out"), str(tmp_path))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="cannot be written"):
        run_caption(str(manifest), str(blocker / "out"), str(tiny_checkpoint))
    with pytest.raises(ManifestError, match="does not exist"):
        run_caption(str(tmp_path / "nope.parquet"), str(tmp_path / "out"), str(tiny_checkpoint))
