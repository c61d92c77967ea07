"""Ovis2 (`model_type: ovis2`, the converted `-hf` checkpoints) through transformers' native classes.

    import ovis_batch
    model = ovis_batch.load_model("path/to/Ovis2-2B-hf")  # dispatched here by config.json's model_type
    results = model.generate(images, "Describe the image.", max_new_tokens=64)

What lives here: `load_ovis2` and `Ovis2Model`, which puts `transformers.Ovis2ForConditionalGeneration`
and `Ovis2Processor` behind the same public API as the Ovis2.5 `OvisModel` of `runtime.py` (same
methods, same `GenerationResult`s, same embedding strategies), so the pipeline, the index and the
checks do not care which family a checkpoint is. What does not: the model itself, the tiling image
processor and the placeholder expansion, which are transformers' own and used as they are.

How Ovis2 differs from Ovis2.5, and what that means here:
- Images are cut into fixed square tiles (448 px in the released models) on a grid chosen by the image
  processor, plus a thumbnail of the whole image when there is more than one tile; every tile becomes
  `image_seq_length` visual tokens. There is no native-resolution path, so the uint8 `PreparedImage`s
  of Ovis2.5 are refused (TypeError). `max_pixels` caps the number of tiles: `max_pixels // tile area`,
  at least one tile, and never more than the checkpoint's own `max_patches`, so the defaults give what
  transformers' processor gives. `min_pixels` has nothing to act on (every tile is resized to the tile
  size, so the model never sees less than one tile) and is only checked for consistency.
- Images are accepted under the same rule as Ovis2.5 (`smart_resize`'s checks): a side under 32 px or
  an aspect ratio above 200 is an error result, not an exception for the batch.
- No thinking mode: `thinking=True` raises ValueError.
- Generation: greedy unless `do_sample=True`; our settings, not the checkpoint's `generation_config`;
  stops at the tokenizer's eos (`<|im_end|>`) or `<|endoftext|>`, and `token_ids` include the stopping
  token. Rows are left-padded, so each item gives what it gives alone.
- Embeddings: "last_token" is the final hidden state (after the last norm) of the last prompt token of
  the one-word-summary prompt; "vte_mean" is the mean of the visual embeddings spliced in for the
  `<IMG_ATOM>` tokens (visual-table mixtures, indicators excluded) against the mean input embedding of
  the text's tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from ovis_batch.model.base import (
    RowOutput,
    SamplingSettings,
    VisionLanguageModel,
    check_strategy,
    check_texts,
    cut_at_end,
    l2_normalize,
    prompt_list,
)
from ovis_batch.model.checkpoint import CheckpointError, weight_files, weights_fingerprint
from ovis_batch.model.preprocess import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    ImageInputError,
    PreparedImage,
    _array_to_image,
    smart_resize,
    validate_pixel_limits,
)
from ovis_batch.model.prompts import IMAGE_SUMMARY_PROMPT, TEXT_SUMMARY_PROMPT, render_user_turn

ImageLike = PIL.Image.Image | np.ndarray
IMAGE_TAG = "<image>"  # what the chat template writes for an image; the processor expands it


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value under ==
class Ovis2Input:
    """One image as Ovis2 input: its tiles and the placeholder text that stands for it in the prompt."""

    pixel_values: torch.Tensor  # float32 [tiles, 3, tile, tile]: thumbnail first when there is a grid
    grid: tuple[int, int]  # (rows, columns) of the tiled canvas; (1, 1) is one tile, no thumbnail
    placeholder: str  # indicator and atom tokens that replace `<image>` in the rendered prompt
    visual_tokens: int  # `<IMG_ATOM>` positions: tiles * image_seq_length
    width: int  # source size
    height: int
    input_width: int  # the tiled canvas the model saw (the thumbnail aside)
    input_height: int

    @property
    def tiles(self) -> int:
        return int(self.pixel_values.shape[0])


class Ovis2Model(VisionLanguageModel):
    """One resident Ovis2 model (transformers' native classes) behind the runtime API of `OvisModel`."""

    model_type = "ovis2"

    def __init__(
        self,
        module,
        processor,
        *,
        name: str,
        weights_sha256: str,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        revision: str | None = None,
    ) -> None:
        validate_pixel_limits(min_pixels, max_pixels)
        self.module = module
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.name = name
        self.revision = revision
        self.weights_sha256 = weights_sha256
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.chat_template = processor.chat_template
        if not self.chat_template:
            raise CheckpointError(f"the processor of {name} has no chat template; copy it from the release")
        size = self.image_processor.size
        self.tile_height, self.tile_width = int(size["height"]), int(size["width"])
        tiling = bool(self.image_processor.crop_to_patches)
        self.checkpoint_max_tiles = int(self.image_processor.max_patches) if tiling else 1
        self.image_token_id = module.config.image_token_id
        vision = module.config.vision_config
        per_tile = (vision.image_size // (vision.patch_size * vision.hidden_stride)) ** 2
        if processor.image_seq_length != per_tile or (self.tile_height, self.tile_width) != (
            vision.image_size,
            vision.image_size,
        ):
            raise CheckpointError(
                f"the processor of {name} makes {self.tile_height}x{self.tile_width} tiles of "
                f"{processor.image_seq_length} tokens, but the vision config expects {vision.image_size}-px "
                f"tiles of {per_tile} tokens; the processor and model files come from different checkpoints"
            )
        token_id = self.tokenizer.convert_tokens_to_ids
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = token_id("<|endoftext|>")
        ends = [self.tokenizer.eos_token_id, token_id("<|im_end|>"), token_id("<|endoftext|>")]
        self.end_ids = list(
            dict.fromkeys(i for i in ends if i is not None and i != self.tokenizer.unk_token_id)
        )
        if not self.end_ids or self.pad_id is None:
            raise CheckpointError(f"the tokenizer of {name} has no eos or <|im_end|> / <|endoftext|> token")

    # ------------------------------------------------------------------------------------------ identity

    @property
    def device(self) -> torch.device:
        return self.module.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.get_input_embeddings().weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.module.config.text_config.hidden_size

    def model_info(self) -> dict[str, Any]:
        return super().model_info() | {
            "tile_size": self.tile_width,
            "max_tiles": self.max_tiles(self.max_pixels),
        }

    # ------------------------------------------------------------------------------------------ images

    def max_tiles(self, max_pixels: int | None = None) -> int:
        """Tiles of the grid allowed by `max_pixels`: at least one, at most the checkpoint's max_patches."""
        budget = (max_pixels or self.max_pixels) // (self.tile_height * self.tile_width)
        return max(1, min(budget, self.checkpoint_max_tiles))

    def prepare(
        self, images: Sequence[ImageLike], min_pixels: int | None = None, max_pixels: int | None = None
    ) -> list[Ovis2Input | ImageInputError]:
        """Each image as model input (tiles and placeholder), or the per-image error that prevents it."""
        min_pixels, max_pixels = min_pixels or self.min_pixels, max_pixels or self.max_pixels
        validate_pixel_limits(min_pixels, max_pixels)
        tiles = self.max_tiles(max_pixels)
        out: list[Ovis2Input | ImageInputError] = []
        for image in images:
            if isinstance(image, PreparedImage):
                raise TypeError(
                    "Ovis2 cannot use a PreparedImage (the uint8 native-resolution patches of Ovis2.5): it cuts "
                    "images into its own fixed-size tiles. Pass the decoded image (PIL or HxWx3 uint8 array)."
                )
            try:
                out.append(self._prepare_one(image, tiles))
            except ImageInputError as exc:
                out.append(exc)
        return out

    def _prepare_one(self, image: ImageLike, max_tiles: int) -> Ovis2Input:
        from ovis_batch.model.images import to_rgb

        if isinstance(image, np.ndarray):
            image = _array_to_image(image)
        elif not isinstance(image, PIL.Image.Image):
            raise TypeError(f"images must be PIL images or uint8 arrays, got {type(image).__name__}")
        rgb = to_rgb(image)
        width, height = rgb.size
        # The acceptance rule of Ovis2.5 (a side under 32 px, an aspect ratio above 200); its size is unused.
        smart_resize(height, width)
        features = self.image_processor(images=[rgb], max_patches=max_tiles, return_tensors="pt")
        rows, cols = (int(v) for v in features["grids"][0])
        pixel_values = features["pixel_values"]
        return Ovis2Input(
            pixel_values=pixel_values,
            grid=(rows, cols),
            placeholder=self.processor.replace_image_token(features, image_idx=0),
            visual_tokens=int(pixel_values.shape[0]) * self.processor.image_seq_length,
            width=width,
            height=height,
            input_width=cols * self.tile_width,
            input_height=rows * self.tile_height,
        )

    def _image_features(self, inputs: Sequence[Ovis2Input]):
        """One vision pass over every tile of `inputs`: transformers' image outputs (visual table mixtures)."""
        pixels = torch.cat([x.pixel_values for x in inputs]).to(self.device, self.dtype)
        return self.module.model.get_image_features(pixel_values=pixels, return_dict=True)

    def _per_image(self, features, inputs: Sequence[Ovis2Input]) -> list[torch.Tensor]:
        """The spliced-in visual embeddings of each image: `[visual tokens, hidden]`."""
        tiles = features.pooler_output.split([x.tiles for x in inputs])
        return [t.reshape(-1, t.shape[-1]) for t in tiles]

    @torch.inference_mode()
    def visual_embeddings(self, image: ImageLike) -> torch.Tensor:
        """The embeddings spliced in for one image's `<IMG_ATOM>` tokens: float32 `[tokens, hidden]`, CPU."""
        prepared = self.prepare_or_raise([image])
        (visual,) = self._per_image(self._image_features(prepared), prepared)
        return visual.float().cpu()

    # ------------------------------------------------------------------------------------------ prompts

    def _prompt_ids(self, prompt: str, image: Ovis2Input | None) -> list[int]:
        """Prompt ids as the processor makes them: `<image>` replaced by the image's placeholder, then tokenised."""
        text = render_user_turn(self.tokenizer, self.chat_template, prompt, with_image=image is not None)
        expected = 0 if image is None else 1
        if text.count(IMAGE_TAG) != expected:
            raise ValueError(
                f"the chat template rendered {text.count(IMAGE_TAG)} {IMAGE_TAG!r} tags for {expected} image(s); "
                "prompts must not contain the image tag themselves"
            )
        if image is not None:
            text = text.replace(IMAGE_TAG, image.placeholder)
        ids = self.tokenizer(text).input_ids
        if ids.count(self.image_token_id) != (0 if image is None else image.visual_tokens):
            raise ValueError("prompts must not contain Ovis2's image tokens (<IMG_ATOM>, <IMG_START>, ...)")
        return ids

    def _left_pad(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, width - len(row) :] = torch.tensor(row)
            mask[b, width - len(row) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _forward(self, rows: Sequence[list[int]], features, *, logits: bool):
        """One left-padded forward: last-position logits, or the final hidden state of the last token."""
        ids, mask = self._left_pad(rows)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        encoded = {"image": features} if features is not None else None
        if logits:
            out = self.module(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                mm_encoder_outputs=encoded,
                logits_to_keep=1,
            )
            return out.logits[:, -1]
        out = self.module.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, mm_encoder_outputs=encoded
        )
        return out.last_hidden_state[:, -1]

    # ------------------------------------------------------------------------------------------ generate

    def _check_generation(self, max_new_tokens: int, thinking: bool, thinking_budget: int | None) -> None:
        super()._check_generation(max_new_tokens, thinking, thinking_budget)
        _check_no_thinking(thinking)

    def _generate_prepared(
        self,
        prepared: list[Ovis2Input],
        prompts: list[str],
        *,
        max_new_tokens: int,
        thinking: bool,
        thinking_budget: int | None,
        sampling: SamplingSettings,
        embedding: str | None,
    ) -> tuple[list[RowOutput], np.ndarray | None]:
        rows = [self._prompt_ids(text, x) for text, x in zip(prompts, prepared, strict=True)]
        features = self._image_features(prepared)
        outputs = self._generate_rows(rows, features, max_new_tokens, sampling)
        vectors = self._image_vectors(embedding, prepared, features) if embedding else None
        return [RowOutput(len(r), ids) for r, ids in zip(rows, outputs, strict=True)], vectors

    def _generate_rows(
        self, rows: Sequence[list[int]], features, max_new_tokens: int, sampling: SamplingSettings
    ) -> list[list[int]]:
        """New token ids per row, each cut after its first end token (stopping token kept)."""
        ids, mask = self._left_pad(rows)
        config = sampling.generation_config(max_new_tokens, self.end_ids, self.pad_id)
        with sampling.rng(self.device):
            out = self.module.generate(
                input_ids=ids,
                attention_mask=mask,
                mm_encoder_outputs={"image": features},
                generation_config=config,
            )
        return cut_at_end(out[:, ids.shape[1] :].tolist(), self.end_ids)

    def next_token_logits(
        self, images: Sequence[ImageLike], prompts: str | Sequence[str], *, thinking: bool = False
    ) -> torch.Tensor:
        """float32 `[n, vocab]` logits of the first answer token, batched with left padding. Bad images raise."""
        _check_no_thinking(thinking)
        texts = prompt_list(images, prompts)
        inputs = self.prepare_or_raise(images)
        rows = [self._prompt_ids(p, x) for p, x in zip(texts, inputs, strict=True)]
        with torch.inference_mode():
            return self._forward(rows, self._image_features(inputs), logits=True).float().cpu()

    # ------------------------------------------------------------------------------------------ embeddings

    def embed_images(self, images: Sequence[ImageLike], strategy: str = "last_token") -> np.ndarray:
        """float32 `[n, hidden]`, L2-normalised. A bad image raises its ImageInputError (naming its index)."""
        check_strategy(strategy)
        inputs = self.prepare_or_raise(images)
        if not inputs:
            return np.zeros((0, self.hidden_size), np.float32)
        with torch.inference_mode():
            return self._image_vectors(strategy, inputs, self._image_features(inputs))

    def embed_texts(self, texts: Sequence[str], strategy: str = "last_token") -> np.ndarray:
        """float32 `[n, hidden]`, L2-normalised, in the same space as `embed_images` with that strategy."""
        check_strategy(strategy)
        check_texts(texts)
        if not texts:
            return np.zeros((0, self.hidden_size), np.float32)
        with torch.inference_mode():
            if strategy == "vte_mean":
                table = self.module.get_input_embeddings()
                means = [
                    table(
                        torch.tensor(
                            self.tokenizer(t, add_special_tokens=False).input_ids, device=self.device
                        )
                    )
                    .float()
                    .mean(0)
                    for t in texts
                ]
                return l2_normalize(torch.stack(means))
            rows = [self._prompt_ids(TEXT_SUMMARY_PROMPT.format(text=t), None) for t in texts]
            return l2_normalize(self._forward(rows, None, logits=False))

    def _image_vectors(self, strategy: str, inputs: Sequence[Ovis2Input], features) -> np.ndarray:
        if strategy == "vte_mean":
            return l2_normalize(torch.stack([v.float().mean(0) for v in self._per_image(features, inputs)]))
        rows = [self._prompt_ids(IMAGE_SUMMARY_PROMPT, x) for x in inputs]
        return l2_normalize(self._forward(rows, features, logits=False))


def _check_no_thinking(thinking: bool) -> None:
    if thinking:
        raise ValueError(
            "Ovis2 has no thinking mode: pass thinking=False (thinking and thinking_budget apply to "
            "Ovis2.5 checkpoints only)"
        )


# ---------------------------------------------------------------------------------------------- loading


def load_ovis2(
    folder: Path,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    attn_implementation: str = "sdpa",
    name: str | None = None,
    revision: str | None = None,
) -> Ovis2Model:
    """Load a converted Ovis2 checkpoint folder with transformers' native classes (safetensors only).

    Nothing is fetched (local files only) and no code from the folder runs. `name` defaults to the folder.
    """
    from transformers import Ovis2ForConditionalGeneration, Ovis2Processor

    started = time.perf_counter()
    device = torch.device(device)
    files = weight_files(folder)  # fails by name on missing shards, .bin-only folders and truncation
    try:
        module, loading = Ovis2ForConditionalGeneration.from_pretrained(
            str(folder),
            dtype=dtype,
            device_map={"": device},
            use_safetensors=True,
            local_files_only=True,
            attn_implementation=attn_implementation,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{folder} could not be loaded as an Ovis2 checkpoint ({type(exc).__name__}: {exc}); only the "
            "converted `-hf` checkpoints (model_type ovis2, Ovis2ForConditionalGeneration) load"
        ) from exc
    # from_pretrained only warns about these and leaves the parameters random: refuse instead.
    missing, mismatched = sorted(loading["missing_keys"]), sorted(loading["mismatched_keys"])
    if missing or mismatched:
        raise CheckpointError(
            f"the weights in {folder} do not match its config.json: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(mismatched)} with other shapes (e.g. {mismatched[:3]}); is this an "
            "original (not converted) Ovis2 checkpoint, or are shards missing?"
        )
    try:
        processor = Ovis2Processor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"the processor files in {folder} (processor/preprocessor config, tokenizer, chat template) "
            f"could not be loaded ({type(exc).__name__}: {exc})"
        ) from exc
    model = Ovis2Model(
        module.eval(),
        processor,
        name=name or str(folder),
        weights_sha256=weights_fingerprint(files),
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        revision=revision,
    )
    model.load_seconds = time.perf_counter() - started
    return model
