"""A real vLLM engine against the `hf` engine on the same tiny weights: identical token ids and results,
greedy and with upstream's two-phase thinking budget, and the same prompt length.

    .venv-vllm/bin/python -m pytest -q -m vllm      # the environment with vLLM's CPU build (README.md)

Runs on vLLM's CPU build (CI) or its CUDA build on a GPU; skipped without vLLM. The checkpoint is the
`vllm_checkpoint` fixture (`make-tiny-model --official-vocab --head-dim 32 --seed 2`), float32 on both
sides, greedy. tests/model/test_vllm_engine.py checks the same request building against a stand-in
engine in the default environment.
"""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image

import ovis_batch
from ovis_batch.model.vllm_engine import load_vllm_model

pytestmark = pytest.mark.vllm

PROMPTS = ["Describe the image.", "How many cats?", "Write a caption.", "Why?"]
FIELDS = ("token_ids", "text", "reasoning", "thinking_truncated", "finish_reason")
COUNTS = ("prompt_tokens", "output_tokens", "reasoning_tokens", "visual_tokens")


@pytest.fixture(scope="module")
def hf(vllm_checkpoint, vllm_replica_device):
    return ovis_batch.load_model(vllm_checkpoint, device=vllm_replica_device, dtype="float32")


@pytest.fixture(scope="module")
def rows(hf, photos):
    """Three photos (model inputs 1024x448, 448x672, 896x608) under four prompts: twelve rows."""
    images = [
        Image.fromarray(photos["astronaut"]).resize((1024, 448)),
        Image.fromarray(photos["chelsea"]),
        Image.fromarray(photos["coffee"]).resize((896, 608)),
    ]
    prepared = hf.prepare(images)
    return [p for p in prepared for _ in PROMPTS], [q for _ in prepared for q in PROMPTS]


@pytest.fixture(scope="module")
def engine(vllm_checkpoint, vllm_replica_device):
    """(event loop, model): the engine serves the loop of its first request, so every test uses one."""
    runner = asyncio.Runner()
    model = load_vllm_model(
        vllm_checkpoint,
        name="tiny",
        device=vllm_replica_device,
        dtype="float32",
        max_new_tokens=64,
        min_pixels=448 * 448,
        max_pixels=1792 * 1792,
        embedding=None,
        gpu_memory_utilization=None,
        kv_cache_gib=0.25,
        max_model_len=4096,
        max_num_seqs=32,
        enforce_eager=True,
    )
    yield runner, model
    model.close()
    runner.close()


def assert_same_results(hf_results, engine_results):
    for i, (a, b) in enumerate(zip(hf_results, engine_results, strict=True)):
        assert not isinstance(b, Exception) and b.ok, f"row {i}: {b}"
        assert [getattr(b, f) for f in FIELDS] == [getattr(a, f) for f in FIELDS], f"row {i}"
        assert [getattr(b, f) for f in COUNTS] == [getattr(a, f) for f in COUNTS], f"row {i}"


def test_greedy_rows_are_the_hf_engines_token_for_token(hf, rows, engine):
    runner, model = engine
    items, prompts = rows
    settings = {"max_new_tokens": 32}
    ours = runner.run(model.agenerate(items, prompts, **settings))
    theirs = hf.generate(items, prompts, **settings)
    assert_same_results(theirs, ours)
    # Not a vacuous match: rows stop at <|im_end|> and run to the cap, and say different things.
    assert {r.finish_reason for r in theirs} == {"stop", "length"}
    assert len({tuple(r.token_ids) for r in theirs}) >= 3


def budget_outcome(result, budget: int, special) -> str:
    phase1 = result.token_ids[:budget]
    if special.im_end in phase1:
        return "finished inside the budget"  # one request
    if special.think_end in phase1:
        return "</think> inside the budget"  # phase 2 without the forced ending
    return "truncated"  # phase 2 after the forced ending


@pytest.mark.parametrize("budget", [4, 8])
def test_thinking_budget_rows_are_the_hf_engines_in_every_branch(hf, rows, engine, budget):
    runner, model = engine
    items, prompts = rows
    settings = {"max_new_tokens": 48, "thinking": True, "thinking_budget": budget}
    ours = runner.run(model.agenerate(items, prompts, **settings))
    theirs = hf.generate(items, prompts, **settings)
    assert_same_results(theirs, ours)
    outcomes = [budget_outcome(r, budget, hf.special) for r in theirs]
    assert set(outcomes) == {"finished inside the budget", "</think> inside the budget", "truncated"}
    forced = hf.prompts.early_stop_ids
    for result, outcome in zip(ours, outcomes, strict=True):
        assert result.thinking_truncated == (outcome == "truncated")
        if outcome == "truncated":  # phase 2 ran on vLLM after the forced ending, as in hf's
            assert result.token_ids[budget : budget + len(forced)] == forced
            assert len(result.token_ids) > budget + len(forced)


def test_thinking_without_a_budget_is_the_hf_engines(hf, rows, engine):
    runner, model = engine
    items, prompts = rows
    settings = {"max_new_tokens": 24, "thinking": True}
    assert_same_results(
        hf.generate(items, prompts, **settings), runner.run(model.agenerate(items, prompts, **settings))
    )


def test_vllm_expands_the_image_to_the_runtimes_prompt_length(hf, rows, engine):
    from ovis_batch.model.base import SamplingSettings

    runner, model = engine
    items, prompts = rows
    for thinking in (False, True):
        for prepared, prompt in zip(items[::4], prompts[::4], strict=True):
            request = model.builder.first_request(prompt, prepared, thinking=thinking, max_tokens=1)
            done = runner.run(model.engine.complete(request, SamplingSettings()))
            assert done.prompt_tokens == len(hf.prompts.build(prompt, prepared.visual_tokens, thinking))
