"""Helpers of the checkpoint tests: training runs in a child process, weight comparisons."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

TRAINING_SCRIPT = Path(__file__).with_name("ckpt_training.py")


@dataclass(frozen=True)
class TrainingRun:
    run_dir: Path
    refs_dir: Path

    def checkpoint(self, step: int) -> Path:
        return self.run_dir / f"checkpoint-{step}"

    def reference(self, step: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.refs_dir / f"step-{step}.safetensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def needs_trainer() -> None:
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("the Hugging Face Trainer needs accelerate (pip install 'accelerate>=1.1')")


def needs_deepspeed() -> None:
    needs_trainer()
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip(
            "deepspeed is not installed (DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8)"
        )


def train_in_child(base: Path, root: Path, *args: str) -> TrainingRun:
    run = TrainingRun(root / "run", root / "refs")
    command = [sys.executable, str(TRAINING_SCRIPT), "--base", str(base), "--out", str(run.run_dir)]
    command += ["--refs", str(run.refs_dir), "--port", str(free_port()), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(
            f"training failed ({' '.join(command)}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        )
    return run


def module_weights(model) -> dict[str, torch.Tensor]:
    """A loaded OvisModel's parameters by name (tied ones once)."""
    return {n: p.detach() for n, p in model.module.named_parameters()}


def assert_same_weights(loaded: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Same names, and every tensor equal after casting the loaded one to the reference's precision."""
    assert set(loaded) == set(reference)
    different = [n for n in reference if not torch.equal(loaded[n].to(reference[n].dtype), reference[n])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
