"""Which weights a consolidation of a ZeRO checkpoint reads, and the precision it writes them in.

A bf16 DeepSpeed run keeps two copies of every trained weight: the fp32 master weights in its optimizer
partitions and the bf16 module weights (the masters rounded). The folders here are cut by
`write_zero_folder` from fp32 tensors that bf16 cannot hold, so a consolidation that reads the wrong
copy, or rounds twice, is off by about 1e-2 and fails. Asking for fp32 must give the masters, equal to
what DeepSpeed's own reader makes of the same files; asking for bf16 the module weights. The same checks
on real training runs are in `test_zero_checkpoints.py`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from ckpt_helpers import write_zero_folder
from safetensors.torch import load_file

from ovis_batch.checkpoints import consolidate_checkpoint, describe_checkpoint, format_layout, layout_summary
from ovis_batch.checkpoints.zero import load_deepspeed_file
from ovis_batch.cli import main
from ovis_batch.model.checkpoint import CheckpointError


def zero_source(root: Path, *, stage: int, world_size: int) -> tuple[dict, dict]:
    """A ZeRO checkpoint folder of a bf16 run: (trained fp32 masters, frozen tensors) by name."""
    g = torch.Generator().manual_seed(stage * 10 + world_size)
    groups = [
        {"embed.weight": torch.randn(7, 5, generator=g), "norm.weight": torch.randn(3, generator=g)},
        {"proj.weight": torch.randn(4, 11, generator=g)},
    ]
    frozen = {"tower.weight": torch.randn(5, 3, generator=g)}
    paddings = [[0, 2], [1]] if stage <= 2 else None
    write_zero_folder(
        root,
        groups,
        stage=stage,
        world_size=world_size,
        frozen=frozen,
        shared={"head.weight": "embed.weight"},
        alignment_paddings=paddings,
    )
    # An Ovis2 config: its weights are not checked against a model built from it, so toy names pass.
    (root / "config.json").write_text(json.dumps({"model_type": "ovis2"}))
    return {n: t for group in groups for n, t in group.items()}, frozen


def written_weights(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def deepspeed_consolidation(checkpoint: Path) -> dict[str, torch.Tensor] | None:
    """DeepSpeed's own reader (tests only; the product never runs it), or None without DeepSpeed."""
    if importlib.util.find_spec("deepspeed") is None:
        return None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {n: t.contiguous() for n, t in get_fp32_state_dict_from_zero_checkpoint(str(checkpoint)).items()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


@pytest.mark.parametrize(("stage", "world_size"), [(1, 2), (2, 1), (2, 3), (3, 1), (3, 2)])
def test_fp32_is_the_master_weights_and_bf16_the_module_weights(tmp_path, capsys, stage, world_size):
    source = tmp_path / "checkpoint"
    masters, frozen = zero_source(source, stage=stage, world_size=world_size)
    bf16_masters = {n: t.to(torch.bfloat16) for n, t in masters.items()}
    assert max_difference(masters, bf16_masters) > 1e-3  # the two copies differ: the test can tell them apart

    # fp32, through the command line: the masters themselves; frozen tensors (no master) upcast exactly.
    out = tmp_path / "fp32"
    assert main(["checkpoint", "consolidate", str(source), str(out), "--dtype", "fp32"]) == 0
    fp32 = written_weights(out)
    assert {t.dtype for t in fp32.values()} == {torch.float32}
    expected = masters | {n: t.to(torch.bfloat16).float() for n, t in frozen.items()}
    expected["head.weight"] = masters["embed.weight"]
    assert max_difference(fp32, expected) == 0.0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["weights_from"] == "zero-fp32-master"
    reference = deepspeed_consolidation(source)
    if reference is not None:  # DeepSpeed's reader leaves out ZeRO-1's frozen parameters; we keep them
        assert set(fp32) - set(reference) == (set(frozen) if stage == 1 else set())
        assert (
            max_difference({n: fp32[n] for n in reference}, {n: t.float() for n, t in reference.items()})
            <= 1e-6
        )

    # bf16 (and the default, what load_model reads): the module's 16-bit weights, the masters rounded once.
    module = {n: t.to(torch.bfloat16) for n, t in expected.items()}
    if stage <= 2:  # ZeRO-1/2 store them whole: they are what the bf16 consolidation must equal
        stored = load_deepspeed_file(source / "global_step7" / "mp_rank_00_model_states.pt")["module"]
        assert max_difference(module, dict(stored)) == 0.0
    for dtype in ("bf16", None):
        out = consolidate_checkpoint(source, tmp_path / f"out-{dtype}", dtype=dtype)
        written = written_weights(out)
        assert {t.dtype for t in written.values()} == {torch.bfloat16}
        assert max_difference(written, module) == 0.0

    # fp16, a precision the model did not train in: the masters rounded once, not the bf16 copy recast.
    fp16 = written_weights(consolidate_checkpoint(source, tmp_path / "fp16", dtype="fp16"))
    assert all(torch.equal(fp16[n], masters[n].to(torch.float16)) for n in masters)
    assert not torch.equal(fp16["proj.weight"], bf16_masters["proj.weight"].to(torch.float16))


def test_fp32_without_the_optimizer_partitions_is_refused_not_recast(tmp_path):
    source = tmp_path / "checkpoint"
    zero_source(source, stage=2, world_size=2)
    for optim in (source / "global_step7").glob("*_optim_states.pt"):
        optim.unlink()
    with pytest.raises(
        CheckpointError, match=r"global_step7 holds no optimizer partitions.*or ask for --dtype bf16"
    ):
        consolidate_checkpoint(source, tmp_path / "fp32", dtype="fp32")
    out = consolidate_checkpoint(source, tmp_path / "bf16", dtype="bf16")  # the weights it does hold
    assert {t.dtype for t in written_weights(out).values()} == {torch.bfloat16}
    report = layout_summary(describe_checkpoint(source))["precision"]
    assert "holds no optimizer partitions" in report["fp32"]["error"]
    assert report["bf16"]["weights_from"] == "zero-16bit"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_inspect_says_which_precision_comes_from_which_file(tmp_path, stage):
    source = tmp_path / "checkpoint"
    zero_source(source, stage=stage, world_size=2)
    layout = describe_checkpoint(source)
    precision = layout_summary(layout)["precision"]
    model_source = "zero-16bit" if stage <= 2 else "zero-fp32-master"
    assert (precision["model_source"]["dtype"], precision["model_source"]["weights_from"]) == (
        "bfloat16",
        model_source,
    )
    assert (precision["fp32"]["dtype"], precision["fp32"]["weights_from"]) == ("float32", "zero-fp32-master")
    text = format_layout(layout)
    fp32_line = next(line for line in text.splitlines() if "consolidate --dtype fp32:" in line)
    assert "float32, the fp32 master weights in global_step7/*_optim_states.pt" in fp32_line
    assert "the 1 frozen parameters have no master: their bfloat16 weights, upcast" in fp32_line
    if stage <= 2:
        assert "bfloat16, the whole module weights in global_step7/mp_rank_00_model_states.pt" in text
    else:
        assert "bfloat16, the fp32 master weights in global_step7/*_optim_states.pt rounded to it" in text


def test_a_checkpoint_without_zero_files_reports_its_stored_precision(tmp_path, capsys):
    source = tmp_path / "checkpoint"
    zero_source(source, stage=2, world_size=1)
    out = consolidate_checkpoint(source, tmp_path / "plain", dtype="bf16")
    shutil.rmtree(source)
    assert main(["checkpoint", "inspect", str(out)]) == 0
    assert "as a model source: bfloat16, the top-level safetensors; consolidate --dtype casts it" in (
        capsys.readouterr().out
    )
    fp32 = layout_summary(describe_checkpoint(out))["precision"]["fp32"]
    assert fp32["description"] == "float32, the top-level safetensors (bfloat16) cast"
