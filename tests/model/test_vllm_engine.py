"""The vLLM engine path without vLLM: the requests it sends for a row, the two-phase thinking budget
per request, and the results, checked against the `hf` engine on the tiny checkpoint.

`RuntimeEngine` answers each request the way vLLM's Ovis2.5 does (expand the one `<image>` token to the
image block, resize into vLLM's fixed pixel range, generate up to `max_tokens`, keep the stopping
token), computed by the project's runtime. So these tests run the same request building, budget logic
and result filling as a GPU replica; what they cannot check is vLLM's own numerics (the GPU-marked
agreement test in tests/pipeline/test_vllm_job.py does).
"""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from ovis_batch.model.base import SamplingSettings
from ovis_batch.model.preprocess import PreparedImage, prepare_image
from ovis_batch.model.vllm_engine import (
    VLLM_MAX_PIXELS,
    VLLM_MIN_PIXELS,
    Completion,
    EngineError,
    EngineRequest,
    RequestBuilder,
    VllmOvisModel,
    check_vllm_vocabulary,
    collapse_image_block,
    engine_keeps_size,
    expand_image_token,
    generate_row,
    sampling_kwargs,
    vllm_token_ids,
)

PROMPT = "Write a short caption for this picture."


class RuntimeEngine:
    """A `TokenEngine` that does what vLLM's Ovis2.5 does with a request, using the project's runtime."""

    def __init__(self, model, image_token_id: int) -> None:
        self.model, self.image_token_id = model, image_token_id
        self.requests: list[EngineRequest] = []

    async def complete(self, request: EngineRequest, sampling: SamplingSettings) -> Completion:
        self.requests.append(request)
        prepared = prepare_image(request.image, min_pixels=VLLM_MIN_PIXELS, max_pixels=VLLM_MAX_PIXELS)
        ids = expand_image_token(request.prompt_token_ids, self.image_token_id, prepared.visual_tokens)
        with torch.inference_mode():
            (visual,) = self.model._visual([prepared])
            row = self.model._embed_row(ids, visual)
            (out,) = self.model._llm_generate([row], request.max_tokens, sampling)
        return Completion(out, "stop" if out and out[-1] in self.model.end_ids else "length", len(ids))


class ScriptedEngine:
    """Returns the next scripted token list for each request (cut at max_tokens) and records requests."""

    def __init__(self, *scripts: list[int]) -> None:
        self.scripts = list(scripts)
        self.requests: list[EngineRequest] = []

    async def complete(self, request: EngineRequest, sampling: SamplingSettings) -> Completion:
        self.requests.append(request)
        return Completion(self.scripts.pop(0)[: request.max_tokens], "length")


class FailingEngine(RuntimeEngine):
    async def complete(self, request: EngineRequest, sampling: SamplingSettings) -> Completion:
        if request.image.size[0] > 2 * request.image.size[1]:  # the wide photo
            raise RuntimeError("prompt is longer than max_model_len")
        return await super().complete(request, sampling)


@pytest.fixture(scope="module")
def images(photos):
    astronaut = Image.fromarray(photos["astronaut"])
    chelsea = Image.fromarray(photos["chelsea"])
    coffee = Image.fromarray(photos["coffee"]).resize((900, 300))
    return [astronaut, chelsea, coffee]


@pytest.fixture(scope="module")
def prepared(tiny_model, images) -> list[PreparedImage]:
    return tiny_model.prepare(images)


@pytest.fixture(scope="module")
def image_token_id(tiny_model) -> int:
    return vllm_token_ids(tiny_model.tokenizer)["<image>"]


def engine_model(tiny_model, engine, image_token_id) -> VllmOvisModel:
    return VllmOvisModel(
        engine,
        tiny_model.tokenizer,
        tiny_model.prompts.chat_template,
        name="tiny",
        weights_sha256=tiny_model.weights_sha256,
        hidden_size=tiny_model.hidden_size,
        dtype="float32",
        embedder=tiny_model,
        image_token_id=image_token_id,
        min_pixels=tiny_model.min_pixels,
        max_pixels=tiny_model.max_pixels,
    )


# ------------------------------------------------------------------------------------------ requests


@pytest.mark.parametrize("thinking", [False, True])
def test_prompt_ids_are_the_hf_paths_with_one_image_token(tiny_model, prepared, image_token_id, thinking):
    builder = RequestBuilder(tiny_model.prompts, image_token_id)
    for p, prompt in zip(prepared, [PROMPT, "How many cats?", "Describe it."], strict=True):
        request = builder.first_request(prompt, p, thinking=thinking, max_tokens=9)
        hf_ids = tiny_model.prompts.build(prompt, p.visual_tokens, thinking)
        assert request.prompt_token_ids.count(image_token_id) == 1
        assert min(request.prompt_token_ids) >= 0  # vLLM refuses the runtime's negative placeholders
        assert expand_image_token(request.prompt_token_ids, image_token_id, p.visual_tokens) == hf_ids
        assert request.max_tokens == 9


def test_prompt_ids_equal_what_vllms_tokenizer_makes_of_the_rendered_prompt(tiny_model, image_token_id):
    """vLLM adds `<image>` as a token; its own tokenisation of the chat text gives our ids."""
    extended = copy.deepcopy(tiny_model.tokenizer)
    extended.add_tokens(["<image>", "<video>", "<ovis_visual_atom>"], special_tokens=True)
    builder = RequestBuilder(tiny_model.prompts, image_token_id)
    for thinking in (False, True):
        text = tiny_model.prompts.render(PROMPT, with_image=True, thinking=thinking)
        ids = collapse_image_block(tiny_model.prompts.build(PROMPT, 7, thinking), image_token_id)
        assert extended(text, add_special_tokens=False).input_ids == ids
        assert builder.runtime_ids(PROMPT, 7, thinking) == tiny_model.prompts.build(PROMPT, 7, thinking)


def test_request_image_is_exactly_the_model_input(tiny_model, prepared, image_token_id):
    builder = RequestBuilder(tiny_model.prompts, image_token_id)
    for p in prepared:
        image = builder.first_request(PROMPT, p, thinking=False, max_tokens=4).image
        assert image.mode == "RGB" and image.size == (p.input_width, p.input_height)
        assert engine_keeps_size(p.input_width, p.input_height)
        again = prepare_image(image, min_pixels=VLLM_MIN_PIXELS, max_pixels=VLLM_MAX_PIXELS)
        np.testing.assert_array_equal(again.patches, p.patches)


def test_sizes_outside_vllms_fixed_range_are_refused_per_row(tiny_model, image_token_id, photos):
    assert not engine_keeps_size(32 * 10, 32 * 10)  # below 448 x 448: vLLM would upscale it
    assert not engine_keeps_size(2048, 2048)  # above 1792 x 1792: vLLM would shrink it
    assert engine_keeps_size(448, 448) and engine_keeps_size(1792, 1792)
    model = engine_model(tiny_model, ScriptedEngine(), image_token_id)
    small = prepare_image(Image.fromarray(photos["chelsea"]), min_pixels=4096, max_pixels=65536)
    (result,) = asyncio.run(model.agenerate([small], PROMPT, max_new_tokens=4))
    assert result.error_type == "size_unsupported_by_engine"
    assert "engine: hf" in result.error_message and "min_pixels/max_pixels" in result.error_message


def test_sampling_settings_map_to_vllm_parameters():
    greedy = sampling_kwargs(SamplingSettings(), 17, [5, 6])
    assert greedy["temperature"] == 0.0 and greedy["repetition_penalty"] == 1.0
    assert greedy["max_tokens"] == 17 and greedy["stop_token_ids"] == [5, 6] and greedy["seed"] is None
    assert greedy["detokenize"] is False  # the project's tokenizer decodes, for both engines alike
    sampled = sampling_kwargs(SamplingSettings(True, 0.7, 0.9, 11, 1.1, 1234), 8, [5])
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (0.7, 0.9, 11)
    assert sampled["repetition_penalty"] == 1.1 and sampled["seed"] == 1234


def test_vocabulary_check_refuses_tokenizers_vllm_would_misread(tiny_model):
    ids = vllm_token_ids(tiny_model.tokenizer)
    # vLLM appends its tokens after the vocabulary, in its order.
    assert ids["<ovis_image_start>"] == ids["<image>"] + 3 == len(tiny_model.tokenizer) + 3
    with pytest.raises(EngineError, match="engine: hf"):
        check_vllm_vocabulary(tiny_model.tokenizer, "tiny")


# ------------------------------------------------------------------------------------------ budget


def run_row(engine, builder, prepared_image, **kwargs):
    return asyncio.run(
        generate_row(engine, builder, PROMPT, prepared_image, sampling=SamplingSettings(), **kwargs)
    )


def test_budget_second_request_appends_the_forced_ending(tiny_model, prepared, image_token_id):
    builder = RequestBuilder(tiny_model.prompts, image_token_id)
    special, forced = tiny_model.special, tiny_model.prompts.early_stop_ids
    thinking_tokens, answer = [11, 12, 13, 14], [21, 22, special.im_end]
    engine = ScriptedEngine(thinking_tokens, answer)
    budget, max_new = 4, 4 + len(forced) + 10
    out = run_row(engine, builder, prepared[0], max_new_tokens=max_new, thinking=True, thinking_budget=budget)
    first, second = engine.requests
    assert first.max_tokens == budget
    assert second.prompt_token_ids == first.prompt_token_ids + thinking_tokens + forced
    assert second.max_tokens == max_new - budget - len(forced) == 10
    assert second.image is first.image
    assert out.token_ids == thinking_tokens + forced + answer and out.thinking_truncated


def test_budget_second_request_without_forced_ending_when_thinking_closed(
    tiny_model, prepared, image_token_id
):
    builder = RequestBuilder(tiny_model.prompts, image_token_id)
    closed = [11, tiny_model.special.think_end, 12, 13]
    engine = ScriptedEngine(closed, [31, tiny_model.special.im_end])
    out = run_row(engine, builder, prepared[0], max_new_tokens=40, thinking=True, thinking_budget=4)
    assert engine.requests[1].prompt_token_ids == engine.requests[0].prompt_token_ids + closed
    assert engine.requests[1].max_tokens == 36
    assert out.token_ids == [*closed, 31, tiny_model.special.im_end] and not out.thinking_truncated


@pytest.mark.parametrize("ending", ["answer", "short"])
def test_rows_that_finish_inside_the_budget_send_one_request(tiny_model, prepared, image_token_id, ending):
    builder = RequestBuilder(tiny_model.prompts, image_token_id)
    special = tiny_model.special
    phase1 = [11, special.think_end, 12, special.im_end] if ending == "answer" else [11, special.pad]
    engine = ScriptedEngine(phase1)
    out = run_row(engine, builder, prepared[0], max_new_tokens=40, thinking=True, thinking_budget=4)
    assert len(engine.requests) == 1 and out.token_ids == phase1 and not out.thinking_truncated


def test_an_engine_that_expands_the_image_differently_fails_the_row(tiny_model, prepared, image_token_id):
    """vLLM says how long the prompt it ran was: another length than the runtime's means another image
    block than the model's own, so the row is an error rather than a caption of other inputs."""

    class OffByOne(ScriptedEngine):
        async def complete(self, request, sampling):
            done = await super().complete(request, sampling)
            length = len(
                expand_image_token(request.prompt_token_ids, image_token_id, prepared[0].visual_tokens)
            )
            return Completion(done.token_ids, done.finish_reason, length + 1)

    builder = RequestBuilder(tiny_model.prompts, image_token_id)
    with pytest.raises(RuntimeError, match="image processing differs from the runtime's"):
        run_row(
            OffByOne([1, 2]), builder, prepared[0], max_new_tokens=5, thinking=False, thinking_budget=None
        )


def test_prompt_tokens_count_the_expanded_image_as_hf_does(tiny_model, prepared, image_token_id):
    builder = RequestBuilder(tiny_model.prompts, image_token_id)
    out = run_row(
        ScriptedEngine([1, 2]), builder, prepared[1], max_new_tokens=5, thinking=False, thinking_budget=None
    )
    assert out.prompt_tokens == len(tiny_model.prompts.build(PROMPT, prepared[1].visual_tokens, False))


# ------------------------------------------------------------------------------------------ against hf


@pytest.mark.parametrize(
    "settings",
    [
        {"max_new_tokens": 10},
        {"max_new_tokens": 30, "thinking": True},
        {"max_new_tokens": 60, "thinking": True, "thinking_budget": 4},
        {"max_new_tokens": 60, "thinking": True, "thinking_budget": 9},
    ],
    ids=["plain", "thinking", "budget-4", "budget-9"],
)
def test_engine_path_gives_the_hf_paths_results(tiny_model, prepared, image_token_id, settings):
    model = engine_model(tiny_model, RuntimeEngine(tiny_model, image_token_id), image_token_id)
    prompts = [PROMPT, "How many cats can you see?", "Describe the image in one sentence."]
    hf = tiny_model.generate(prepared, prompts, embedding="vte_mean", **settings)
    ours = asyncio.run(model.agenerate(prepared, prompts, embedding="vte_mean", **settings))
    for a, b in zip(hf, ours, strict=True):
        assert b.ok and b.token_ids == a.token_ids
        assert (b.text, b.reasoning, b.thinking_truncated) == (a.text, a.reasoning, a.thinking_truncated)
        assert (b.prompt_tokens, b.output_tokens, b.reasoning_tokens) == (
            a.prompt_tokens,
            a.output_tokens,
            a.reasoning_tokens,
        )
        assert b.finish_reason == a.finish_reason and b.visual_tokens == a.visual_tokens
        np.testing.assert_allclose(b.embedding, a.embedding, atol=1e-6)


def test_budget_branches_are_all_exercised(tiny_model, prepared, image_token_id):
    """The equality above is only as strong as the branches it covers: truncated rows and rows that go on
    into phase 2 after closing `</think>` themselves (or stop inside the budget) must both occur."""
    engine = RuntimeEngine(tiny_model, image_token_id)
    model = engine_model(tiny_model, engine, image_token_id)
    outcomes = set()
    for budget in (4, 9):
        for result in asyncio.run(
            model.agenerate(prepared, PROMPT, max_new_tokens=60, thinking=True, thinking_budget=budget)
        ):
            outcomes.add("truncated" if result.thinking_truncated else "closed-or-finished")
    assert outcomes == {"truncated", "closed-or-finished"}


def test_a_row_the_engine_fails_is_that_rows_error(tiny_model, prepared, image_token_id):
    model = engine_model(tiny_model, FailingEngine(tiny_model, image_token_id), image_token_id)
    results = asyncio.run(model.agenerate(prepared, PROMPT, max_new_tokens=6))
    assert isinstance(results[2], RuntimeError) and "max_model_len" in str(results[2])
    assert results[0].ok and results[1].ok
    assert results[0].token_ids == tiny_model.generate(prepared[:1], PROMPT, max_new_tokens=6)[0].token_ids


def test_official_vocabulary_tiny_tokenizer_passes_the_vocabulary_check(tmp_path):
    """`make-tiny-model --official-vocab` is what the GPU tests hand vLLM: its indicators land where
    vLLM 0.34 expects them."""
    import json

    from ovis_batch.model.runtime import load_tokenizer
    from ovis_batch.model.tiny import _asset, _write_tokenizer

    template = json.loads(_asset("ovis2_5_chat_template.json"))["chat_template"]
    ids = _write_tokenizer(tmp_path, template, official_vocab=True)
    assert (ids["<|endoftext|>"], ids["<|im_end|>"], ids["</think>"]) == (151643, 151645, 151668)
    tokenizer = load_tokenizer(tmp_path)
    assert check_vllm_vocabulary(tokenizer, tmp_path) == 151669
    assert vllm_token_ids(tokenizer)["<ovis_image_start>"] == 151672


def test_vllm_plugin_lets_transformers_read_the_official_config_without_remote_code(upstream_dir):
    """What vLLM does with an official folder: AutoConfig with trust_remote_code off. Without the plugin
    transformers asks to run the checkpoint's code (or, from 5.25, builds its own default-size config);
    with it, our classes read llm_config / vit_config. Run in a child process: the registration is
    process-wide and would shadow transformers' own ovis2_5 class in the other tests."""
    import json
    import subprocess
    import sys
    from importlib.metadata import entry_points

    script = (
        "import json, sys\n"
        "from transformers import AutoConfig\n"
        "from ovis_batch.model.vllm_plugin import register\n"
        "register()\n"
        "c = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=False)\n"
        "print(json.dumps([type(c).__module__, c.llm_config.hidden_size, c.vit_config.hidden_size,"
        " c.visual_vocab_size, c.architectures]))\n"
    )
    folder = upstream_dir / "checkpoint"
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=120, check=True
    )
    module, llm_hidden, vit_hidden, visual_vocab, architectures = json.loads(
        done.stdout.strip().splitlines()[-1]
    )
    official = json.loads((folder / "config.json").read_text())
    assert module == "ovis_batch.model.ovis2_5"
    assert llm_hidden == official["llm_config"]["hidden_size"]
    assert vit_hidden == official["vit_config"]["hidden_size"]
    assert visual_vocab == official["visual_vocab_size"] and architectures == ["Ovis2_5"]
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("ovis_batch_ovis2_5") == "ovis_batch.model.vllm_plugin:register"


def test_vllms_gpu_share_leaves_room_for_the_embedding_runtime():
    from ovis_batch.model.vllm_engine import auto_gpu_memory_utilization, default_max_model_len

    gib = 2**30
    assert auto_gpu_memory_utilization(0, 141 * gib) == 0.90  # no runtime model beside the engine
    share = auto_gpu_memory_utilization(20 * gib, 141 * gib)  # a 9B runtime model in bf16
    assert share == pytest.approx(0.90 - 26 / 141, abs=1e-3)
    with pytest.raises(EngineError, match="embedding: null"):
        auto_gpu_memory_utilization(50 * gib, 80 * gib)  # leaves vLLM 0.2 of the card
    # The largest image at max_pixels (3136 tokens + 2 indicator rows), a prompt allowance and the output.
    assert default_max_model_len(1792 * 1792, 1024) >= 3138 + 1024 + 256


def _start_engine_core_under(queue) -> None:
    """A stand-in for the process that starts an engine: its child is named as vLLM names its engine core."""
    import multiprocessing
    import os
    import time

    from ovis_batch.model.vllm_plugin import END_WITH_PARENT_ENV

    os.environ[END_WITH_PARENT_ENV] = "1"
    child = multiprocessing.get_context("spawn").Process(target=_engine_core, name="EngineCore", daemon=False)
    child.start()
    queue.put(child.pid)
    time.sleep(600)


def _engine_core() -> None:
    import time

    from ovis_batch.model.vllm_plugin import register

    register()  # what vLLM's plugin loading runs in its engine-core process
    time.sleep(600)


def test_an_engine_core_ends_with_the_process_that_started_it():
    """A replica killed outright runs no cleanup: the engine core, told by the plugin, goes with it."""
    import multiprocessing
    import os
    import signal

    import psutil

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    replica = context.Process(target=_start_engine_core_under, args=(queue,))
    replica.start()
    engine_core = psutil.Process(queue.get(timeout=120))
    try:
        _, running = psutil.wait_procs([engine_core], timeout=2)
        assert running, "the engine core runs while the process that started it does"
        os.kill(replica.pid, signal.SIGKILL)
        _, alive = psutil.wait_procs([engine_core], timeout=30)
        assert not alive, "the engine core outlived the process that started it"
    finally:
        replica.kill()
        if engine_core.is_running():
            engine_core.kill()
