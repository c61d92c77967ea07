"""The Hugging Face Trainer of a fine-tuning run, and the `TrainingArguments` built from the settings.

`OvisTrainer` changes three things of the stock Trainer:

- what a checkpoint holds: the Ovis2.5 weights under the official names (sharded safetensors + index,
  `config.json`), the source model's tokenizer, chat template, preprocessor and generation files copied
  verbatim, and `finetune_state.json` (the learned temperature and its optimizer state), beside the
  Trainer's own `trainer_state.json`, `training_args.bin`, optimizer, scheduler and RNG state (and, under
  DeepSpeed, its ZeRO folder, whose parameter names are the official ones too). So `load_model` and
  `ovis-batch eval-checkpoints` read a `checkpoint-N` as they read a released model;
- how a checkpoint is loaded on resume (the same names), and the temperature's own AdamW step, taken
  just before the model's optimizer step at the same learning rate;
- what is logged: the loss parts (`generation_loss`, `contrastive_loss`) and the `temperature` next to
  the Trainer's `loss`, averaged over the logging window (and over processes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ovis_batch.checkpoints.layout import INFERENCE_PATTERNS
from ovis_batch.model.checkpoint import CheckpointError, iter_tensors, weight_files
from ovis_batch.train.model import LearnedTemperature
from ovis_batch.train.settings import DeepSpeedSettings, FinetuneConfig

FINETUNE_STATE = "finetune_state.json"
TRAINING_ARGS = "training_args.bin"
_LOGGED_PARTS = ("generation_loss", "contrastive_loss", "temperature")


def copy_inference_files(source: Path, destination: Path) -> list[str]:
    """Copy the source model's tokenizer, template and preprocessing files (not config.json, not weights)."""
    copied = []
    for pattern in INFERENCE_PATTERNS:
        if pattern == "config.json":
            continue  # written by save_pretrained for the weights beside it
        for path in sorted(source.glob(pattern)):
            if path.is_file():
                shutil.copy2(path, destination / path.name)
                copied.append(path.name)
    return copied


def load_ovis_weights(module: torch.nn.Module, folder: Path) -> None:
    """Copy a checkpoint folder's safetensors (official names) into `module`, in place (ties kept)."""
    expected = set(module.state_dict())
    tied = module.llm.config.tie_word_embeddings
    state = {n: t for n, t in iter_tensors(weight_files(folder)) if not (tied and n == "llm.lm_head.weight")}
    if tied:
        expected.discard("llm.lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"the weights in {folder} do not fit the model being trained: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    module.load_state_dict(state, strict=False)


class _TemperatureStep(TrainerCallback):
    """Steps the temperature's optimizer right before the model's, at the learning rate of this step."""

    def __init__(self, trainer: OvisTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.trainer.temperature.step(self.trainer._get_learning_rate(), args.world_size)


class OvisTrainer(Trainer):
    """The Trainer over a `FinetuneModel`, writing checkpoints in the official Ovis2.5 layout."""

    def __init__(
        self,
        *args: Any,
        source_dir: Path,
        max_shard_size: str,
        temperature: LearnedTemperature | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.source_dir = Path(source_dir)
        self.max_shard_size = max_shard_size
        self.temperature = temperature
        self._parts: dict[str, list] = {}
        if temperature is not None:
            self.add_callback(_TemperatureStep(self))

    # ------------------------------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        for name in _LOGGED_PARTS:
            value = getattr(outputs, name)
            if value is not None:
                total = self._parts.setdefault(name, [torch.zeros((), device=value.device), 0])
                total[0] = total[0] + value.float()
                total[1] += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for name, (total, count) in sorted(self._parts.items()):
                mean = total / count
                if self.args.world_size > 1:
                    mean = self.accelerator.reduce(mean, reduction="mean")
                logs[name] = float(mean)
            self._parts.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------ saving

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Weights with the official names, the source's tokenizer files, the temperature, the arguments."""
        if not self.args.should_save:
            return
        folder = Path(output_dir or self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is None:
            state_dict = model.state_dict()
        model.ovis.save_pretrained(
            folder, state_dict=state_dict, max_shard_size=self.max_shard_size, is_main_process=True
        )
        copy_inference_files(self.source_dir, folder)
        record = self.temperature.state() if self.temperature is not None else {}
        (folder / FINETUNE_STATE).write_text(json.dumps(record, indent=2) + "\n")
        torch.save(self.args, folder / TRAINING_ARGS)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume (without DeepSpeed, which loads its own files): the checkpoint's weights into the model."""
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_ovis_weights(target.ovis, Path(resume_from_checkpoint))

    def load_temperature(self, checkpoint: Path) -> None:
        """Resume the temperature and its optimizer state from a checkpoint's finetune_state.json."""
        if self.temperature is None:
            return
        state_file = Path(checkpoint) / FINETUNE_STATE
        try:
            self.temperature.load(json.loads(state_file.read_text()))
        except (FileNotFoundError, json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(
                f"{state_file} is missing or incomplete ({exc!r}); the temperature cannot be resumed from it"
            ) from exc


def deepspeed_config(settings: DeepSpeedSettings) -> dict[str, Any]:
    """A ZeRO config whose sizes, precision and clipping the Trainer fills in from its arguments ("auto").

    Stage 3 gathers the 16-bit weights on save, so every checkpoint has complete top-level safetensors
    (what `load_model` reads without consolidating ZeRO partitions). With optimizer offload DeepSpeed
    creates the optimizer itself (its CPU Adam); otherwise the Trainer's AdamW is used.
    """
    zero: dict[str, Any] = {"stage": settings.stage}
    if settings.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if settings.param_persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = settings.param_persistence_threshold
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if settings.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": zero,
    }
    if settings.offload_optimizer:
        params = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
        config["optimizer"] = {"type": "AdamW", "params": params}
    return config


def training_arguments(settings: FinetuneConfig, run_dir: Path, *, device: str) -> TrainingArguments:
    """The Trainer's arguments for these settings on `device` ("cpu" or "cuda")."""
    bf16 = settings.precision == "bf16" or (settings.precision == "auto" and device == "cuda")
    return TrainingArguments(
        output_dir=str(run_dir),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=bf16,
        use_cpu=device == "cpu",
        logging_steps=settings.logging_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        # The contrastive loss needs negatives: a last batch of one pair would have none.
        dataloader_drop_last=settings.uses_contrastive,
        dataloader_num_workers=settings.dataloader_workers,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # freeze.py trains only what the loss reaches
        deepspeed=deepspeed_config(settings.deepspeed) if settings.deepspeed else None,
        report_to=[],
        disable_tqdm=True,
    )
