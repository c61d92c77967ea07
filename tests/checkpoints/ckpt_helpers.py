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


def write_zero_folder(
    checkpoint: Path,
    groups: list[dict[str, torch.Tensor]],
    *,
    stage: int,
    world_size: int,
    frozen: dict[str, torch.Tensor] | None = None,
    shared: dict[str, str] | None = None,
    alignment_paddings: list[list[int]] | None = None,
    tag: str = "global_step7",
) -> Path:
    """A ZeRO folder in DeepSpeed's documented layout, cut from whole fp32 tensors (see ovis_batch/checkpoints/zero.py).

    For world sizes and odd shapes that a one-process DeepSpeed run cannot produce. Whatever this writes,
    DeepSpeed's own reader must read back (tests check that when DeepSpeed is installed).
    """
    import math
    from collections import OrderedDict

    frozen, shared = frozen or {}, shared or {}
    folder = checkpoint / tag
    folder.mkdir(parents=True)
    (checkpoint / "latest").write_text(tag)
    config = {"bf16": {"enabled": True}, "zero_optimization": {"stage": stage}}
    shapes = [OrderedDict((n, t.shape) for n, t in g.items()) for g in groups]
    per_rank_groups: list[list[torch.Tensor]] = [[] for _ in range(world_size)]
    for g, group in enumerate(groups):
        if stage <= 2:
            paddings = alignment_paddings[g] if alignment_paddings else [0] * len(group)
            pieces = []
            for t, pad in zip(group.values(), paddings, strict=True):
                pieces += [t.reshape(-1), torch.zeros(pad)]
            flat = torch.cat(pieces)
            align = 2 * world_size
            flat = torch.cat([flat, torch.zeros(math.ceil(flat.numel() / align) * align - flat.numel())])
            for r, part in enumerate(flat.chunk(world_size)):
                per_rank_groups[r].append(part.clone())
        else:
            for r in range(world_size):
                slices = []
                for t in group.values():
                    per = math.ceil(t.numel() / world_size)
                    padded = torch.cat([t.reshape(-1), torch.zeros(per * world_size - t.numel())])
                    slices.append(padded[r * per : (r + 1) * per])
                per_rank_groups[r].append(torch.cat(slices))
    whole = {n: t for g in groups for n, t in g.items()} | frozen
    for r in range(world_size):
        if stage <= 2:
            fragments = {n: t.to(torch.bfloat16) for n, t in frozen.items()}
            module = {n: t.to(torch.bfloat16) for n, t in whole.items()}
            module |= {alias: module[source] for alias, source in shared.items()}
        else:
            fragments = {}
            for n, t in frozen.items():
                per = math.ceil(t.numel() / world_size)
                padded = torch.cat([t.reshape(-1), torch.zeros(per * world_size - t.numel())])
                fragments[n] = padded[r * per : (r + 1) * per].to(torch.bfloat16).clone()
            module = {n: torch.empty(0, dtype=torch.bfloat16) for n in [*whole, *shared]}
        # ZeRO-1 records frozen parameters nowhere but in the whole module (DeepSpeed saves None).
        model_states = {
            "module": module,
            "buffer_names": [],
            "param_shapes": shapes,
            "frozen_param_shapes": {n: t.shape for n, t in frozen.items()} if stage >= 2 else None,
            "frozen_param_fragments": fragments if stage >= 2 else None,
            "shared_params": shared,
            "dp_world_size": world_size,
            "ds_config": config,
            "ds_version": "layout-written-by-the-tests",
        }
        if stage == 3:
            torch.save(model_states, folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        elif r == 0:
            torch.save(model_states, folder / "mp_rank_00_model_states.pt")
        key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
        optimizer = {"zero_stage": stage, "partition_count": world_size, key: per_rank_groups[r]}
        if stage <= 2:
            optimizer["partition_count"] = [world_size] * len(groups)
            optimizer["param_alignment_paddings"] = alignment_paddings or [[0] * len(g) for g in groups]
        torch.save(
            {"optimizer_state_dict": optimizer}, folder / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        )
    return folder
