"""Typed settings of `ovis-batch finetune`, read once from YAML (`configs/finetune.yaml`) plus overrides.

Unknown keys and impossible values are refused before any work starts, naming the key (read with
`ovis_batch.config.load_config(FinetuneConfig, path, overrides)`). Library code takes plain values
from this object (a freeze spec, a learning rate), never the object itself; `training_arguments` in
`trainer.py` is the one place that turns it into Hugging Face `TrainingArguments`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ovis_batch.config import CaptionConfig
from ovis_batch.model.preprocess import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

DEFAULT_PIXEL_CEILING = 200_000_000
LOSSES = ("generation", "contrastive", "both")
_FREEZE = re.compile(r"^(?:(vte|all)|(top|bottom|vision\+top):(\d+))$")


@dataclass(frozen=True)
class FreezeSpec:
    """What trains: `kind` is vte, all, top, bottom or vision+top; `layers` is K for the layer kinds."""

    kind: str
    layers: int = 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.layers}" if self.layers else self.kind


def parse_freeze(text: str) -> FreezeSpec:
    """`vte`, `all`, `top:K`, `bottom:K` or `vision+top:K` (K >= 1) -> FreezeSpec; anything else raises."""
    match = _FREEZE.match(text.strip())
    if match is None:
        raise ValueError(
            f"freeze spec {text!r} is not one of vte, all, top:K, bottom:K, vision+top:K (K a layer count)"
        )
    whole, kind, count = match.groups()
    if whole:
        return FreezeSpec(whole)
    if int(count) < 1:
        raise ValueError(f"freeze spec {text!r}: K must be at least 1 (use vte to train no LLM layer)")
    return FreezeSpec(kind, int(count))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DeepSpeedSettings(_Strict):
    """DeepSpeed ZeRO through the Trainer's integration (needs `pip install deepspeed`)."""

    stage: Literal[1, 2, 3] = Field(
        2, description="ZeRO stage: 1 optimizer states, 2 + gradients, 3 + weights."
    )
    offload_optimizer: bool = Field(
        False, description="Keep optimizer states in CPU memory (slower, smaller)."
    )
    offload_params: bool = Field(False, description="ZeRO-3 only: keep weights in CPU memory between uses.")
    param_persistence_threshold: int | None = Field(
        None, ge=0, description="ZeRO-3: tensors this small stay whole on every rank (null: DeepSpeed's 1e5)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> DeepSpeedSettings:
        if (self.offload_params or self.param_persistence_threshold is not None) and self.stage != 3:
            raise ValueError(
                "deepspeed.offload_params and param_persistence_threshold need stage 3 (only ZeRO-3 "
                "partitions the weights)"
            )
        return self


class FinetuneConfig(_Strict):
    """Settings of `ovis-batch finetune`. See configs/finetune.yaml for a documented copy of the defaults."""

    # ---- pairs data
    id_column: str = Field("image_id", min_length=1, description="Id of each pair (reported when skipped).")
    image_column: str = Field(
        "image", min_length=1, description="Path or URI (relative to the Parquet file's folder), or bytes."
    )
    caption_column: str = Field("caption", min_length=1, description="The caption to learn.")
    prompt: str = Field(
        CaptionConfig.model_fields["prompt"].default,
        min_length=1,
        description="Instruction before each caption (the caption job's default, so that scores compare).",
    )
    max_caption_tokens: int = Field(
        256, ge=1, description="Longer captions are cut to this many tokens (counted in the summary)."
    )
    min_pixels: int = Field(DEFAULT_MIN_PIXELS, ge=32 * 32, description="As in the caption job.")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=32 * 32, description="As in the caption job.")
    pixel_ceiling: int = Field(DEFAULT_PIXEL_CEILING, ge=1, description="Larger images are skipped.")
    decode: Literal["fast", "exact"] = Field("fast", description="As in the caption job.")
    scan_workers: int = Field(4, ge=1, description="Threads checking every pair before training starts.")

    # ---- what trains
    freeze: str = Field(
        "vte",
        description="What trains: vte | top:K | vision+top:K | bottom:K | all (everything else is frozen).",
    )
    train_visual_head: bool = Field(
        False, description="vte: also train the visual head (Linear + LayerNorm)."
    )
    train_lm_head: bool = Field(
        True, description="top:K and vision+top:K: also train lm_head (tied to the token embeddings in 2B)."
    )

    # ---- losses
    loss: Literal["generation", "contrastive", "both"] = Field("both", description="Which losses to train.")
    generation_weight: float = Field(1.0, ge=0, description="Weight of the caption's next-token loss (both).")
    contrastive_weight: float = Field(
        1.0, ge=0, description="Weight of the image-caption InfoNCE loss (both)."
    )
    embedding: Literal["last_token", "vte_mean"] = Field(
        "last_token", description="Embedding of the contrastive loss: the runtime's strategy of that name."
    )
    temperature: float = Field(
        0.07, gt=0.01, le=1.0, description="Initial InfoNCE temperature (learned; kept >= 0.01)."
    )

    # ---- optimisation
    learning_rate: float = Field(1e-5, gt=0, le=1.0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (0: none).")
    batch_size: int = Field(8, ge=1, description="Pairs per step and device (the in-batch negatives).")
    gradient_accumulation_steps: int = Field(1, ge=1)
    epochs: float = Field(1.0, gt=0, description="Passes over the pairs (unless max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    seed: int = Field(0, description="Seed of the data order and of every random number of the run.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (less memory)."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available.")
    dataloader_workers: int = Field(2, ge=0, description="Processes decoding images during training.")

    # ---- checkpoints and logging
    save_steps: int = Field(500, ge=1, description="A checkpoint-N every this many steps (and at the end).")
    save_total_limit: int | None = Field(None, ge=1, description="Keep only the newest N checkpoints.")
    logging_steps: int = Field(10, ge=1, description="Log the losses every this many steps.")
    max_shard_size: str = Field("5GB", pattern=r"^\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)$")

    # ---- distribution
    deepspeed: DeepSpeedSettings | None = Field(None, description="DeepSpeed ZeRO settings; null: plain DDP.")
    workers: int = Field(1, ge=1, description="Ray Train workers (one process each; with --address).")
    gpus_per_worker: float = Field(1, ge=0, description="GPUs per Ray Train worker (0: CPU training).")
    cpus_per_worker: float = Field(4, gt=0, description="CPUs per Ray Train worker (data loading included).")

    @field_validator("freeze")
    @classmethod
    def _freeze_parses(cls, value: str) -> str:
        parse_freeze(value)
        return value.strip()

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        if self.loss != "generation" and self.batch_size < 2:
            raise ValueError(
                f"loss {self.loss!r} needs batch_size >= 2: the contrastive loss takes its negatives from "
                "the other pairs of the batch"
            )
        if self.loss == "both" and self.generation_weight == 0 and self.contrastive_weight == 0:
            raise ValueError("generation_weight and contrastive_weight are both 0: nothing would be learned")
        columns = [self.id_column, self.image_column, self.caption_column]
        if len(set(columns)) != 3:
            raise ValueError(f"id_column, image_column and caption_column must differ, got {columns}")
        return self

    @property
    def freeze_spec(self) -> FreezeSpec:
        return parse_freeze(self.freeze)

    @property
    def uses_generation(self) -> bool:
        return self.loss in ("generation", "both")

    @property
    def uses_contrastive(self) -> bool:
        return self.loss in ("contrastive", "both")

    def loss_weights(self) -> tuple[float, float]:
        """(generation, contrastive) weights as the loss applies them (0 for a loss that is off)."""
        if self.loss == "generation":
            return 1.0, 0.0
        if self.loss == "contrastive":
            return 0.0, 1.0
        return self.generation_weight, self.contrastive_weight
