"""Rebuilding whole tensors from ZeRO partitions: world sizes and odd shapes a one-process run cannot make.

The folders are cut from known tensors by `write_zero_folder`; the rebuilt tensors must be those
tensors, and (when DeepSpeed is installed) exactly what DeepSpeed's own reader makes of the same files.
Safe loading is checked here too: every DeepSpeed file goes through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from ckpt_helpers import write_zero_folder

from ovis_batch.checkpoints import zero
from ovis_batch.checkpoints.zero import (
    find_zero_folder,
    load_deepspeed_file,
    read_zero_checkpoint,
    zero_16bit_weights,
    zero_fp32_weights,
)
from ovis_batch.model.checkpoint import CheckpointError


def toy_groups(seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Two parameter groups with sizes that no world size of 2..3 divides evenly, plus a frozen tensor."""
    g = torch.Generator().manual_seed(seed)
    groups = [
        {"embed.weight": torch.randn(7, 5, generator=g), "norm.weight": torch.randn(3, generator=g)},
        {"proj.weight": torch.randn(4, 11, generator=g), "proj.bias": torch.randn(1, generator=g)},
    ]
    frozen = {"tower.weight": torch.randn(5, 3, generator=g)}
    return groups, frozen


def deepspeed_reference(checkpoint) -> dict[str, torch.Tensor] | None:
    if importlib.util.find_spec("deepspeed") is None:
        return None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {n: t.contiguous() for n, t in get_fp32_state_dict_from_zero_checkpoint(str(checkpoint)).items()}


@pytest.mark.parametrize(("stage", "world_size"), [(1, 3), (2, 2), (2, 3), (3, 2), (3, 3)])
def test_partitions_of_any_world_size_rebuild_the_tensors(tmp_path, stage, world_size):
    groups, frozen = toy_groups()
    paddings = [[0, 2], [1, 0]] if stage <= 2 else None
    write_zero_folder(
        tmp_path,
        groups,
        stage=stage,
        world_size=world_size,
        frozen=frozen,
        shared={"head.weight": "embed.weight"},
        alignment_paddings=paddings,
    )
    checkpoint = read_zero_checkpoint(find_zero_folder(tmp_path))
    assert (checkpoint.stage, checkpoint.world_size, checkpoint.tag) == (stage, world_size, "global_step7")
    rebuilt = zero_fp32_weights(checkpoint)
    trained = {n: t for g in groups for n, t in g.items()}
    assert set(rebuilt) == {*trained, *frozen, "head.weight"}
    for name, tensor in trained.items():
        assert torch.equal(rebuilt[name], tensor), name
    assert torch.equal(rebuilt["tower.weight"], frozen["tower.weight"].to(torch.bfloat16))  # no fp32 master
    assert rebuilt["head.weight"] is rebuilt["embed.weight"]
    reference = deepspeed_reference(tmp_path)
    if reference is not None:  # DeepSpeed's reader leaves out ZeRO-1's frozen parameters; we keep them
        assert set(reference) == set(rebuilt) - ({"tower.weight"} if stage == 1 else set())
        assert all(torch.equal(rebuilt[n].contiguous(), reference[n]) for n in reference)
    if stage <= 2:
        whole = zero_16bit_weights(checkpoint)
        assert torch.equal(whole["proj.weight"], trained["proj.weight"].to(torch.bfloat16))


def test_partitions_from_another_world_size_are_refused(tmp_path):
    groups, _ = toy_groups()
    write_zero_folder(tmp_path / "a", groups, stage=3, world_size=3)
    folder = tmp_path / "a" / "global_step7"
    (folder / "zero_pp_rank_2_mp_rank_00_model_states.pt").unlink()
    (folder / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"trained on 3 data-parallel ranks.*model states of 2 rank"):
        read_zero_checkpoint(folder)

    write_zero_folder(tmp_path / "b", groups, stage=2, world_size=2)
    folder = tmp_path / "b" / "global_step7"
    (folder / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(
        CheckpointError, match=r"trained on 2 data-parallel ranks.*optimizer partitions of 1 rank"
    ):
        read_zero_checkpoint(folder)

    # A model-states file that does not say its world size: the optimizer partitions still do.
    write_zero_folder(tmp_path / "c", groups, stage=2, world_size=2)
    folder = tmp_path / "c" / "global_step7"
    states = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)
    del states["dp_world_size"]
    torch.save(states, folder / "mp_rank_00_model_states.pt")
    (folder / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").rename(
        folder / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"
    )
    with pytest.raises(CheckpointError, match=r"global_step7 lacks the optimizer partition.*rank\(s\) \[1\]"):
        read_zero_checkpoint(folder)
    (folder / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt").rename(
        folder / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    )
    optim = folder / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    extra_rank = folder / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"
    extra_rank.write_bytes(optim.read_bytes())
    with pytest.raises(
        CheckpointError, match=r"rank_0_mp_rank_00_optim_states.pt was partitioned for 2 .* holds 3"
    ):
        zero_fp32_weights(read_zero_checkpoint(folder))


def test_partitions_that_do_not_add_up_are_refused(tmp_path):
    groups, _ = toy_groups()
    write_zero_folder(tmp_path, groups, stage=3, world_size=2)
    states_file = tmp_path / "global_step7" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    states = torch.load(states_file, weights_only=True)
    states["param_shapes"][1]["proj.weight"] = torch.Size([4, 12])  # claims more than was partitioned
    torch.save(states, states_file)
    with pytest.raises(CheckpointError, match="do not match the world size"):
        zero_fp32_weights(read_zero_checkpoint(tmp_path / "global_step7"))


def test_latest_naming_a_missing_folder_is_named(tmp_path):
    groups, _ = toy_groups()
    write_zero_folder(tmp_path, groups, stage=2, world_size=1)
    (tmp_path / "latest").write_text("global_step8\n")
    with pytest.raises(
        CheckpointError, match=r"/latest names the ZeRO folder 'global_step8', which is not in"
    ):
        find_zero_folder(tmp_path)
    (tmp_path / "latest").unlink()
    assert find_zero_folder(tmp_path) == tmp_path / "global_step7"  # the only one
    (tmp_path / "global_step9").mkdir()
    with pytest.raises(CheckpointError, match="several ZeRO folders"):
        find_zero_folder(tmp_path)


class _Marker:
    """Unpickling this would create a file: proof that arbitrary code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_only_deepspeeds_few_classes_are_unpickled(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"optimizer_state_dict": {"x": _Marker(str(marker))}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil.pt could not be read safely.*never unpickles arbitrary"):
        load_deepspeed_file(tmp_path / "evil.pt")
    assert not marker.exists()


def test_every_deepspeed_file_is_loaded_with_weights_only(tmp_path, monkeypatch):
    groups, frozen = toy_groups()
    write_zero_folder(tmp_path, groups, stage=3, world_size=2, frozen=frozen)
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(zero.torch, "load", recording_load)
    zero_fp32_weights(read_zero_checkpoint(tmp_path / "global_step7"))
    assert calls and all(flag is True for flag in calls)
