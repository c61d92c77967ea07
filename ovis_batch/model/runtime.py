"""The runtime API the pipeline, the index and the checks call: `load_model` and `OvisModel`.

    import ovis_batch
    model = ovis_batch.load_model("path/or/org-name", device="cpu")
    results = model.generate(images, prompts, max_new_tokens=64, thinking=True, thinking_budget=256)
    image_vecs = model.embed_images(images, strategy="last_token")
    text_vecs = model.embed_texts(texts, strategy="last_token")

`OvisModel` owns one resident model. It takes PIL images, decoded arrays or `PreparedImage`s (uint8
patches made by a CPU worker), runs one packed vision pass for the whole batch, and generates for
left-padded rows, so that each item gives what it gives alone. Per-image problems (too small, too
elongated) become results with an error, never an exception for the whole batch.

Generation policy (kept close to upstream's `generate`, which is what the parity goldens record):
- greedy unless `do_sample=True`; stops at `<|im_end|>` (or `<|endoftext|>`); `token_ids` include the
  stopping token, as upstream returns it;
- thinking on: the chat template lets the model open `<think>`; with a `thinking_budget`, upstream's
  two-phase mechanism: generate at most `budget` tokens; if the answer did not finish and `</think>` is
  missing, append the forced-ending sentence; continue with what remains of `max_new_tokens`;
- the answer is what follows the first `</think>`; the reasoning is what precedes it, without the tags.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ovis_batch.model.base import (
    EMBEDDING_STRATEGIES,
    GenerationResult,
    RowOutput,
    SamplingSettings,
    VisionLanguageModel,
    check_budget_room,
    check_strategy,
    check_texts,
    cut_at_end,
    l2_normalize,
    prompt_list,
)
from ovis_batch.model.checkpoint import (
    CheckpointError,
    chat_template,
    iter_tensors,
    read_config,
    resolve_source,
    weight_files,
    weights_fingerprint,
)
from ovis_batch.model.layouts import official_tensors, read_ovis2_5_config
from ovis_batch.model.preprocess import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    ImageInputError,
    PreparedImage,
    normalize_patches,
    prepare_images,
)
from ovis_batch.model.prompts import IMAGE_SUMMARY_PROMPT, TEXT_SUMMARY_PROMPT, PromptBuilder

__all__ = ["EMBEDDING_STRATEGIES", "GenerationResult", "OvisModel", "SamplingSettings", "load_model"]
ImageLike = PIL.Image.Image | np.ndarray | PreparedImage


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on GPU, float32 on CPU (CPU bf16 matmuls are slow and the goldens are fp32)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class OvisModel(VisionLanguageModel):
    """One resident Ovis2.5 model with its tokenizer, prompts and preprocessing settings."""

    model_type = "ovis2_5"

    def __init__(
        self,
        module,
        tokenizer,
        template: str,
        *,
        name: str,
        weights_sha256: str,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        revision: str | None = None,
    ) -> None:
        self.module = module
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(tokenizer, template)
        self.special = self.prompts.special
        self.end_ids = [self.special.im_end, self.special.pad]
        self.think_start_id, self.think_end_id = self.special.think_start, self.special.think_end
        self.name = name
        self.revision = revision
        self.weights_sha256 = weights_sha256
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels

    # ------------------------------------------------------------------------------------------ identity

    @property
    def device(self) -> torch.device:
        return self.module.vte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.vte.weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.module.config.llm_config.hidden_size

    # ------------------------------------------------------------------------------------------ images

    def prepare(
        self, images: Sequence[ImageLike], min_pixels: int | None = None, max_pixels: int | None = None
    ) -> list[PreparedImage | ImageInputError]:
        """Each image as model input, or the per-image error that prevents it."""
        return prepare_images(
            images, min_pixels=min_pixels or self.min_pixels, max_pixels=max_pixels or self.max_pixels
        )

    def _pack(self, prepared: Sequence[PreparedImage]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """uint8 patches -> one normalised pixel tensor on the model's device (normalised there)."""
        patches = torch.from_numpy(np.concatenate([p.patches for p in prepared]))
        patches = patches.to(self.device, non_blocking=True)
        return normalize_patches(patches, self.dtype), [tuple(p.grid_thw) for p in prepared]

    def _visual(self, prepared: Sequence[PreparedImage]) -> list[torch.Tensor]:
        """One packed vision pass; the VTE embeddings of each image, `[visual tokens, hidden]`."""
        pixels, grids = self._pack(prepared)
        return list(self.module.visual_embeddings(pixels, grids).split([p.visual_tokens for p in prepared]))

    @torch.inference_mode()
    def visual_embeddings(self, image: ImageLike) -> torch.Tensor:
        """VTE output for one image: float32 `[visual tokens, hidden]` on the CPU."""
        (visual,) = self._visual(self.prepare_or_raise([image]))
        return visual.float().cpu()

    # ------------------------------------------------------------------------------------------ generate

    def next_token_logits(
        self, images: Sequence[ImageLike], prompts: str | Sequence[str], *, thinking: bool = False
    ) -> torch.Tensor:
        """float32 `[n, vocab]` logits of the first answer token, batched with left padding.

        For scoring (e.g. the likelihood of each choice letter) and for parity checks. Bad images raise.
        """
        texts = prompt_list(images, prompts)
        prepared = self.prepare_or_raise(images)
        with torch.inference_mode():
            rows = [
                self._embed_row(self.prompts.build(text, p.visual_tokens, thinking), v)
                for text, p, v in zip(texts, prepared, self._visual(prepared), strict=True)
            ]
            embeds, mask = self._left_pad(rows)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.module.llm(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=1
            )
            return out.logits[:, -1].float().cpu()

    def _check_generation(self, max_new_tokens: int, thinking: bool, thinking_budget: int | None) -> None:
        super()._check_generation(max_new_tokens, thinking, thinking_budget)
        if thinking:
            check_budget_room(max_new_tokens, thinking_budget, len(self.prompts.early_stop_ids))

    def _generate_prepared(
        self,
        prepared: list[PreparedImage],
        prompts: list[str],
        *,
        max_new_tokens: int,
        thinking: bool,
        thinking_budget: int | None,
        sampling: SamplingSettings,
        embedding: str | None,
    ) -> tuple[list[RowOutput], np.ndarray | None]:
        per_image = self._visual(prepared)
        rows = [
            self.prompts.build(text, p.visual_tokens, thinking)
            for text, p in zip(prompts, prepared, strict=True)
        ]
        prompt_embeds = [self._embed_row(ids, vis) for ids, vis in zip(rows, per_image, strict=True)]
        if thinking and thinking_budget is not None:
            outputs = self._generate_with_budget(prompt_embeds, max_new_tokens, thinking_budget, sampling)
        else:
            outputs = [(ids, False) for ids in self._llm_generate(prompt_embeds, max_new_tokens, sampling)]
        vectors = self._image_vectors(embedding, per_image) if embedding else None
        return [
            RowOutput(len(r), ids, truncated) for r, (ids, truncated) in zip(rows, outputs, strict=True)
        ], vectors

    def _embed_row(self, ids: list[int], visual: torch.Tensor | None) -> torch.Tensor:
        input_ids = torch.tensor([ids], device=self.device)
        return self.module.embed_inputs(input_ids, visual_embeds=visual)[0]

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.module.get_input_embeddings()(torch.tensor(ids, device=self.device, dtype=torch.long))

    def _left_pad(self, rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack `[L_i, H]` embeddings left-padded (pad token's embedding) and the attention mask."""
        width = max(r.shape[0] for r in rows)
        pad = self._embed_ids([self.special.pad])[0]
        embeds = pad.expand(len(rows), width, pad.shape[0]).clone()
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for b, r in enumerate(rows):
            embeds[b, width - r.shape[0] :] = r
            mask[b, width - r.shape[0] :] = 1
        return embeds, mask

    def _llm_generate(
        self, rows: Sequence[torch.Tensor], max_new_tokens: int, sampling: SamplingSettings
    ) -> list[list[int]]:
        """New token ids per row, each cut after its first end token (stopping token kept)."""
        embeds, mask = self._left_pad(rows)
        config = sampling.generation_config(max_new_tokens, self.end_ids, self.special.pad)
        with sampling.rng(self.device):
            out = self.module.llm.generate(
                inputs_embeds=embeds, attention_mask=mask, generation_config=config
            )
        return cut_at_end(out.tolist(), self.end_ids)

    def _generate_with_budget(
        self,
        prompt_embeds: list[torch.Tensor],
        max_new_tokens: int,
        thinking_budget: int,
        sampling: SamplingSettings,
    ) -> list[tuple[list[int], bool]]:
        """Upstream's two-phase thinking budget, applied per row: (token ids, thinking truncated)."""
        phase1 = self._llm_generate(prompt_embeds, thinking_budget, sampling)
        outputs: list[tuple[list[int], bool]] = []
        pending: list[tuple[int, list[int], int]] = []  # (row, ids so far, tokens left)
        for b, ids in enumerate(phase1):
            if self.special.im_end in ids or len(ids) < thinking_budget:
                outputs.append((ids, False))  # finished inside the budget
                continue
            truncated = self.special.think_end not in ids
            so_far = ids + (self.prompts.early_stop_ids if truncated else [])
            outputs.append((so_far, truncated))
            pending.append((b, so_far, max_new_tokens - len(so_far)))
        if pending:
            rows = [torch.cat([prompt_embeds[b], self._embed_ids(so_far)]) for b, so_far, _ in pending]
            longest = max(left for _, _, left in pending)
            phase2 = self._llm_generate(rows, longest, sampling)
            for (b, so_far, left), more in zip(pending, phase2, strict=True):
                outputs[b] = (so_far + more[:left], outputs[b][1])
        return outputs

    # ------------------------------------------------------------------------------------------ embeddings

    def embed_images(self, images: Sequence[ImageLike], strategy: str = "last_token") -> np.ndarray:
        """float32 `[n, hidden]`, L2-normalised. A bad image raises its ImageInputError (naming its index)."""
        check_strategy(strategy)
        prepared = self.prepare_or_raise(images)
        if not prepared:
            return np.zeros((0, self.hidden_size), np.float32)
        with torch.inference_mode():
            return self._image_vectors(strategy, self._visual(prepared))

    def embed_texts(self, texts: Sequence[str], strategy: str = "last_token") -> np.ndarray:
        """float32 `[n, hidden]`, L2-normalised, in the same space as `embed_images` with that strategy."""
        check_strategy(strategy)
        check_texts(texts)
        if not texts:
            return np.zeros((0, self.hidden_size), np.float32)
        with torch.inference_mode():
            if strategy == "vte_mean":
                return l2_normalize(
                    torch.stack([self._embed_ids(self.prompts.encode(t)).float().mean(0) for t in texts])
                )
            rows = [
                self._embed_ids(self.prompts.build(TEXT_SUMMARY_PROMPT.format(text=t), None, thinking=False))
                for t in texts
            ]
            return self._last_hidden(rows)

    def _image_vectors(self, strategy: str, per_image: Sequence[torch.Tensor]) -> np.ndarray:
        if strategy == "vte_mean":
            return l2_normalize(torch.stack([v.float().mean(0) for v in per_image]))
        rows = [
            self._embed_row(self.prompts.build(IMAGE_SUMMARY_PROMPT, v.shape[0], thinking=False), v)
            for v in per_image
        ]
        return self._last_hidden(rows)

    def _last_hidden(self, rows: Sequence[torch.Tensor]) -> np.ndarray:
        """Final hidden state (after the last norm) of each row's last token; rows are left-padded."""
        embeds, mask = self._left_pad(rows)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.module.llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        return l2_normalize(hidden.last_hidden_state[:, -1])


# ---------------------------------------------------------------------------------------------- loading


def load_model(
    source: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    attn_implementation: str = "sdpa",
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    revision: str | None = None,
    name: str | None = None,
):
    """Load an Ovis checkpoint folder or a hub id (`name`, default `source`, is what outputs record).

    Ovis2.5 checkpoints in either layout (official `llm_config` / `vit_config`, or transformers' native
    `text_config` / `vision_config`; see `layouts.py`) run on the project's own implementation. Ovis2
    (`model_type: ovis2`) checkpoints load through transformers' native classes behind the same API.
    `device` defaults to CUDA when available; `dtype` to bfloat16 on GPU and float32 on CPU. Training
    checkpoints (Trainer, DeepSpeed ZeRO) are resolved above this layer: `ovis_batch.load_model`.
    """
    name = name if name is not None else str(source)
    device = torch.device(device or default_device())
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    folder = resolve_source(source)
    config = read_config(folder)
    if config["model_type"] == "ovis2":
        from ovis_batch.model.ovis2 import load_ovis2

        return load_ovis2(
            folder,
            device=device,
            dtype=dtype,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            attn_implementation=attn_implementation,
            name=name,
            revision=revision,
        )
    started = time.perf_counter()
    module = load_ovis2_5_module(folder, device=device, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = load_tokenizer(folder)
    model = OvisModel(
        module,
        tokenizer,
        chat_template(folder),
        name=name,
        weights_sha256=weights_fingerprint(weight_files(folder)),
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        revision=revision,
    )
    model.load_seconds = time.perf_counter() - started
    return model


def load_tokenizer(folder: Path):
    """The Qwen2 BPE tokenizer, loaded by class (never AutoTokenizer, which would consult `auto_map`)."""
    from transformers import Qwen2Tokenizer

    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        raise CheckpointError(
            f"no tokenizer in {folder}: tokenizer.json (or vocab.json + merges.txt) is missing"
        )
    try:
        return Qwen2Tokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise CheckpointError(f"the tokenizer files in {folder} could not be loaded ({exc})") from exc


def load_ovis2_5_module(
    folder: Path, *, device: torch.device, dtype: torch.dtype, attn_implementation: str = "sdpa"
):
    """Build the module on the meta device and assign the checkpoint's tensors (no double allocation)."""
    from ovis_batch.model.ovis2_5 import Ovis2_5ForConditionalGeneration

    files = weight_files(folder)
    # Either layout (official or transformers' native): config and tensor names are read as official.
    config = read_ovis2_5_config(folder)
    config.llm_config._attn_implementation = attn_implementation
    with torch.device("meta"):
        module = Ovis2_5ForConditionalGeneration(config)
    expected = set(module.state_dict())
    tied = module.llm.config.tie_word_embeddings
    if tied:
        expected.discard("llm.lm_head.weight")
    state = {}
    for name, tensor in official_tensors(iter_tensors(files)):
        if name == "llm.lm_head.weight" and tied:
            continue
        # A copy even when device and dtype already match: safetensors may hand out views into the
        # file's mapping at any byte offset, and CPU kernels round differently on unaligned memory, so
        # the same weights would give logits a few ulps apart depending on the file's header length.
        state[name] = tensor.to(device=device, dtype=dtype, copy=True)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"the weights in {folder} do not match its config.json: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    module.load_state_dict(state, strict=False, assign=True)
    if tied:
        module.llm.lm_head.weight = module.llm.model.embed_tokens.weight
    # Non-persistent buffers (rotary frequencies) were created on meta: rebuild them on the device.
    _materialize_buffers(module, device)
    return module.eval()


def _materialize_buffers(module, device: torch.device, *, computed: bool = False) -> None:
    """Recreate buffers computed at construction (rotary frequencies) that were left on the meta device.

    `computed=True` recreates every non-persistent buffer, meta or not: after `module.to_empty()` they
    hold uninitialised memory (random-weight models built directly on a device).
    """
    for sub in module.modules():
        names = [
            n
            for n, b in sub.named_buffers(recurse=False)
            if b.is_meta or (computed and n in sub._non_persistent_buffers_set)
        ]
        if not names:
            continue
        with torch.device(device):
            fresh = sub.rebuilt() if hasattr(sub, "rebuilt") else type(sub)(sub.config)
        for n in names:
            setattr(sub, n, getattr(fresh, n))
