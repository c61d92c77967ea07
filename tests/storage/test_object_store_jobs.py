"""The commands against a real S3-protocol server (moto on 127.0.0.1): the caption job with relative and
absolute image URIs, `evaluate --report s3://...`, `index build/add/search` on the bucket. Every file
lands in the bucket and nothing on the local disk (no folder named `s3:`)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from caption_cli import committed_ids
from PIL import Image
from s3_helpers import objects, scheme_named_folders

from ovis_batch.cli import main
from ovis_batch.storage import location
from workflows.caption import run_caption

SETTINGS = [
    "min_pixels=4096",
    "max_pixels=16384",
    "max_new_tokens=4",
    "embedding=last_token",
    "rows_per_shard=2",
    "decode_workers=1",
    "batch_rows=4",
]
N_ROWS = 5


def put_parquet(uri: str, rows: list[dict]) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    location(uri).write_bytes(sink.getvalue().to_pybytes())


@pytest.fixture(scope="module")
def captioned(bucket, tiny_checkpoint, photos, tmp_path_factory):
    """Photos on the bucket; the caption job over a manifest of relative paths and one of absolute URIs,
    run from an empty working folder (where a URI read as a local path would create `s3:`)."""
    names = list(photos)
    ids = [f"img-{i}" for i in range(N_ROWS)]
    for i, image_id in enumerate(ids):
        image = Image.fromarray(photos[names[i % len(names)]][i * 20 :, i * 10 :])
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        location(f"{bucket}/in/imgs/{image_id}.jpg").write_bytes(buffer.getvalue())
    put_parquet(f"{bucket}/in/manifest.parquet", [{"image_id": i, "image": f"imgs/{i}.jpg"} for i in ids])
    put_parquet(
        f"{bucket}/abs/manifest.parquet", [{"image_id": i, "image": f"{bucket}/in/imgs/{i}.jpg"} for i in ids]
    )
    workdir = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        summaries = {
            kind: run_caption(
                f"{bucket}/{folder}/manifest.parquet",
                f"{bucket}/out-{kind}",
                str(tiny_checkpoint),
                overrides=SETTINGS,
                quiet=True,
            )
            for kind, folder in (("relative", "in"), ("absolute", "abs"))
        }
    return {"ids": ids, "summaries": summaries, "workdir": workdir}


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_caption_job_reads_images_and_writes_every_file_on_the_bucket(captioned, bucket, kind):
    output = f"{bucket}/out-{kind}"
    summary = captioned["summaries"][kind]
    assert summary["output"] == output and summary["complete"]
    assert summary["all_runs"] == {"ok": N_ROWS, "error": 0, "errors_by_type": {}}
    assert sorted(committed_ids(output)) == captioned["ids"]  # every id, exactly once
    prefix = output.removeprefix(f"{bucket}/")
    keys = {k.removeprefix(prefix + "/") for k in objects(output)}
    shards = {k for k in keys if k.startswith("part-") and k.endswith(".parquet")}
    assert len(shards) == 3  # 5 rows, 2 per shard
    assert keys - shards <= {"_job.json", "_run.json", "_tmp/", ""}  # directory markers at most
    assert {"_job.json", "_run.json"} <= keys  # no _lease.json left: released at the end
    assert json.loads(location(f"{output}/_run.json").read_bytes())["rows_committed"] == N_ROWS
    assert list(captioned["workdir"].iterdir()) == [] and not scheme_named_folders(captioned["workdir"])


def test_relative_and_absolute_references_read_the_same_images(captioned, bucket):
    def captions(kind):
        table = pq.read_table(f"{bucket}/out-{kind}".removeprefix("s3://"), filesystem=location(bucket).fs)
        return dict(zip(table["image_id"].to_pylist(), table["caption"].to_pylist(), strict=True))

    assert captions("relative") == captions("absolute")


def test_evaluate_writes_the_whole_report_to_the_bucket(captioned, bucket, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    refs = f"{bucket}/refs/references.parquet"
    put_parquet(refs, [{"image_id": i, "references": [f"a photo number {i}"]} for i in captioned["ids"]])
    report, again = f"{bucket}/report", f"{bucket}/report-2"
    argv = ["evaluate", "--predictions", f"{bucket}/out-relative", "--references", refs, "--no-meteor"]
    assert main([*argv, "--report", report]) == 0
    assert main([*argv, "--report", again, "--compare", report]) == 0  # reads the previous one back
    for folder in (report, again):
        keys = {k.split("/", 1)[1] for k in objects(folder) if not k.endswith("/")}
        assert {"metrics.json", "report.md", "scores.parquet"} <= keys
        assert any(k.startswith("plots/") and k.endswith(".png") for k in keys)
        metrics = json.loads(location(f"{folder}/metrics.json").read_bytes())
        assert metrics["counts"]["scored"] == N_ROWS
        assert set(metrics["files"]["plots"]) == {k for k in keys if k.startswith("plots/")}
    comparison = json.loads(location(f"{again}/metrics.json").read_bytes())["comparison"]
    assert comparison["previous_report"] == report and comparison["deltas"]["CIDEr-D"]["delta"] == 0
    assert list(tmp_path.iterdir()) == []


def test_index_build_add_and_search_on_the_bucket(
    captioned, bucket, tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    index = f"{bucket}/idx"
    assert main(["index", "build", "--embeddings", f"{bucket}/out-relative", "--index", index]) == 0
    assert main(["index", "add", "--embeddings", f"{bucket}/out-absolute", "--index", index]) == 0
    capsys.readouterr()
    keys = set(objects(f"{bucket}/"))
    assert {f"idx/{name}" for name in ("index.faiss", "id_map.parquet", "index.json")} <= keys
    assert not [k for k in keys if k.startswith((".idx.", "idx/new_keys"))]  # no staging, no lease left
    info = json.loads(location(f"{index}/index.json").read_bytes())
    assert info["count"] == N_ROWS and [h["replaced"] for h in info["history"]] == [0, N_ROWS]

    assert main(["index", "search", "--index", index, "--id", "img-3", "--k", "3", "--format", "json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert hits[0]["id"] == "img-3" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert (
        main(["index", "search", "--index", index, "--text", "a cat", "--model", str(tiny_checkpoint)]) == 0
    )
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 1 + N_ROWS and {line.split()[1] for line in table[1:]} == set(captioned["ids"])
    assert list(tmp_path.iterdir()) == []


def test_embed_texts_writes_to_the_bucket_and_unwritable_destinations_are_refused_before_work(
    captioned, bucket, tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    refs = f"{bucket}/refs-texts/references.parquet"
    put_parquet(refs, [{"image_id": i, "references": [f"photo {i}", f"image {i}"]} for i in captioned["ids"]])
    argv = ["embed-texts", "--references", refs, "--model", str(tiny_checkpoint)]
    assert main([*argv, "--output", f"{bucket}/texts"]) == 0
    table = pq.read_table(io.BytesIO(location(f"{bucket}/texts/text_embeddings.parquet").read_bytes()))
    assert table.num_rows == 2 * N_ROWS and table.schema.field("embedding").type.list_size == 48

    missing = "s3://no-such-bucket-ovis/x"
    capsys.readouterr()
    for command in (
        [*argv, "--output", missing],
        ["evaluate", "--predictions", f"{bucket}/out-relative", "--references", refs, "--report", missing],
        ["index", "build", "--embeddings", f"{bucket}/out-relative", "--index", missing],
    ):
        assert main(command) == 2, command
        error = capsys.readouterr().err
        assert error.startswith("error: ") and missing.rsplit("/", 1)[0] in error, error
        assert "no-such-bucket-ovis" in error and "AWS_ENDPOINT_URL" in error and len(error.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
