"""DeepSpeed ZeRO-2 and ZeRO-3 checkpoints written by real (one-process, gloo, bf16) Trainer runs.

ZeRO-2 keeps whole 16-bit weights (top-level safetensors and `mp_rank_00_model_states.pt`); ZeRO-3
without `stage3_gather_16bit_weights_on_model_save` keeps only partitions, which `load_model`
consolidates. Either way the loaded weights are the 16-bit weights the model held when it saved, and
`--dtype fp32` (or `--from-optimizer`) gives DeepSpeed's fp32 master weights exactly as DeepSpeed's own
reader does, never the 16-bit weights cast back up.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from ckpt_helpers import assert_same_weights, module_weights, needs_deepspeed, train_in_child

import ovis_batch
from ovis_batch.checkpoints import consolidate_checkpoint, describe_checkpoint, resolve_model_dir
from ovis_batch.model.checkpoint import CheckpointError

STEP = 2


def test_zero2_checkpoint_loads_its_16bit_weights(zero2_run):
    checkpoint = zero2_run.checkpoint(STEP)
    layout = describe_checkpoint(checkpoint)
    assert layout.kind == "Trainer checkpoint, DeepSpeed ZeRO-2"
    assert (layout.zero.stage, layout.zero.world_size, layout.zero.tag) == (2, 1, f"global_step{STEP}")
    assert layout.weights_source == "safetensors"  # the Trainer gathered them: used as they are
    assert resolve_model_dir(checkpoint) == checkpoint
    resume = {str(p.relative_to(checkpoint)) for p in layout.resume_only_files}
    assert {"latest", "zero_to_fp32.py", f"global_step{STEP}/mp_rank_00_model_states.pt"} <= resume
    model = ovis_batch.load_model(checkpoint, device="cpu")
    assert_same_weights(module_weights(model), zero2_run.reference(STEP))


def test_zero2_without_top_level_weights_loads_the_model_states(zero2_run, tmp_path):
    checkpoint = shutil.copytree(zero2_run.checkpoint(STEP), tmp_path / f"checkpoint-{STEP}")
    (checkpoint / "model.safetensors").unlink()
    assert describe_checkpoint(checkpoint).weights_source == "zero-16bit"
    model = ovis_batch.load_model(checkpoint, device="cpu")
    assert_same_weights(module_weights(model), zero2_run.reference(STEP))


def test_zero3_partitions_are_consolidated_once_on_load(zero3_run):
    checkpoint = zero3_run.checkpoint(STEP)
    layout = describe_checkpoint(checkpoint)
    assert layout.kind == "Trainer checkpoint, DeepSpeed ZeRO-3"
    assert (layout.weights_source, layout.safetensors) == ("zero-partitions", [])
    model = ovis_batch.load_model(checkpoint, device="cpu")
    reference = zero3_run.reference(STEP)
    assert {t.dtype for t in reference.values()} == {torch.bfloat16}
    assert_same_weights(module_weights(model), reference)
    cached = resolve_model_dir(checkpoint)
    assert cached != checkpoint and (cached / "model.safetensors.index.json").is_file()
    written = (cached / "model.safetensors.index.json").stat().st_mtime_ns
    assert resolve_model_dir(checkpoint) == cached
    assert (cached / "model.safetensors.index.json").stat().st_mtime_ns == written  # reused, not rewritten


def test_from_optimizer_gives_deepspeeds_fp32_master_weights(zero3_run, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = zero3_run.checkpoint(STEP)
    out = consolidate_checkpoint(checkpoint, tmp_path / "fp32", from_optimizer=True)
    model = ovis_batch.load_model(out, device="cpu", dtype=torch.float32)
    loaded = module_weights(model)
    deepspeed_says = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    masters = {n: deepspeed_says[n].contiguous() for n in loaded}
    assert_same_weights(loaded, masters)
    trained = [n for n in loaded if not n.startswith("visual_tokenizer.vit.")]
    assert {masters[n].dtype for n in trained} == {torch.float32}
    # The model computed with these masters rounded to bf16: exactly the weights it held.
    assert_same_weights({n: loaded[n].to(torch.bfloat16) for n in loaded}, zero3_run.reference(STEP))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


@pytest.mark.parametrize("run_name", ["zero2_run", "zero3_run"])
def test_fp32_consolidation_is_deepspeeds_master_weights_bf16_the_module_weights(run_name, request, tmp_path):
    run = request.getfixturevalue(run_name)  # skips without DeepSpeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = run.checkpoint(STEP)
    fp32_out = consolidate_checkpoint(checkpoint, tmp_path / "fp32", dtype="fp32")
    fp32 = module_weights(ovis_batch.load_model(fp32_out, device="cpu", dtype=torch.float32))
    deepspeed_says = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    masters = {n: deepspeed_says[n].float() for n in fp32}
    trained = [n for n in fp32 if not n.startswith("visual_tokenizer.vit.") or run_name == "zero2_run"]
    # Two steps of Adam moved the masters off the bf16 grid: a bf16 copy cast back up would differ.
    assert (
        max_difference({n: masters[n] for n in trained}, {n: masters[n].to(torch.bfloat16) for n in trained})
        > 1e-5
    )
    assert max_difference(fp32, masters) <= 1e-6

    bf16_out = consolidate_checkpoint(checkpoint, tmp_path / "bf16", dtype="bf16")
    bf16 = module_weights(ovis_batch.load_model(bf16_out, device="cpu", dtype=torch.bfloat16))
    assert_same_weights(bf16, run.reference(STEP))  # the 16-bit weights the model held at the save


def test_consolidated_zero3_checkpoint_generates_like_the_checkpoint(zero3_run, tmp_path, photos):
    checkpoint = zero3_run.checkpoint(STEP)
    out = consolidate_checkpoint(checkpoint, tmp_path / "clean", dtype="bf16")
    names = {p.name for p in out.iterdir()}
    assert not [n for n in names if n.startswith(("global_step", "zero_to_", "latest", "rng_state"))]
    images, prompt = [photos["chelsea"], photos["astronaut"]], "Describe the image."
    settings = {"max_new_tokens": 8, "min_pixels": 32 * 32, "max_pixels": 128 * 128}
    direct = ovis_batch.load_model(checkpoint, device="cpu").generate(images, prompt, **settings)
    clean = ovis_batch.load_model(out, device="cpu").generate(images, prompt, **settings)
    assert [r.token_ids for r in clean] == [r.token_ids for r in direct]
    assert all(r.ok and r.output_tokens for r in direct)


def test_bad_zero_folders_are_named(zero3_run, tmp_path):
    checkpoint = shutil.copytree(zero3_run.checkpoint(STEP), tmp_path / f"checkpoint-{STEP}")
    folder = checkpoint / f"global_step{STEP}"
    (checkpoint / "latest").write_text("global_step99")
    with pytest.raises(CheckpointError, match=r"latest names the ZeRO folder 'global_step99'"):
        ovis_batch.load_model(checkpoint, device="cpu")
    (checkpoint / "latest").write_text(f"global_step{STEP}")
    # Partitions of a second rank, from some other run: the files say one rank trained this model.
    for name in (
        "zero_pp_rank_{}_mp_rank_00_model_states.pt",
        "bf16_zero_pp_rank_{}_mp_rank_00_optim_states.pt",
    ):
        shutil.copy(folder / name.format(0), folder / name.format(1))
    with pytest.raises(CheckpointError, match=r"trained on 1 data-parallel ranks.*holds model states of 2"):
        ovis_batch.load_model(checkpoint, device="cpu")


@pytest.mark.slow  # two DeepSpeed processes, ~40 s; test_zero_format covers multi-rank partitions cheaply
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_rank_partitions_rebuild_the_weights_the_model_held(tiny_checkpoint, tmp_path, stage):
    needs_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = train_in_child(tiny_checkpoint, tmp_path, "--deepspeed-stage", str(stage), "--world-size", "2")
    layout = describe_checkpoint(run.run_dir)
    assert (layout.kind, layout.zero.world_size) == (f"DeepSpeed ZeRO-{stage}", 2)
    model = ovis_batch.load_model(run.run_dir, device="cpu")
    assert_same_weights(module_weights(model), run.reference(STEP))
    out = consolidate_checkpoint(run.run_dir, tmp_path / "fp32", dtype="fp32")
    loaded = module_weights(ovis_batch.load_model(out, device="cpu", dtype=torch.float32))
    deepspeed_says = get_fp32_state_dict_from_zero_checkpoint(str(run.run_dir))
    # DeepSpeed's reader leaves out the frozen vision tower of a ZeRO-1 checkpoint (it is only in the
    # whole module there); ours keeps its bf16 weights, upcast.
    unmastered = set(loaded) - set(deepspeed_says)
    assert all(n.startswith("visual_tokenizer.vit.") for n in unmastered) and (stage == 1) == bool(unmastered)
    shared = set(loaded) & set(deepspeed_says)
    masters = {n: deepspeed_says[n].float() for n in shared}
    assert max_difference({n: loaded[n] for n in shared}, masters) <= 1e-6
    assert_same_weights({n: loaded[n].to(torch.bfloat16) for n in loaded}, run.reference(STEP))
