"""Ovis2.5's two checkpoint layouts (official and transformers' native): telling them apart, mapping them.

- **official**: what AIDC-AI publishes and upstream's remote code reads: `config.json` with `llm_config`,
  `vit_config` and `visual_vocab_size`; a chat template that renders `<image>` for an image.
- **native**: transformers' own `ovis2_5` model type (`Ovis2_5ForConditionalGeneration`, the layout of
  converted checkpoints): `config.json` with `text_config`, `vision_config` and the text-vocabulary ids
  of the visual placeholder tokens; a tokenizer that declares those tokens (`image_token`, ...); a chat
  template that renders the image token; an `Ovis2_5ImageProcessor` preprocessor config.

Both layouts hold the same tensors. transformers' `save_pretrained` writes them under the official
names (its loading map renames them to its modules), and with `save_original_format=False` under its
module names (`model.language_model.*`, ..., the VTE transposed as
`model.multi_modal_projector.visual_embeddings_table.weight`); both are read here.

Our runtime works in the official layout: `official_config` and `official_tensors` bring a native
checkpoint to it (a native config is parsed by transformers' own config class, so that both read the
same numbers, defaults included), and `write_native_inference_files` turns an official folder's config,
tokenizer, chat template and preprocessor files into the native ones, keeping the weights as they are.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ovis_batch.model.checkpoint import CheckpointError, chat_template, read_config

OFFICIAL_LAYOUT = "official"
NATIVE_LAYOUT = "native"
LAYOUTS = (OFFICIAL_LAYOUT, NATIVE_LAYOUT)

# The visual placeholder tokens of transformers' Ovis2.5 processor, as the native tokenizer declares them.
# The image and video tokens are Qwen's own (present in every Qwen3 tokenizer); the four indicators are
# added when missing. Their text embeddings are never used: the model overwrites those positions.
NATIVE_VISUAL_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<|ovis_image_start|>",
    "image_end_token": "<|ovis_image_end|>",
    "video_start_token": "<|ovis_video_start|>",
    "video_end_token": "<|ovis_video_end|>",
}
# What the official chat template renders for an image or a video, replaced by the native tokens.
OFFICIAL_IMAGE_TAG, OFFICIAL_VIDEO_TAG = "<image>", "<video>"
INDICATOR_ROWS = 4  # image start/end, video start/end: the last rows of the visual vocabulary
VISION_ROPE_THETA = 10000.0  # the only value the vision tower's 2D RoPE uses (ovis2_5.py)

# Vision settings both layouts spell the same way.
_SHARED_VISION_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "image_size",
    "window_size",
    "temporal_patch_size",
)
_TEXT_SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)
# transformers' module names -> official names (what `save_original_format=False` writes).
_NATIVE_PREFIXES = (
    ("model.language_model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
    ("model.vision_tower.embeddings.", "visual_tokenizer.vit.vision_model.embeddings."),
    ("model.vision_tower.layers.", "visual_tokenizer.vit.vision_model.encoder.layers."),
    ("model.vision_tower.post_layernorm.", "visual_tokenizer.vit.vision_model.post_layernorm."),
    ("model.multi_modal_projector.visual_tokenizer.linear.", "visual_tokenizer.head.0."),
    ("model.multi_modal_projector.visual_tokenizer.norm.", "visual_tokenizer.head.1."),
)
# transformers keeps the VTE as a Linear(visual vocab -> hidden): its weight is the table transposed.
_NATIVE_VTE = "model.multi_modal_projector.visual_embeddings_table.weight"
_OFFICIAL_VTE = "vte.weight"
# Tokenizer files of the official layout that the native tokenizer replaces (they would go stale).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
)


def checkpoint_layout(config: dict, where: str | Path = "config.json") -> str:
    """`"official"` (`llm_config` + `vit_config`) or `"native"` (`text_config` + `vision_config`)."""
    if "llm_config" in config and "vit_config" in config:
        return OFFICIAL_LAYOUT
    if "text_config" in config and "vision_config" in config:
        return NATIVE_LAYOUT
    raise CheckpointError(
        f"{where}: an Ovis2.5 config.json holds either `llm_config` and `vit_config` (the official layout) "
        f"or `text_config` and `vision_config` (transformers' native layout); this one has "
        f"{sorted(k for k in config if k.endswith('_config'))}. Copy config.json from the released model"
    )


def official_config(config: dict, where: str | Path = "config.json") -> dict:
    """config.json of either layout as an official-layout dict (what our `Ovis2_5Config` reads)."""
    if checkpoint_layout(config, where) == OFFICIAL_LAYOUT:
        return config
    native = _parse_native(config, where)
    vision = native.vision_config
    layer_types = set(vision.layer_types)
    if layer_types != {"full_attention"}:
        raise CheckpointError(
            f"{where}: vision_config.layer_types {sorted(layer_types)}: window attention in the vision tower "
            "is not implemented (every released Ovis2.5 checkpoint uses full attention)"
        )
    rope = vision.rope_parameters or {}
    if float(rope.get("rope_theta", VISION_ROPE_THETA)) != VISION_ROPE_THETA:
        raise CheckpointError(
            f"{where}: vision_config.rope_parameters.rope_theta {rope['rope_theta']}: the vision tower's 2D "
            f"RoPE uses {VISION_ROPE_THETA} in every Ovis2.5 checkpoint, and only that is implemented"
        )
    if vision.num_visual_indicator_tokens != INDICATOR_ROWS:
        raise CheckpointError(
            f"{where}: vision_config.num_visual_indicator_tokens {vision.num_visual_indicator_tokens}, "
            f"expected {INDICATOR_ROWS} (image start/end, video start/end)"
        )
    llm = _qwen3_dict(native.text_config)
    # transformers ties the output projection by the top-level flag (default False): read it the same way.
    llm["tie_word_embeddings"] = bool(native.tie_word_embeddings)
    vit = {key: getattr(vision, key) for key in _SHARED_VISION_KEYS}
    vit |= {
        "model_type": "siglip2_navit",
        "hidden_stride": vision.spatial_merge_size,
        "fullatt_block_indexes": None,
        "num_patches": -1,
        "preserve_original_pe": True,
        "use_rope": True,
    }
    out = {
        "architectures": ["Ovis2_5"],
        "model_type": "ovis2_5",
        "llm_config": llm,
        "vit_config": vit,
        "visual_vocab_size": vision.vocab_size,
        "hidden_size": llm["hidden_size"],
    }
    if native.dtype is not None:
        out["dtype"] = str(native.dtype).removeprefix("torch.")
    if "_comment" in config:  # the tiny factories' "random weights" note travels with the model
        out["_comment"] = config["_comment"]
    return out


def read_ovis2_5_config(folder: Path):
    """The `Ovis2_5Config` (ours) of a checkpoint folder in either layout."""
    from ovis_batch.model.ovis2_5 import Ovis2_5Config

    config = official_config(read_config(folder), folder / "config.json")
    try:
        return Ovis2_5Config.from_dict(config)
    except Exception as exc:
        raise CheckpointError(f"{folder / 'config.json'} is not a valid Ovis2.5 config ({exc})") from exc


def native_config(config: dict, token_ids: dict[str, int], where: str | Path = "config.json") -> dict:
    """An official-layout config.json as transformers' native `ovis2_5` config, with the placeholder ids.

    `token_ids` maps `image_token_id`, `video_token_id`, `image_start_token_id`, ... to the tokenizer's ids.
    """
    from ovis_batch.model.ovis2_5 import Ovis2_5Config

    if checkpoint_layout(config, where) == NATIVE_LAYOUT:
        config = official_config(config, where)
    try:
        parsed = Ovis2_5Config.from_dict(config)
    except Exception as exc:
        raise CheckpointError(f"{where} is not a valid Ovis2.5 config ({exc})") from exc
    vit = parsed.vit_config
    unsupported = {
        "fullatt_block_indexes": (vit.fullatt_block_indexes, None),
        "num_patches": (vit.num_patches, -1),
        "preserve_original_pe": (vit.preserve_original_pe, True),
        "use_rope": (vit.use_rope, True),
    }
    for key, (value, needed) in unsupported.items():
        # The native model has one vision tower variant: Conv2d patches, learned positions, 2D RoPE, full
        # attention (num_patches <= 0 all mean the Conv2d patch embedding).
        if value != needed and not (key == "num_patches" and value <= 0):
            raise CheckpointError(
                f"{where}: vit_config.{key}={value!r} has no equivalent in transformers' native Ovis2.5 "
                f"(it needs {needed!r}); keep this checkpoint in the official layout"
            )
    text = _qwen3_dict(parsed.llm_config)
    vision = {key: getattr(vit, key) for key in _SHARED_VISION_KEYS}
    vision |= {
        "model_type": "ovis2_5_vision",
        "spatial_merge_size": vit.hidden_stride,
        "layer_types": ["full_attention"] * vit.num_hidden_layers,
        "vocab_size": parsed.visual_vocab_size,
        "num_visual_indicator_tokens": INDICATOR_ROWS,
        "rope_parameters": {"rope_type": "axial", "rope_theta": VISION_ROPE_THETA},
    }
    out = {
        "architectures": ["Ovis2_5ForConditionalGeneration"],
        "model_type": "ovis2_5",
        "text_config": text,
        "vision_config": vision,
        "tie_word_embeddings": bool(parsed.llm_config.tie_word_embeddings),
        **token_ids,
    }
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype is not None:
        out["dtype"] = dtype
    if "_comment" in config:  # the tiny factories' "random weights" note travels with the model
        out["_comment"] = config["_comment"]
    return out


def official_tensor_name(name: str) -> str:
    """A tensor name of either layout as the official name (official names come back unchanged)."""
    for native, official in _NATIVE_PREFIXES:
        if name.startswith(native):
            return official + name[len(native) :]
    return name


def official_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of either layout under the official names, the VTE as `[visual vocab, hidden]`."""
    for name, tensor in tensors:
        if name == _NATIVE_VTE:
            yield _OFFICIAL_VTE, tensor.t().contiguous()
        else:
            yield official_tensor_name(name), tensor


def native_template(template: str, tokens: dict[str, str] = NATIVE_VISUAL_TOKENS) -> str:
    """The official chat template rendering the native image and video tokens instead of `<image>`."""
    return template.replace(OFFICIAL_IMAGE_TAG, tokens["image_token"]).replace(
        OFFICIAL_VIDEO_TAG, tokens["video_token"]
    )


def write_native_inference_files(folder: Path, *, min_pixels: int, max_pixels: int) -> None:
    """Rewrite, in place, an Ovis2.5 folder's config, tokenizer, chat template and preprocessor config in
    transformers' native layout. The safetensors stay as they are (transformers reads the official names).

    The tokenizer gains the visual placeholder tokens it lacks (appended after its last id, which must
    stay inside the language model's vocabulary); `min_pixels` / `max_pixels` become the image
    processor's defaults.
    """
    from transformers import Qwen2Tokenizer

    config = official_config(read_config(folder), folder / "config.json")
    template = chat_template(folder)
    try:
        tokenizer = Qwen2Tokenizer.from_pretrained(
            str(folder), extra_special_tokens=dict(NATIVE_VISUAL_TOKENS)
        )
    except Exception as exc:
        raise CheckpointError(f"the tokenizer files in {folder} could not be loaded ({exc})") from exc
    token_ids = {
        f"{key}_id": tokenizer.convert_tokens_to_ids(token) for key, token in NATIVE_VISUAL_TOKENS.items()
    }
    vocab_size = config["llm_config"]["vocab_size"]
    if max(token_ids.values()) >= vocab_size:
        raise CheckpointError(
            f"{folder}: the native layout needs the tokens {sorted(NATIVE_VISUAL_TOKENS.values())} in the "
            f"tokenizer, which would take ids up to {max(token_ids.values())}, beyond the language model's "
            f"{vocab_size} embedding rows; keep this checkpoint in the official layout"
        )
    tokenizer.chat_template = native_template(template)
    for name in _TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(str(folder))
    native = native_config(config, token_ids, folder / "config.json")
    (folder / "config.json").write_text(json.dumps(native, indent=2) + "\n")
    vit = config["vit_config"]
    preprocessor = {
        "image_processor_type": "Ovis2_5ImageProcessorPil",
        "processor_class": "Ovis2_5Processor",
        "do_convert_rgb": True,
        "do_resize": True,
        # Upstream resizes with PIL's bilinear filter once, then x/255, then (x - 0.5) / 0.5.
        "resample": 2,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "patch_size": vit.get("patch_size", 16),
        "temporal_patch_size": vit.get("temporal_patch_size", 1),
        "merge_size": vit.get("hidden_stride", 2),
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    (folder / "processor_config.json").write_text(
        json.dumps({"processor_class": "Ovis2_5Processor"}, indent=2) + "\n"
    )


def _qwen3_dict(config) -> dict:
    """A Qwen3 config as config.json holds it: what differs from Qwen3's defaults (as transformers writes
    a sub-config), plus the shapes always, so that a person or a tool reading the file finds them."""
    out = {
        k: v
        for k, v in config.to_diff_dict().items()
        if not k.startswith("_") and k != "transformers_version"
    }
    return out | {key: getattr(config, key) for key in _TEXT_SHAPE_KEYS} | {"model_type": "qwen3"}


def _parse_native(config: dict, where: str | Path):
    """A native config.json parsed by transformers' own class (its defaults fill what the file omits)."""
    try:
        from transformers import Ovis2_5Config as NativeOvis2_5Config
    except ImportError as exc:
        raise CheckpointError(
            f"{where} is in transformers' native Ovis2.5 layout, which needs transformers 5.25 or newer "
            "(its ovis2_5 module) to read; upgrade transformers within the range ovis-batch pins"
        ) from exc
    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "auto_map")}
    try:
        return NativeOvis2_5Config(**fields)
    except Exception as exc:
        raise CheckpointError(f"{where} is not a valid native Ovis2.5 config ({exc})") from exc
