"""One training process: load the model, freeze it as planned, build the data and run the Trainer.

`run_training(plan)` is what a local run calls, and what every Ray Train worker calls (Ray Train sets
the process-group variables that the Trainer's accelerate backend reads, so the same code is one rank
of a data-parallel run there). Process-wide setup (seeds, the DeepSpeed process group) happens here
and nowhere at import time.
"""

from __future__ import annotations

import os
import socket

import torch

from ovis_batch.errors import UsageError
from ovis_batch.train.data import PairCollator, PairDataset, Pairs, read_pairs
from ovis_batch.train.freeze import apply_trainable
from ovis_batch.train.job import FinetunePlan, example_builder, pair_images
from ovis_batch.train.model import FinetuneModel, LearnedTemperature
from ovis_batch.train.trainer import OvisTrainer, training_arguments


class TrainingSetupError(UsageError, RuntimeError):
    """This process cannot train as the settings ask (no CUDA device, DeepSpeed missing)."""


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when a GPU is visible, else "cpu"; asking for CUDA without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingSetupError("device: cuda was asked for, but no CUDA device is visible to this process")
    return device


def _deepspeed_process_group(device: str) -> None:
    """DeepSpeed wants a process group even for one process; a launcher (Ray Train, torchrun) sets one up."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise TrainingSetupError(
            "the settings ask for DeepSpeed (deepspeed: ...) but it is not installed; "
            "`pip install deepspeed` (CPU: DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed) "
            "or set deepspeed: null"
        )
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    if device == "cpu":  # DeepSpeed's CPU accelerator defaults to oneCCL; gloo ships with torch
        import deepspeed

        deepspeed.init_distributed("gloo")


def _gather_directly_read_tables(model: FinetuneModel) -> None:
    """ZeRO-3 gathers a weight when its module's forward runs; Ovis reads two tables without one.

    The VTE is used as `probabilities @ vte.weight` (and its indicator rows are indexed), and the vision
    tower's position table is resized as a tensor: registered here as external parameters of the
    trained module, both are gathered for the whole forward and backward of a step.
    """
    import deepspeed

    embeddings = model.visual_tokenizer.vit.vision_model.embeddings
    tables = [model.vte.weight]
    if hasattr(embeddings, "position_embedding"):
        tables.append(embeddings.position_embedding.weight)
    for table in tables:
        deepspeed.zero.register_external_parameter(model, table)


def enable_activation_checkpointing(module) -> None:
    """Recompute activations in the backward pass (non-reentrant checkpoints), on any supported transformers."""
    # transformers 5.22 renamed it (the old name stays, deprecated); 5.19 has only the old one.
    enable = getattr(module, "activation_checkpointing_enable", None) or module.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def build_trainer(plan: FinetunePlan, pairs: Pairs | None = None) -> OvisTrainer:
    """The Trainer of this process, ready to `train`; the model is frozen as the plan says."""
    from transformers import set_seed

    import ovis_batch

    settings = plan.settings
    device = resolve_device(settings.device)
    if settings.deepspeed is not None:
        _deepspeed_process_group(device)
    set_seed(settings.seed)
    # fp32 master weights; bf16 (on GPU) is autocast by the Trainer, or DeepSpeed's own bf16 mode.
    model = ovis_batch.load_model(plan.model_dir, device="cpu", dtype=torch.float32)
    ovis = model.module
    apply_trainable(ovis, plan.trainable)
    ovis.train()
    if settings.gradient_checkpointing:
        enable_activation_checkpointing(ovis)
    args = training_arguments(settings, plan.run_dir, device=device)
    generation_weight, contrastive_weight = settings.loss_weights()
    temperature = None
    if contrastive_weight > 0:
        betas = (args.adam_beta1, args.adam_beta2)
        temperature = LearnedTemperature(
            settings.temperature, args.device, betas=betas, eps=args.adam_epsilon
        )
    wrapper = FinetuneModel(
        ovis,
        generation_weight=generation_weight,
        contrastive_weight=contrastive_weight,
        embedding=settings.embedding,
        temperature=temperature,
    )
    if settings.deepspeed is not None and settings.deepspeed.stage == 3:
        _gather_directly_read_tables(wrapper)
    pairs = pairs or read_pairs(
        plan.data,
        id_column=settings.id_column,
        image_column=settings.image_column,
        caption_column=settings.caption_column,
    )
    builder = example_builder(settings, model.tokenizer, model.prompts.chat_template)
    dataset = PairDataset(pairs, plan.scan, pair_images(settings, pairs.root), builder)
    return OvisTrainer(
        model=wrapper,
        args=args,
        train_dataset=dataset,
        data_collator=PairCollator(builder.pad_id),
        source_dir=plan.model_dir,
        max_shard_size=settings.max_shard_size,
        temperature=temperature,
    )


def run_training(plan: FinetunePlan, pairs: Pairs | None = None) -> None:
    """Train (or continue from `plan.resume_from`) to the end; the final state goes to the run folder."""
    trainer = build_trainer(plan, pairs)
    if plan.resume_from is not None:
        trainer.load_temperature(plan.resume_from)  # the weights are the Trainer's to load
    trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    trainer.save_state()  # RUN_DIR/trainer_state.json (main process only), read by the summary
