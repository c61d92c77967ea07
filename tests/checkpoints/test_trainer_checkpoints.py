"""Hugging Face Trainer checkpoints (`checkpoint-N`) as model sources: detect, load, consolidate, inspect."""

from __future__ import annotations

import json
import shutil

import pytest
from ckpt_helpers import assert_same_weights, module_weights

import ovis_batch
from ovis_batch.checkpoints import (
    consolidate_checkpoint,
    describe_checkpoint,
    read_trainer_state,
    resolve_model_dir,
    training_run_checkpoints,
)
from ovis_batch.model.checkpoint import CheckpointError

PROMPT = "Describe the image."


def generate(model, photos) -> list[list[int]]:
    images = [photos["astronaut"], photos["coffee"]]
    results = model.generate(images, PROMPT, max_new_tokens=8, max_pixels=128 * 128, min_pixels=32 * 32)
    assert all(r.ok for r in results)
    return [r.token_ids for r in results]


def test_trainer_checkpoint_is_described_with_its_training_state(trainer_run):
    layout = describe_checkpoint(trainer_run.checkpoint(2))
    raw = json.loads((trainer_run.checkpoint(2) / "trainer_state.json").read_text())
    logged = [e for e in raw["log_history"] if "loss" in e]
    assert layout.kind == "Trainer checkpoint"
    assert layout.weights_source == "safetensors"
    state = layout.trainer_state
    assert (state.global_step, state.epoch, state.max_steps) == (2, raw["epoch"], 3)
    assert state.last_loss == logged[-1]["loss"] and state.last_loss_step == 2
    assert state.last_learning_rate == logged[-1]["learning_rate"]
    assert state.losses == tuple((e["step"], e["loss"]) for e in logged)
    resume = {p.name for p in layout.resume_only_files}
    assert {
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "training_args.bin",
        "trainer_state.json",
    } <= resume
    assert "config.json" in {p.name for p in layout.inference_files}
    assert layout.parameter_count == sum(t.numel() for t in trainer_run.reference(2).values())


def test_released_model_is_described_as_such(tiny_checkpoint):
    layout = describe_checkpoint(tiny_checkpoint)
    assert (layout.kind, layout.trainer_state, layout.resume_only_files) == ("released model", None, [])
    assert resolve_model_dir(tiny_checkpoint) == tiny_checkpoint


def test_each_checkpoint_loads_the_weights_the_model_had_at_that_step(trainer_run):
    assert [n for n, _ in training_run_checkpoints(trainer_run.run_dir)] == [1, 2, 3]
    for step in (1, 3):
        model = ovis_batch.load_model(trainer_run.checkpoint(step), device="cpu")
        assert_same_weights(module_weights(model), trainer_run.reference(step))
    assert resolve_model_dir(trainer_run.checkpoint(3)) == trainer_run.checkpoint(3)  # used as it is


def test_consolidated_copy_holds_only_inference_files_and_generates_identically(
    trainer_run, tmp_path, photos
):
    out = consolidate_checkpoint(trainer_run.checkpoint(3), tmp_path / "clean", max_shard_bytes=300_000)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1  # sharded by size
    assert not names & {
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "training_args.bin",
        "trainer_state.json",
    }
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["consolidated_from"] == str(trainer_run.checkpoint(3).resolve())
    source = ovis_batch.load_model(trainer_run.checkpoint(3), device="cpu")
    clean = ovis_batch.load_model(out, device="cpu")
    assert_same_weights(module_weights(clean), trainer_run.reference(3))
    assert generate(clean, photos) == generate(source, photos)
    assert describe_checkpoint(out).kind == "released model"


def test_consolidate_to_bf16_rounds_every_weight_once(trainer_run, tmp_path):
    import torch

    out = consolidate_checkpoint(trainer_run.checkpoint(1), tmp_path / "bf16", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = ovis_batch.load_model(out, device="cpu", dtype=torch.bfloat16)
    reference = {n: t.to(torch.bfloat16) for n, t in trainer_run.reference(1).items()}
    assert_same_weights(module_weights(model), reference)


def test_consolidate_refuses_a_non_empty_destination_and_from_optimizer_without_zero(trainer_run, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="taken"):
        consolidate_checkpoint(trainer_run.checkpoint(1), tmp_path / "taken")
    with pytest.raises(CheckpointError, match="no DeepSpeed ZeRO optimizer partitions"):
        consolidate_checkpoint(trainer_run.checkpoint(1), tmp_path / "fp32", from_optimizer=True)


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def checkpoint_copy(trainer_run, tmp_path):
    return shutil.copytree(trainer_run.checkpoint(1), tmp_path / "checkpoint-1")


def test_unparseable_trainer_state_is_named_but_does_not_stop_a_load(checkpoint_copy):
    (checkpoint_copy / "trainer_state.json").write_text('{"global_step": 1, "log_history": [')
    with pytest.raises(CheckpointError, match=r"checkpoint-1/trainer_state.json is not valid JSON"):
        describe_checkpoint(checkpoint_copy)
    with pytest.raises(CheckpointError, match=r"trainer_state.json is not valid JSON"):
        read_trainer_state(checkpoint_copy)
    assert resolve_model_dir(checkpoint_copy) == checkpoint_copy  # inference does not need it
    (checkpoint_copy / "trainer_state.json").write_text('{"epoch": 1}')
    with pytest.raises(CheckpointError, match=r"trainer_state.json has no integer `global_step`"):
        describe_checkpoint(checkpoint_copy)


def test_missing_shard_named_by_the_index_is_named(trainer_run, tmp_path):
    out = consolidate_checkpoint(trainer_run.checkpoint(1), tmp_path / "sharded", max_shard_bytes=300_000)
    (out / "model-00002-of-00003.safetensors").unlink()
    for attempt in (describe_checkpoint, resolve_model_dir, ovis_batch.load_model):
        with pytest.raises(
            CheckpointError, match=r"model.safetensors.index.json names shard.*00002-of-00003"
        ):
            attempt(out)


def test_unknown_model_type_is_named(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    (checkpoint_copy / "config.json").write_text(json.dumps(config | {"model_type": "llava"}))
    for attempt in (describe_checkpoint, resolve_model_dir, ovis_batch.load_model):
        with pytest.raises(
            CheckpointError, match=r"checkpoint-1/config.json: model_type 'llava' is not supported"
        ):
            attempt(checkpoint_copy)


def test_a_training_run_folder_is_not_mistaken_for_a_checkpoint(trainer_run):
    with pytest.raises(CheckpointError, match=r"is a training run.*checkpoint-1, checkpoint-2, checkpoint-3"):
        describe_checkpoint(trainer_run.run_dir)
