"""`ovis-batch finetune` end to end on the tiny model: losses, frozen weights, checkpoints, resume, refusals."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from ft_helpers import BAD_PAIRS, CAPTIONS, SMALL, Run, finetune_run

import ovis_batch
from ovis_batch.checkpoints import describe_checkpoint
from ovis_batch.checkpoints.trend import find_run_checkpoints
from ovis_batch.cli import main
from ovis_batch.config import load_config
from ovis_batch.model.checkpoint import iter_tensors, weight_files
from ovis_batch.train.data import PairCollator, PairDataset, PairScan, read_pairs
from ovis_batch.train.freeze import plan_trainable
from ovis_batch.train.job import RunFolderError, _meta_model, example_builder, pair_images
from ovis_batch.train.model import FinetuneModel, LearnedTemperature
from ovis_batch.train.settings import FinetuneConfig

STANDARD_FILES = {
    "config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.json",
    "preprocessor_config.json",
    "generation_config.json",
    "trainer_state.json",
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "finetune_state.json",
}


def settings_of(run: Run) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [*run.overrides, f"freeze={run.freeze}", f"loss={run.loss}"])


def weights(folder) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(weight_files(folder)))


def fixed_batch_losses(run: Run, folder) -> dict[str, float]:
    """Each loss of the run on one batch of all 8 pairs, with the weights (and temperature) in `folder`."""
    settings = settings_of(run)
    model = ovis_batch.load_model(folder, device="cpu")
    generation, contrastive = settings.loss_weights()
    temperature = LearnedTemperature(settings.temperature, "cpu", betas=(0.9, 0.999), eps=1e-8)
    state = folder / "finetune_state.json"
    if state.is_file():
        temperature.load(json.loads(state.read_text()))
    wrapped = FinetuneModel(
        model.module,
        generation_weight=generation,
        contrastive_weight=contrastive,
        embedding=settings.embedding,
        temperature=temperature if contrastive else None,
    ).eval()
    pairs = read_pairs(str(run.pairs), id_column="image_id", image_column="image", caption_column="caption")
    build = example_builder(settings, model.tokenizer, model.prompts.chat_template)
    scan = PairScan.load(run.run_dir / "finetune_pairs.parquet")
    assert len(scan.rows) == len(CAPTIONS)
    dataset = PairDataset(pairs, scan, pair_images(settings, pairs.root), build)
    batch = PairCollator(build.pad_id)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        out = wrapped(**batch)
    return {
        name: float(getattr(out, name))
        for name in ("generation_loss", "contrastive_loss")
        if getattr(out, name) is not None
    }


def expected_trainable(run: Run) -> set[str]:
    settings = settings_of(run)
    meta = _meta_model(run.base)
    return set(
        plan_trainable(
            meta.named_parameters(),
            settings.freeze_spec,
            num_layers=meta.config.llm_config.num_hidden_layers,
            tied_embeddings=True,
            loss=settings.loss,
            embedding=settings.embedding,
            train_visual_head=settings.train_visual_head,
            train_lm_head=settings.train_lm_head,
        ).trainable
    )


@pytest.mark.parametrize("run_name", ["both_run", "contrastive_run"])
def test_a_few_steps_lower_each_loss(run_name, request):
    run: Run = request.getfixturevalue(run_name)
    final = max(int(p.name.split("-")[1]) for p in run.run_dir.glob("checkpoint-*"))
    before = fixed_batch_losses(run, run.base)
    after = fixed_batch_losses(run, run.checkpoint(final))
    assert set(before) == (
        {"generation_loss", "contrastive_loss"} if run.loss == "both" else {"contrastive_loss"}
    )
    for name in before:
        assert after[name] < before[name], (name, before[name], after[name])
    logged = run.losses()
    assert [e["step"] for e in logged] == list(range(1, final + 1))
    assert all({*before, "loss", "temperature"} <= set(e) for e in logged)


@pytest.mark.parametrize("run_name", ["both_run", "contrastive_run"])
def test_frozen_parameters_are_bit_identical_and_trainable_ones_changed(run_name, request):
    run: Run = request.getfixturevalue(run_name)
    final = max(int(p.name.split("-")[1]) for p in run.run_dir.glob("checkpoint-*"))
    base, trained = weights(run.base), weights(run.checkpoint(final))
    assert set(base) == set(trained)
    trainable = expected_trainable(run)
    changed = {n for n in base if not torch.equal(base[n], trained[n])}
    assert changed == trainable
    summary = run.summary()
    assert summary["trainable_parameters"] == sum(base[n].numel() for n in trainable)
    assert summary["trainable_share"] == pytest.approx(
        summary["trainable_parameters"] / summary["total_parameters"]
    )


def test_checkpoints_have_the_standard_layout_and_load(both_run, photos):
    checkpoint = both_run.checkpoint(5)
    names = {p.name for p in checkpoint.iterdir()}
    assert names >= STANDARD_FILES
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.startswith("model-") and s.endswith(".safetensors") for s in shards)
    assert all(n.startswith(("llm.", "visual_tokenizer.", "vte.")) for n in index["weight_map"])
    for name in (
        "tokenizer.json",
        "chat_template.json",
        "preprocessor_config.json",
        "generation_config.json",
    ):
        assert (checkpoint / name).read_bytes() == (both_run.base / name).read_bytes()
    layout = describe_checkpoint(checkpoint)
    assert layout.kind == "Trainer checkpoint" and layout.weights_source == "safetensors"
    assert layout.trainer_state.global_step == 5
    assert [step for step, _ in layout.trainer_state.losses] == [1, 2, 3, 4, 5]

    model = ovis_batch.load_model(checkpoint, device="cpu")
    loaded = {n: p.detach() for n, p in model.module.state_dict().items() if n != "llm.lm_head.weight"}
    saved = weights(checkpoint)
    assert all(torch.equal(loaded[n], saved[n]) for n in saved)
    (result,) = model.generate(
        [photos["coffee"]], "Describe the image.", max_new_tokens=4, min_pixels=1024, max_pixels=16384
    )
    assert result.ok and result.output_tokens > 0
    # What eval-checkpoints reads first: every checkpoint of the run, its kind and its training loss.
    found = find_run_checkpoints(both_run.run_dir, both_run.run_dir.parent / "report")
    assert [c.step for c in found] == [3, 5]


def test_the_summary_counts_skipped_pairs(both_run):
    summary = both_run.summary()
    reasons: dict[str, int] = {}
    for _, _, reason in BAD_PAIRS.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    assert summary["pairs"]["pairs"] == len(CAPTIONS) + len(BAD_PAIRS)
    assert summary["pairs"]["used"] == len(CAPTIONS)
    assert summary["pairs"]["skipped_by_reason"] == dict(sorted(reasons.items()))
    assert summary["pairs"]["skipped_examples"]["missing_caption"] == ["no-caption", "blank-caption"]
    assert (summary["global_step"], summary["steps_this_run"]) == (5, 5)
    assert summary["checkpoints"] == ["checkpoint-3", "checkpoint-5"]
    assert summary["last_logged"]["step"] == 5


def test_resume_continues_at_the_same_step_and_reproduces_the_loss_curve(both_run, tmp_path):
    # A run that stopped after checkpoint-3 (mid-epoch: 2 steps an epoch), as a crash would leave it.
    crashed = tmp_path / "run"
    crashed.mkdir()
    for name in ("finetune_run.json", "finetune_pairs.parquet", "checkpoint-3"):
        source = both_run.run_dir / name
        shutil.copytree(source, crashed / name) if source.is_dir() else shutil.copy2(source, crashed / name)
    resumed = finetune_run(
        both_run.base,
        both_run.pairs,
        crashed,
        *both_run.overrides[len(SMALL) :],
        freeze="top:1",
        loss="both",
        resume=True,
    )
    summary = resumed.summary()
    assert summary["resumed_from"] == str(crashed / "checkpoint-3")
    assert (summary["global_step"], summary["steps_this_run"]) == (5, 2)
    assert resumed.losses() == both_run.losses()  # every logged value, bit for bit
    reference, continued = weights(both_run.checkpoint(5)), weights(resumed.checkpoint(5))
    assert all(torch.equal(reference[n], continued[n]) for n in reference)
    state = "finetune_state.json"
    assert (resumed.checkpoint(5) / state).read_text() == (both_run.checkpoint(5) / state).read_text()


def test_a_folder_holding_another_run_is_refused(both_run, tmp_path):
    from workflows.finetune import finetune

    args = (str(both_run.pairs), str(both_run.base))
    with pytest.raises(RunFolderError, match="already holds a fine-tuning run; pass --resume"):
        finetune(*args, both_run.run_dir, overrides=list(SMALL), quiet=True)
    with pytest.raises(RunFolderError, match=r"cannot resume .*learning_rate: 0\.001 -> 0\.002"):
        finetune(
            *args,
            both_run.run_dir,
            overrides=[*both_run.overrides, "learning_rate=2e-3"],
            freeze="top:1",
            loss="both",
            resume=True,
            quiet=True,
        )
    with pytest.raises(RunFolderError, match="pick one"):
        finetune(*args, both_run.run_dir, resume=True, overwrite=True, quiet=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="holds no fine-tuning run"):
        finetune(*args, other, overrides=list(SMALL), quiet=True)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_a_freeze_spec_beyond_the_model_fails_before_training(both_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    command = [
        "finetune",
        "--data",
        str(both_run.pairs),
        "--model",
        str(both_run.base),
        "--output",
        str(run_dir),
    ]
    assert main([*command, "--freeze", "top:7"]) == 2
    assert "names 7 LLM layers but the model has 3" in capsys.readouterr().err
    assert (
        main(
            [
                *command,
                "--freeze",
                "top:1",
                "--loss",
                "contrastive",
                "--set",
                "embedding=vte_mean",
                "--set",
                "train_lm_head=false",
            ]
        )
        == 2
    )
    assert "leaves nothing trainable" in capsys.readouterr().err
    assert not run_dir.exists()


def test_command_line_overwrite_prints_the_trainable_share_first(both_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "stale.txt").write_text("from before")
    settings = [arg for s in (*SMALL, "max_steps=1") for arg in ("--set", s)]
    command = [
        "finetune",
        "--data",
        str(both_run.pairs),
        "--model",
        str(both_run.base),
        "--output",
        str(run_dir),
    ]
    assert main([*command, "--freeze", "bottom:1", "--loss", "generation", *settings, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert out.index("freeze bottom:1: training") < out.index("'loss'")  # printed before the first step
    assert "warning: bottom:1 trains the layers nearest the input" in out
    assert "pairs: 8 usable of 13" in out
    assert not (run_dir / "stale.txt").exists() and (run_dir / "checkpoint-1" / "config.json").is_file()


def test_bf16_autocast_with_gradient_checkpointing_and_loader_workers(both_run, tmp_path):
    # The GPU settings (bf16 autocast over fp32 weights, recomputed activations) and decoding in
    # DataLoader worker processes, exercised on the CPU.
    extra = (
        "max_steps=2",
        "save_steps=2",
        "precision=bf16",
        "gradient_checkpointing=true",
        "dataloader_workers=2",
    )
    run = finetune_run(
        both_run.base, both_run.pairs, tmp_path / "run", *extra, freeze="vision+top:1", loss="both"
    )
    assert [e["step"] for e in run.losses()] == [1, 2]
    assert all(
        math.isfinite(e["generation_loss"]) and math.isfinite(e["contrastive_loss"]) for e in run.losses()
    )
    base, trained = weights(run.base), weights(run.checkpoint(2))
    assert trained["vte.weight"].dtype == torch.float32  # the master weights stay fp32
    assert {n for n in base if not torch.equal(base[n], trained[n])} == expected_trainable(run)
