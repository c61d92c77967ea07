"""The job's stages and helpers without Ray: decode inputs (paths, URIs, bytes), manifests as files,
folders and globs, visual-token batching, split-and-retry on failure, atomic shards and id sets."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ovis_batch.pipeline.manifest import ManifestError, open_manifest, scan_ids
from ovis_batch.pipeline.output import IdSet, OutputFolder, id_hashes, repair_duplicates, write_shard
from ovis_batch.pipeline.stages import (
    CaptionPredictor,
    DecodeStage,
    RowCountError,
    check_rows,
    token_budget_batches,
)


def decode_stage(**overrides) -> DecodeStage:
    settings = {
        "id_column": "image_id",
        "image_column": "image",
        "prompt": "Describe.",
        "prompt_column": None,
        "passthrough": [],
        "manifest": None,
        "input_kind": "patches",
        "min_pixels": 4096,
        "max_pixels": 65536,
        "pixel_ceiling": 10_000_000,
        "fast": True,
    }
    return DecodeStage(**(settings | overrides))


def jpeg_bytes(photo: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_bytes_paths_and_uris_give_the_same_model_input(tmp_path, photos):
    data = jpeg_bytes(photos["chelsea"])
    (tmp_path / "cat.jpg").write_bytes(data)
    with fsspec.open("memory://bucket/cat.jpg", "wb") as fh:  # a remote object store stand-in
        fh.write(data)
    stage = decode_stage()
    table = pa.table(
        {
            "image_id": ["bytes", "relative", "uri", "file-uri", "remote-missing"],
            "image": [data, b"cat.jpg", b"", b"", b""],
        }
    )
    # one column cannot mix bytes and strings: run the string references as their own batch
    refs = pa.table(
        {
            "image_id": ["relative", "absolute", "uri", "file-uri", "remote-missing"],
            "image": [
                "cat.jpg",
                str(tmp_path / "cat.jpg"),
                "memory://bucket/cat.jpg",
                f"file://{tmp_path}/cat.jpg",
                "memory://bucket/none.jpg",
            ],
            "path": [str(tmp_path / "manifest.parquet")] * 5,
        }
    )
    from_bytes = stage(table.slice(0, 1))
    from_refs = stage(refs)
    assert from_refs.column("status").to_pylist() == ["ok", "ok", "ok", "ok", "error"]
    assert from_refs.column("error_type").to_pylist()[-1] == "file_not_found"
    expected = from_bytes.column("pixels")[0].as_py()
    assert expected is not None
    for i in range(4):
        assert from_refs.column("pixels")[i].as_py() == expected
    assert from_bytes.column("grid_thw").to_pylist()[0] == from_refs.column("grid_thw").to_pylist()[0]
    assert from_bytes.column("width")[0].as_py() == 451


def test_prompt_column_with_fallback(tmp_path, photos):
    data = jpeg_bytes(photos["coffee"])
    stage = decode_stage(prompt_column="question")
    out = stage(pa.table({"image_id": ["a", "b"], "image": [data, data], "question": ["How many cups?", ""]}))
    assert out.column("prompt").to_pylist() == ["How many cups?", "Describe."]


def test_resume_and_limit_filters(photos):
    data = jpeg_bytes(photos["coffee"])
    ids = ["a", "b", "c", "d"]
    stage = decode_stage(keep=IdSet(id_hashes(["a", "b", "c"])), skip=IdSet(id_hashes(["b"])))
    out = stage(pa.table({"image_id": ids, "image": [data] * 4}))
    assert out.column("image_id").to_pylist() == ["a", "c"]


def test_manifest_as_file_folder_and_glob(tmp_path):
    for part in ("a", "b"):
        pq.write_table(
            pa.table({"image_id": [f"{part}1", f"{part}2"], "image": ["x", "y"]}),
            tmp_path / f"{part}.parquet",
        )
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".hidden.parquet").write_text("not parquet")
    assert open_manifest(str(tmp_path / "a.parquet"), ["image_id"]).rows == 2
    folder = open_manifest(str(tmp_path), ["image_id", "image"])
    assert folder.rows == 4 and len(folder.files) == 2
    assert open_manifest(str(tmp_path / "*.parquet"), ["image"]).rows == 4
    keep, rows = scan_ids(folder, "image_id", limit=3)
    assert rows == 3 and keep.contains(id_hashes(["a1", "a2", "b1", "b2"])).tolist() == [
        True,
        True,
        True,
        False,
    ]
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ManifestError, match=r"bad\.parquet is not a readable Parquet file"):
        open_manifest(str(tmp_path), ["image_id"])


def test_token_budget_batches_keep_panoramas_apart_and_thumbnails_together():
    tokens = [3000, 64, 64, 3000, 64, 9000, 64]
    groups = token_budget_batches(tokens, budget=4096, max_rows=3)
    assert sorted(i for g in groups for i in g) == list(range(len(tokens)))  # every row exactly once
    for group in groups:
        assert len(group) <= 3
        assert sum(tokens[i] for i in group) <= 4096 or len(group) == 1  # an oversize image runs alone
    assert [5] in groups  # the 9000-token image alone
    assert any(set(g) == {1, 2, 4} for g in groups)  # thumbnails share a batch


class FlakyModel:
    """Fails any batch holding the poisoned item, like an out-of-memory error on one huge image."""

    def __init__(self, poisoned: int):
        self.poisoned, self.calls = poisoned, []

    def generate(self, items, prompts, embedding=None, **kwargs):
        self.calls.append(list(items))
        if self.poisoned in items:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return [f"caption {i}" for i in items]


def test_failed_batches_are_split_down_to_the_failing_row():
    predictor = CaptionPredictor.__new__(CaptionPredictor)
    predictor.model, predictor.embedding, predictor.generation = FlakyModel(poisoned=5), None, {}
    results = predictor._run(list(range(8)), ["p"] * 8)
    assert results[:5] == [f"caption {i}" for i in range(5)] and results[6:] == ["caption 6", "caption 7"]
    assert isinstance(results[5], RuntimeError)
    # halves, then quarters...: far fewer calls than one per row after a failure
    assert len(predictor.model.calls) <= 8


def test_row_count_check_names_the_stage():
    before = pa.table({"image_id": ["a", "b"]})
    with pytest.raises(RowCountError, match="stage 'inference' received 2 rows and returned 1"):
        check_rows("inference", "image_id", before, before.slice(0, 1))


def test_shards_are_named_by_their_ids_and_duplicates_are_repaired(tmp_path):
    folder = OutputFolder.open(tmp_path)
    folder.prepare()
    table = pa.table({"image_id": ["a", "b"], "status": ["ok", "ok"]})
    first = write_shard(folder, table, "image_id", {"run": 1})
    again = write_shard(folder, table.take([1, 0]), "image_id", {"run": 2})  # a retried task: same rows
    assert first == again and len(folder.shard_paths()) == 1
    write_shard(folder, pa.table({"image_id": ["b", "c"], "status": ["ok", "error"]}), "image_id", {"run": 3})
    assert repair_duplicates(folder, "image_id") == 1
    ids = sorted(i for p in folder.shard_paths() for i in pq.read_table(p).column("image_id").to_pylist())
    assert ids == ["a", "b", "c"]
    assert not list((tmp_path / "_tmp").iterdir())


def test_id_set_membership_matches_python_sets():
    rng = np.random.default_rng(0)
    stored = [f"id-{i}" for i in rng.choice(10_000, 500, replace=False)]
    queries = [f"id-{i}" for i in range(10_000)]
    got = IdSet(id_hashes(stored)).contains(id_hashes(queries))
    assert got.tolist() == [q in set(stored) for q in queries]
    assert not IdSet(id_hashes([])).contains(id_hashes(["x"])).any()


def test_command_line_prints_usage_errors_without_a_traceback(tmp_path, capsys):
    from ovis_batch.cli import main

    code = main(
        ["caption", "--manifest", str(tmp_path / "none.parquet"), "--output", str(tmp_path), "--model", "x"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: manifest") and "does not exist" in err and "Traceback" not in err
    assert main(["caption", "--manifest", "m", "--output", "o", "--model", "x", "max_new_tokens=0"]) == 2
    assert "max_new_tokens" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["ovis2_5", "ovis2"])
def test_decode_and_model_stages_chain_for_both_model_families(family, tmp_path, tiny_checkpoint, photos):
    """The CPU stage's output feeds the model stage (in process, no Ray): Ovis2.5 gets uint8 patches,
    Ovis2 gets RGB; every row comes out once, bad rows stay error rows, captions equal a direct call."""
    import ovis_batch
    from ovis_batch.model.tiny_ovis2 import make_tiny_ovis2_model
    from ovis_batch.pipeline.stages import predicted_schema

    source = tiny_checkpoint if family == "ovis2_5" else make_tiny_ovis2_model(tmp_path / "ovis2")
    data = jpeg_bytes(photos["chelsea"])
    batch = pa.table({"image_id": ["cat", "broken", "cat2"], "image": [data, b"not an image", data]})
    decoded = decode_stage(input_kind="patches" if family == "ovis2_5" else "rgb", max_pixels=200704)(batch)
    predictor = CaptionPredictor(
        model_source=str(source),
        id_column="image_id",
        passthrough=[],
        device="cpu",
        dtype="auto",
        generation={"max_new_tokens": 5},
        embedding="vte_mean",
        embedding_dim=ovis_batch.load_model(source).hidden_size,
        batch_visual_tokens=10_000,
        batch_rows=8,
    )
    out = predictor(decoded)
    assert (
        out.schema.names
        == predicted_schema(
            batch.schema.field("image_id"), [], out.schema.field("embedding").type.list_size
        ).names
    )
    rows = {r["image_id"]: r for r in out.to_pylist()}
    assert [rows[i]["status"] for i in ("cat", "broken", "cat2")] == ["ok", "error", "ok"]
    assert rows["broken"]["error_type"] == "not_an_image"
    image = Image.open(io.BytesIO(data))
    (direct,) = predictor.model.generate(
        [image], "Describe.", max_new_tokens=5, max_pixels=200704, min_pixels=4096
    )
    assert rows["cat"]["caption"] == rows["cat2"]["caption"] == direct.text
    assert rows["cat"]["output_tokens"] == direct.output_tokens
    assert abs(np.linalg.norm(rows["cat"]["embedding"]) - 1) < 1e-5
