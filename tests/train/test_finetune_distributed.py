"""The distributed paths on CPU: one Ray Train worker, DeepSpeed ZeRO-3 (one process), eval-checkpoints.

Each costs 30-60 s on two cores, hence `slow`; the in-process runs of test_finetune_run.py cover the
same Trainer, checkpoints and resume logic.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from ft_helpers import SMALL, finetune_run
from PIL import Image

import ovis_batch
from ovis_batch.checkpoints import describe_checkpoint
from ovis_batch.cli import main
from ovis_batch.model.checkpoint import iter_tensors, weight_files

CHILD = Path(__file__).with_name("ft_deepspeed_child.py")


def curve(run_dir: Path) -> list[dict]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "loss" in e]


def same_numbers(a: list[dict], b: list[dict], rel: float) -> None:
    keys = ("step", "loss", "generation_loss", "contrastive_loss", "temperature", "learning_rate")
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in keys:
            assert x[key] == pytest.approx(y[key], rel=rel), (key, x, y)


@pytest.mark.slow
def test_one_ray_train_worker_trains_as_the_local_run_does(both_run, tmp_path):
    run = finetune_run(
        both_run.base,
        both_run.pairs,
        tmp_path / "run",
        "max_steps=3",
        "save_steps=3",
        "gpus_per_worker=0",
        "cpus_per_worker=1",
        freeze="top:1",
        loss="both",
        address="local",
    )
    # Same data order, weights and temperature as the in-process run (constant learning rate); a worker
    # runs one thread, so sums may round differently.
    same_numbers(run.losses(), both_run.losses()[:3], rel=1e-4)
    layout = describe_checkpoint(run.checkpoint(3))
    assert layout.kind == "Trainer checkpoint" and layout.weights_source == "safetensors"
    assert run.summary()["checkpoints"] == ["checkpoint-3"]


@pytest.mark.slow
def test_deepspeed_zero3_saves_loadable_checkpoints_and_resumes_exactly(both_run, tmp_path):
    if importlib.util.find_spec("deepspeed") is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip(
            "needs deepspeed and accelerate (DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)"
        )
    # Every tensor partitioned (no small-tensor exemption), as the large tables of a real model are.
    overrides = [
        *SMALL,
        "max_steps=3",
        "save_steps=2",
        "deepspeed={stage: 3, param_persistence_threshold: 0}",
    ]

    def child(run_dir: Path, *extra: str) -> None:
        command = [sys.executable, str(CHILD), "--base", str(both_run.base), "--pairs", str(both_run.pairs)]
        command += ["--run", str(run_dir), "--freeze", "top:1", "--loss", "both", *extra, "--", *overrides]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-5000:]

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    child(whole)
    resumed.mkdir()
    for name in ("finetune_run.json", "finetune_pairs.parquet", "checkpoint-2"):
        source = whole / name
        shutil.copytree(source, resumed / name) if source.is_dir() else shutil.copy2(source, resumed / name)
    child(resumed, "--resume")

    assert curve(resumed) == curve(whole)
    same_numbers(curve(whole), both_run.losses()[:3], rel=1e-4)  # ZeRO-3 in fp32 trains as plain fp32
    for checkpoint in (whole / "checkpoint-3", resumed / "checkpoint-3"):
        layout = describe_checkpoint(checkpoint)
        assert layout.kind == "Trainer checkpoint, DeepSpeed ZeRO-3"
        assert layout.weights_source == "safetensors"  # the gathered weights, under the official names
    a = dict(iter_tensors(weight_files(whole / "checkpoint-3")))
    b = dict(iter_tensors(weight_files(resumed / "checkpoint-3")))
    assert all(torch.equal(a[n], b[n]) for n in a)
    loaded = ovis_batch.load_model(resumed / "checkpoint-3", device="cpu").module.state_dict()
    assert all(torch.equal(loaded[n], a[n]) for n in a)


@pytest.mark.slow
def test_eval_checkpoints_scores_a_finetuning_run(both_run, tmp_path, photos):
    rows, refs = [], []
    for name in ("astronaut", "coffee"):
        buffer = io.BytesIO()
        Image.fromarray(photos[name]).resize((96, 96)).save(buffer, "PNG")
        rows.append({"image_id": name, "image": buffer.getvalue()})
        refs.append({"image_id": name, "references": [f"a photo of {name}", "a small picture"]})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    pq.write_table(pa.Table.from_pylist(refs), tmp_path / "refs.parquet")
    report = tmp_path / "report"
    command = ["eval-checkpoints", str(both_run.run_dir), "--manifest", str(tmp_path / "manifest.parquet")]
    command += ["--references", str(tmp_path / "refs.parquet"), "--report", str(report), "--no-meteor"]
    for setting in (
        "max_new_tokens=6",
        "device=cpu",
        "decode_workers=1",
        "min_pixels=1024",
        "max_pixels=16384",
    ):
        command += ["--set", setting]
    assert main(command) == 0
    trend = json.loads((report / "trend.json").read_text())
    assert [c["step"] for c in trend["checkpoints"]] == [3, 5]
    assert all(c["train_loss"] is not None for c in trend["checkpoints"])
    assert "CIDEr-D" in trend["metrics"] and (report / "trend.md").is_file()
