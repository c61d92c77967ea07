"""The URI layer: joining, reading and writing the same way on a local disk and on an S3 server, and the
refusals (a URI whose `//` was lost, an unwritable destination, an object-store model source)."""

from __future__ import annotations

import json
import os

import boto3
import pytest
from s3_helpers import objects

from ovis_batch.pipeline.manifest import resolve_image_ref
from ovis_batch.pipeline.output import OutputFolder
from ovis_batch.storage import StorageError, location, replace_folder


def test_relative_references_stay_on_the_store_of_the_manifest(bucket):
    manifest = location(f"{bucket}/in/day-1/manifest.parquet")
    assert resolve_image_ref("imgs/0196.jpg", manifest).uri == f"{bucket}/in/day-1/imgs/0196.jpg"
    assert resolve_image_ref("../shared/a.jpg", manifest).uri == f"{bucket}/in/shared/a.jpg"
    assert resolve_image_ref("s3://other/x.jpg", manifest).uri == "s3://other/x.jpg"
    assert resolve_image_ref("/data/x.jpg", manifest).uri == "/data/x.jpg"  # absolute: the worker's disk
    local = location("/data/in/manifest.parquet")
    assert resolve_image_ref("imgs/1.jpg", local).uri == "/data/in/imgs/1.jpg"
    with pytest.raises(StorageError, match=r"leads outside .* bucket"):
        resolve_image_ref("../../../x.jpg", manifest)

    # What is written through a Location is the object boto3 reads back, under the joined key.
    resolve_image_ref("imgs/0196.jpg", manifest).write_bytes(b"\xff\xd8 bytes")
    name = bucket.removeprefix("s3://")
    body = boto3.client("s3").get_object(Bucket=name, Key="in/day-1/imgs/0196.jpg")["Body"].read()
    assert body == b"\xff\xd8 bytes"
    folder = location(f"{bucket}/in/day-1")
    assert [f.uri for f in folder.files(recursive=True)] == [f"{bucket}/in/day-1/imgs/0196.jpg"]
    assert folder.at(folder.files(recursive=True)[0].path).read_bytes() == b"\xff\xd8 bytes"


@pytest.mark.parametrize("text", ["s3:/bucket/out", "./s3:/bucket/out", "runs/gs:/b/x", "memory:/x"])
def test_a_uri_that_lost_its_slashes_is_refused_and_nothing_is_created(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scheme = text.split(":")[0].split("/")[-1]
    with pytest.raises(StorageError, match=rf"looks like a URI \({scheme}://\.\.\.\) whose '//' was lost"):
        OutputFolder.open(text)
    with pytest.raises(StorageError, match="'//' was lost"):
        location(tmp_path / "ok" / f"{scheme}:" / "x")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destinations_are_refused_with_the_cause_and_the_fix(bucket, tmp_path):
    missing = f"s3://no-such-bucket-{os.getpid()}/out"
    with pytest.raises(StorageError) as refused:
        location(missing).check_writable("output folder")
    message = str(refused.value)
    assert message.startswith(f"output folder {missing} cannot be written: ")
    assert "no-such-bucket" in message and "AWS_ENDPOINT_URL" in message and "AWS_ACCESS_KEY_ID" in message
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(
        StorageError, match=rf"report folder {blocker}/r cannot be written: .*Choose a folder"
    ):
        location(blocker / "r").check_writable("report folder")
    location(f"{bucket}/ok").check_writable("output folder")
    assert [key for key in objects(f"{bucket}/ok") if "probe" in key] == []  # the probe is removed


def test_writes_are_whole_and_leave_no_temporary(tmp_path):
    target = location(tmp_path / "out" / "_run.json")
    staging = location(tmp_path / "out" / "_tmp")
    target.write_text(json.dumps({"rows": 1}), staging=staging)
    target.write_text(json.dumps({"rows": 2}), staging=staging)
    assert json.loads((tmp_path / "out" / "_run.json").read_text()) == {"rows": 2}
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["_run.json", "_tmp"]


@pytest.mark.parametrize("store", ["local", "s3"])
def test_replace_folder_puts_the_staged_files_in_place(store, bucket, tmp_path):
    root = location(bucket if store == "s3" else tmp_path).join(f"replace-{store}")
    target, staging, previous = root.join("idx"), root.join(".idx.staging-1"), root.join(".idx.previous-1")
    for name, data in {"index.faiss": b"old", "old-only.bin": b"x", "index.json": b"{old}"}.items():
        target.join(name).write_bytes(data)
    for name, data in {"index.faiss": b"new", "sub/part.bin": b"p", "index.json": b"{new}"}.items():
        staging.join(name).write_bytes(data)
    replace_folder(staging, target, marker="index.json", previous=previous)
    found = {f.path[len(target.path) + 1 :]: f.read_bytes() for f in target.files(recursive=True)}
    assert found == {"index.faiss": b"new", "sub/part.bin": b"p", "index.json": b"{new}"}
    assert not staging.files(recursive=True) and not previous.files(recursive=True)


def test_fsspec_schemes_join_the_same_way():
    folder = location("memory://ovis-batch-test/reports")
    folder.join("plots", "a.png").write_bytes(b"png")
    assert folder.join("plots", "a.png").uri == "memory://ovis-batch-test/reports/plots/a.png"
    assert [f.uri for f in folder.files(recursive=True)] == ["memory://ovis-batch-test/reports/plots/a.png"]
    assert folder.join("plots", "a.png").read_bytes() == b"png"


def test_model_sources_and_local_only_folders_refuse_object_store_uris(
    bucket, tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    from ovis_batch.checkpoints import model_identity
    from ovis_batch.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match=rf"model source {bucket}/models/x must be on a local disk"):
        model_identity(f"{bucket}/models/x")
    assert (
        model_identity(f"file://{tiny_checkpoint}")["weights_sha256"]
        == model_identity(str(tiny_checkpoint))["weights_sha256"]
    )
    for argv in (
        ["checkpoint", "inspect", f"{bucket}/ckpt"],
        ["finetune", "--data", "x.parquet", "--model", str(tiny_checkpoint), "--output", f"{bucket}/ft"],
    ):
        assert main(argv) == 2
        assert "must be on a local disk" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing named s3: was created
