"""What every model family behind the runtime API shares: results, sampling settings, the generate
skeleton (argument checks, per-image errors, batching of the good images), embedding-strategy checks,
end-token handling and identity fields.

A family (Ovis2.5 in `runtime.py`, Ovis2 in `ovis2.py`) subclasses `VisionLanguageModel` and supplies
how it prepares images (`prepare`), checks generation settings (`_check_generation`), runs a batch of
good images (`_generate_prepared`) and embeds (`embed_images`, `embed_texts`). Nothing here knows how a
model works inside.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ovis_batch.model.preprocess import ImageInputError

EMBEDDING_STRATEGIES = ("last_token", "vte_mean")


@dataclass
class GenerationResult:
    """One item's output. `error_type`/`error_message` are set (and the rest empty) when it failed."""

    text: str = ""
    reasoning: str | None = None
    thinking_truncated: bool = False
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    finish_reason: str = "stop"  # "stop" (end token), "length" (max_new_tokens), "error"
    visual_tokens: int = 0
    width: int = 0
    height: int = 0
    input_width: int = 0
    input_height: int = 0
    embedding: np.ndarray | None = None
    error_type: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None


@dataclass(frozen=True)
class SamplingSettings:
    do_sample: bool = False
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    def generation_config(self, max_new_tokens: int, end_ids: list[int], pad_id: int):
        """A complete transformers GenerationConfig: the checkpoint's own generation_config.json (sampling,
        a repetition penalty) never slips in; greedy unless asked."""
        from transformers import GenerationConfig

        settings: dict[str, Any] = {
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty or 1.0,
        }
        if self.do_sample:
            settings.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return GenerationConfig(
            max_new_tokens=max_new_tokens, eos_token_id=end_ids, pad_token_id=pad_id, **settings
        )

    def rng(self, device: torch.device):
        """A context in which sampling draws from this seed, leaving the global RNG state as it was."""
        return _SeededRng(self.seed, device)


class _SeededRng:
    def __init__(self, seed: int | None, device: torch.device) -> None:
        self.seed = seed
        self.fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    def __enter__(self) -> None:
        self.fork.__enter__()
        if self.seed is not None:
            torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        self.fork.__exit__(*exc)


def l2_normalize(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    return (x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)).cpu().numpy().astype(np.float32)


def check_strategy(strategy: str) -> None:
    if strategy not in EMBEDDING_STRATEGIES:
        raise ValueError(
            f"unknown embedding strategy {strategy!r}; choose one of {', '.join(EMBEDDING_STRATEGIES)}"
        )


def check_texts(texts: Sequence[str]) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text {i} is empty: an embedding needs some text")


def check_budget_room(max_new_tokens: int, thinking_budget: int | None, forced_tokens: int) -> None:
    """A thinking budget must leave room for the forced ending and an answer within `max_new_tokens`."""
    if thinking_budget is None:
        return
    if thinking_budget < 1:
        raise ValueError(f"thinking_budget must be >= 1, got {thinking_budget}")
    if max_new_tokens <= thinking_budget + forced_tokens:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for an answer after a thinking budget of "
            f"{thinking_budget} tokens and the {forced_tokens}-token forced ending; set max_new_tokens to at "
            f"least {thinking_budget + forced_tokens + 1} (more for useful answers) or lower the budget"
        )


def prompt_list(images: Sequence[Any], prompts: str | Sequence[str]) -> list[str]:
    """One prompt per image (a single string applies to all)."""
    out = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(out) != len(images):
        raise ValueError(f"got {len(images)} images but {len(out)} prompts")
    return out


def cut_at_end(rows: list[list[int]], end_ids: Sequence[int]) -> list[list[int]]:
    """Each row cut after its first end token (the stopping token is kept, as upstream returns it)."""
    out = []
    for row in rows:
        for j, tok in enumerate(row):
            if tok in end_ids:
                row = row[: j + 1]
                break
        out.append(row)
    return out


def result_for(prepared: Any) -> GenerationResult:
    """An empty result for a prepared image (sizes filled in), or an error result for an ImageInputError."""
    if isinstance(prepared, ImageInputError):
        return GenerationResult(
            finish_reason="error", error_type=prepared.error_type, error_message=str(prepared)
        )
    return GenerationResult(
        visual_tokens=prepared.visual_tokens,
        width=prepared.width,
        height=prepared.height,
        input_width=prepared.input_width,
        input_height=prepared.input_height,
    )


@dataclass
class RowOutput:
    """What a family's batch generation gives for one good row."""

    prompt_tokens: int
    token_ids: list[int]
    thinking_truncated: bool = False


class VisionLanguageModel:
    """The public runtime API; subclasses supply the family-specific steps."""

    model_type: str = ""
    name: str
    revision: str | None
    weights_sha256: str
    min_pixels: int
    max_pixels: int
    tokenizer: Any
    end_ids: list[int]  # generation stops at any of these
    think_start_id: int | None = None
    think_end_id: int | None = None

    # ------------------------------------------------------------------ to supply
    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    def prepare(
        self, images: Sequence[Any], min_pixels: int | None = None, max_pixels: int | None = None
    ) -> list:
        raise NotImplementedError

    def _check_generation(self, max_new_tokens: int, thinking: bool, thinking_budget: int | None) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

    def _generate_prepared(
        self,
        prepared: list[Any],
        prompts: list[str],
        *,
        max_new_tokens: int,
        thinking: bool,
        thinking_budget: int | None,
        sampling: SamplingSettings,
        embedding: str | None,
    ) -> tuple[list[RowOutput], np.ndarray | None]:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def model_info(self) -> dict[str, Any]:
        """What output metadata records so that any output can be traced to the weights that made it."""
        return {
            "name": self.name,
            "revision": self.revision,
            "weights_sha256": self.weights_sha256,
            "model_type": self.model_type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "hidden_size": self.hidden_size,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
        }

    def prepare_or_raise(self, images: Sequence[Any]) -> list[Any]:
        """Prepared inputs; the first bad image raises its ImageInputError, naming its index."""
        prepared = self.prepare(images)
        for i, p in enumerate(prepared):
            if isinstance(p, ImageInputError):
                raise ImageInputError(p.error_type, f"image {i}: {p}")
        return prepared

    def generate(
        self,
        images: Sequence[Any],
        prompts: str | Sequence[str],
        *,
        max_new_tokens: int = 512,
        thinking: bool = False,
        thinking_budget: int | None = None,
        do_sample: bool = False,
        temperature: float = 0.6,
        top_p: float = 0.95,
        top_k: int = 20,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        embedding: str | None = None,
    ) -> list[GenerationResult]:
        """Answer each (image, prompt); `embedding` also fills `.embedding` from the same vision pass.

        Images that cannot be used become results with `error_type`; the others run as one batch.
        """
        sampling = SamplingSettings(do_sample, temperature, top_p, top_k, repetition_penalty, seed)
        texts = prompt_list(images, prompts)
        self._check_generation(max_new_tokens, thinking, thinking_budget)
        if embedding is not None:
            check_strategy(embedding)
        prepared = self.prepare(images, min_pixels, max_pixels)
        results = [result_for(p) for p in prepared]
        good = [i for i, p in enumerate(prepared) if not isinstance(p, ImageInputError)]
        if not good:
            return results
        with torch.inference_mode():
            outputs, vectors = self._generate_prepared(
                [prepared[i] for i in good],
                [texts[i] for i in good],
                max_new_tokens=max_new_tokens,
                thinking=thinking,
                thinking_budget=thinking_budget,
                sampling=sampling,
                embedding=embedding,
            )
        for k, i in enumerate(good):
            self._fill(results[i], outputs[k], thinking)
            if vectors is not None:
                results[i].embedding = vectors[k]
        return results

    def _fill(self, result: GenerationResult, output: RowOutput, thinking: bool) -> None:
        """Token accounting, finish reason, and the split of reasoning and answer at the first `</think>`."""
        ids = output.token_ids
        result.prompt_tokens = output.prompt_tokens
        result.token_ids = ids
        result.output_tokens = len(ids)
        result.thinking_truncated = output.thinking_truncated
        result.finish_reason = "stop" if ids and ids[-1] in self.end_ids else "length"
        if thinking and self.think_end_id is not None and self.think_end_id in ids:
            k = ids.index(self.think_end_id)
            result.reasoning = self._decode([t for t in ids[:k] if t != self.think_start_id])
            result.reasoning_tokens = k + 1
            result.text = self._decode(ids[k + 1 :])
        else:
            result.reasoning = "" if thinking else None
            result.text = self._decode(ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
