"""Training runs of the tiny model, made once per session: Hugging Face Trainer, and DeepSpeed ZeRO-2/3.

Every run records, beside its checkpoints, the weights the model held at each save
(`refs/step-N.safetensors`); loading a checkpoint must give exactly those. The DeepSpeed runs need
`deepspeed` (CI: `DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8`) and skip without it.
"""

from __future__ import annotations

import pytest
from ckpt_helpers import TrainingRun, needs_deepspeed, needs_trainer, train_in_child


@pytest.fixture(autouse=True)
def _consolidation_cache(tmp_path_factory, monkeypatch):
    """Folders consolidated on load go to a temporary cache, never to the home directory."""
    monkeypatch.setenv("OVIS_BATCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "consolidated"))


@pytest.fixture(scope="session")
def trainer_run(tiny_checkpoint, tmp_path_factory) -> TrainingRun:
    """Plain Trainer, fp32, 3 steps, `checkpoint-1..3` (each with optimizer, scheduler, RNG state)."""
    needs_trainer()
    return train_in_child(
        tiny_checkpoint, tmp_path_factory.mktemp("trainer"), "--steps", "3", "--save-steps", "1"
    )


@pytest.fixture(scope="session")
def zero2_run(tiny_checkpoint, tmp_path_factory) -> TrainingRun:
    """Trainer + DeepSpeed ZeRO-2, bf16, 2 steps, `checkpoint-2` (top-level bf16 safetensors + ZeRO files)."""
    needs_deepspeed()
    root = tmp_path_factory.mktemp("zero2")
    return train_in_child(
        tiny_checkpoint, root, "--steps", "2", "--save-steps", "2", "--deepspeed-stage", "2"
    )


@pytest.fixture(scope="session")
def zero3_run(tiny_checkpoint, tmp_path_factory) -> TrainingRun:
    """Trainer + DeepSpeed ZeRO-3, bf16, frozen vision tower, 2 steps: weights only in the ZeRO partitions."""
    needs_deepspeed()
    root = tmp_path_factory.mktemp("zero3")
    args = ("--steps", "2", "--save-steps", "2", "--deepspeed-stage", "3", "--freeze-vision")
    return train_in_child(tiny_checkpoint, root, *args)
