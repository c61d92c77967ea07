"""What a checkpoint allows a job's generation settings, read with the checkpoint's own tokenizer and config.

A setting that can only fail must be refused before any work, not turn every row into an error: the
thinking budget needs room for the forced end of thinking, whose length is a property of the tokenizer
(upstream's sentence is 25 tokens with Ovis2.5's vocabulary and 37 with a plain Qwen3 one); the longest
prompt (the text, the template and the visual tokens of an image at `max_pixels`) plus `max_new_tokens`
must fit the language model's context (`max_position_embeddings`) and, for an engine that plans a fixed
length, that length. Only the tokenizer and config.json are read: no weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ovis_batch.errors import UsageError
from ovis_batch.model.checkpoint import chat_template, read_config
from ovis_batch.model.preprocess import FACTOR


class GenerationSettingsError(UsageError, ValueError):
    """Generation settings this checkpoint cannot honour; the message names the settings and the bound."""


@dataclass(frozen=True)
class GenerationLimits:
    """Token counts of one job's settings on one checkpoint (recorded in the run's plan)."""

    prompt_tokens: int  # the longest prompt: template, text and the visual tokens at max_pixels
    forced_ending_tokens: int | None  # the forced end of thinking (None: no thinking mode)
    context_tokens: int | None  # the language model's context (max_position_embeddings)


def max_visual_tokens(max_pixels: int) -> int:
    """Most visual tokens of one image resized within `max_pixels` (one token per FACTOR x FACTOR block)."""
    return max(1, math.ceil(max_pixels / (FACTOR * FACTOR)))


def generation_limits(folder: Path, *, prompt: str, max_pixels: int, thinking: bool) -> GenerationLimits:
    """Count the tokens that `prompt` and the forced ending take with this checkpoint's tokenizer."""
    config = read_config(folder)
    if config["model_type"] == "ovis2":
        text_config = config.get("text_config") or {}
        return GenerationLimits(
            prompt_tokens=max_visual_tokens(max_pixels),
            forced_ending_tokens=None,
            context_tokens=text_config.get("max_position_embeddings"),
        )
    from ovis_batch.model.layouts import read_ovis2_5_config
    from ovis_batch.model.prompts import PromptBuilder
    from ovis_batch.model.runtime import load_tokenizer

    try:
        builder = PromptBuilder(load_tokenizer(folder), chat_template(folder))
    except ValueError as exc:
        raise GenerationSettingsError(
            f"the tokenizer or chat template in {folder} cannot be used: {exc}"
        ) from exc
    llm = read_ovis2_5_config(folder).llm_config
    return GenerationLimits(
        prompt_tokens=len(builder.build(prompt, max_visual_tokens(max_pixels), thinking)),
        forced_ending_tokens=len(builder.early_stop_ids),
        context_tokens=getattr(llm, "max_position_embeddings", None),
    )


def check_generation_settings(
    folder: Path,
    *,
    prompt: str,
    max_new_tokens: int,
    thinking: bool,
    thinking_budget: int | None,
    max_pixels: int,
    engine_max_len: int | None = None,
) -> GenerationLimits:
    """Refuse settings that cannot work on this checkpoint (GenerationSettingsError, naming the keys and
    the numbers); `engine_max_len`: the prompt + output length an engine plans for (vLLM's max_model_len)."""
    limits = generation_limits(folder, prompt=prompt, max_pixels=max_pixels, thinking=thinking)
    if thinking and thinking_budget is not None and limits.forced_ending_tokens is not None:
        least = thinking_budget + limits.forced_ending_tokens + 1
        if max_new_tokens < least:
            raise GenerationSettingsError(
                f"max_new_tokens={max_new_tokens} leaves no room for an answer after thinking_budget="
                f"{thinking_budget}: this checkpoint's tokenizer writes the forced end of thinking in "
                f"{limits.forced_ending_tokens} tokens, so max_new_tokens must be at least {least} "
                f"({thinking_budget} + {limits.forced_ending_tokens} + 1; more for useful answers). "
                "Raise max_new_tokens or lower thinking_budget"
            )
    needed = limits.prompt_tokens + max_new_tokens
    for limit, what, fix in (
        (
            limits.context_tokens,
            "the language model's context (max_position_embeddings in config.json)",
            "lower max_new_tokens or max_pixels",
        ),
        (
            engine_max_len,
            "vllm_max_model_len",
            "raise vllm_max_model_len, or lower max_new_tokens or max_pixels",
        ),
    ):
        if limit is not None and needed > limit:
            raise GenerationSettingsError(
                f"a row can need {needed} tokens ({limits.prompt_tokens} of prompt, with "
                f"{max_visual_tokens(max_pixels)} visual tokens for an image at max_pixels, + max_new_tokens="
                f"{max_new_tokens}), more than {what} allows ({limit}); {fix}"
            )
    return limits
