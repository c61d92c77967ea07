"""A tiny random-weight Ovis2 checkpoint in the converted `-hf` layout, for tests and demos.

    python -c "from ovis_batch.model.tiny_ovis2 import make_tiny_ovis2_model; make_tiny_ovis2_model('/tmp/tiny-ovis2')"

The folder holds what a converted Ovis2 `-hf` checkpoint holds, written by transformers' own classes:
`config.json` (`model_type: ovis2`, a qwen2 `text_config`, an `ovis2_vision` `vision_config`),
`generation_config.json`, `model.safetensors`, the Qwen2 BPE tokenizer with the six Ovis2 image tokens
(`<IMG_ATOM>`, `<IMG_START>`, `<IMG_GRID>`, `<IMG_COL>`, `<IMG_ROW>`, `<IMG_END>`), the processor config
(tiling image processor plus `image_seq_length`) and the chat template with its system prompt. It loads
through `transformers.Ovis2ForConditionalGeneration` / `Ovis2Processor` exactly as a real one does.
THE WEIGHTS ARE RANDOM: every output is meaningless, and the folder's README says so.

Shapes follow transformers' own Ovis2 tests: a 2-layer, 64-wide qwen2 text model and a 2-layer, 64-wide
vision tower on 32-px tiles of 8-px patches with hidden stride 2, so each tile is 4 visual tokens (a
real checkpoint: 448-px tiles, 256 tokens each). The tokenizer is the tiny byte-level BPE of `tiny.py`
(trained on a few sentences, with the Qwen special tokens) plus the Ovis2 image tokens. Weights are drawn
with per-tensor scales large enough that the image changes the answer, and `<|im_end|>` is made likely
enough that greedy answers often end on their own within a few dozen tokens (not always: tests that need
an end pick an image that reaches it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ovis_batch.model.tiny import RANDOM_WEIGHTS_NOTE, staged_checkpoint_folder

# The tokens the converted checkpoints add after Qwen2.5's own, in their id order. The atom is the
# placeholder the processor repeats `image_seq_length` times per tile; the other five are the visual
# indicators, in the order of `visual_indicator_token_ids` (and of the last five visual-table rows).
IMAGE_ATOM = "<IMG_ATOM>"
VISUAL_INDICATORS = ("<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>")

# The chat template of the converted checkpoints: a fixed system prompt, `<image>\n` before the text.
CHAT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

TEXT = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "mlp": 128}
VISION = {"hidden": 64, "layers": 2, "heads": 4, "mlp": 54, "image_size": 32, "patch_size": 8}
HIDDEN_STRIDE = 2
VISUAL_VOCAB = 99  # 94 from the head + 5 indicator rows
MAX_TILES = 12  # the image processor's max_patches, as in the converted checkpoints
EOS_SCALE = 2.2

# (substring of the parameter name, mean, std): first match wins. Unit-scale token and visual-table rows
# and large residual outputs keep the random residual stream from being dominated by one input, so that
# different images give different greedy answers.
INIT_RULES = [
    ("embed_tokens.weight", 0.0, 1.0),
    ("visual_embeddings_table.weight", 0.0, 1.0),
    ("head_norm.weight", 2.0, 0.5),
    ("head_norm.bias", 0.0, 0.5),
    ("head_linear.weight", 0.0, 0.06),
    ("norm", 1.0, 0.2),  # every RMSNorm / layernorm weight
    ("o_proj.weight", 0.0, 1.0),
    ("mlp.down_proj.weight", 0.0, 1.0),  # the text model's (the vision tower's MLP is `ffn`)
    ("language_model.layers", 0.0, 0.15),
    ("patch_embedding.weight", 0.0, 0.05),
    ("position_embedding.weight", 0.0, 0.5),
    (".bias", 0.0, 0.1),
    ("vision_tower", 0.0, 0.12),
]


def _build_tokenizer(folder: Path) -> tuple[Any, list[int]]:
    """The tiny Qwen BPE of `tiny.py` plus the Ovis2 image tokens, and the ids of its unprintable bytes."""
    from transformers import Qwen2Tokenizer

    from ovis_batch.model.tiny import _nonprintable_byte_ids, _write_tokenizer

    scratch = folder / "qwen-tokenizer"
    scratch.mkdir()
    _write_tokenizer(scratch, CHAT_TEMPLATE)
    tokenizer = Qwen2Tokenizer.from_pretrained(str(scratch), local_files_only=True)
    unprintable = _nonprintable_byte_ids(scratch)
    shutil.rmtree(scratch)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [IMAGE_ATOM, *VISUAL_INDICATORS]}, replace_extra_special_tokens=False
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer, unprintable


def _config(tokenizer):
    from transformers import Ovis2Config

    ids = tokenizer.convert_tokens_to_ids
    vocab = (len(tokenizer) + 63) // 64 * 64  # padded past the tokenizer, as Qwen's 151936 is
    text_config = {
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": TEXT["hidden"],
        "num_hidden_layers": TEXT["layers"],
        "num_attention_heads": TEXT["heads"],
        "num_key_value_heads": TEXT["kv_heads"],
        "intermediate_size": TEXT["mlp"],
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "tie_word_embeddings": True,
    }
    vision_config = {
        "hidden_size": VISION["hidden"],
        "intermediate_size": VISION["mlp"],
        "num_hidden_layers": VISION["layers"],
        "num_attention_heads": VISION["heads"],
        "image_size": VISION["image_size"],
        "patch_size": VISION["patch_size"],
        "hidden_stride": HIDDEN_STRIDE,
        "vocab_size": VISUAL_VOCAB,
        "num_visual_indicator_tokens": len(VISUAL_INDICATORS),
        "hidden_act": "silu",
        "qkv_bias": False,
        "tokenize_function": "softmax",
    }
    return Ovis2Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids(IMAGE_ATOM),
        visual_indicator_token_ids=[ids(t) for t in VISUAL_INDICATORS],
        vocab_size=vocab,
        hidden_size=TEXT["hidden"],
        tie_word_embeddings=True,
        architectures=["Ovis2ForConditionalGeneration"],
    )


def _random_model(config, tokenizer, unprintable: list[int], seed: int):
    from transformers import Ovis2ForConditionalGeneration

    model = Ovis2ForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            mean, std = next((m, s) for key, m, s in INIT_RULES if key in name)
            param.copy_(torch.randn(param.shape, generator=generator) * std + mean)
        emb = model.get_input_embeddings().weight  # tied to lm_head
        emb[len(tokenizer) :] = 0.0  # vocabulary padding rows are never produced
        # Added tokens and unprintable bytes small (greedy never picks them), except <|im_end|>, made
        # likely enough to end answers.
        added = [i for i in tokenizer.added_tokens_decoder if i != tokenizer.eos_token_id]
        emb[added + unprintable] *= 0.05
        emb[tokenizer.eos_token_id] *= EOS_SCALE
    return model.eval()


def make_tiny_ovis2_model(path: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny Ovis2 checkpoint to `path` (atomically: a temporary sibling folder, then a rename)."""
    from transformers import GenerationConfig, Ovis2ImageProcessorPil, Ovis2Processor

    with staged_checkpoint_folder(path, overwrite=overwrite) as staging:
        tokenizer, unprintable = _build_tokenizer(staging)
        config = _config(tokenizer)
        model = _random_model(config, tokenizer, unprintable, seed)
        end_ids = [
            tokenizer.convert_tokens_to_ids("<|im_end|>"),
            tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        ]
        model.generation_config = GenerationConfig(
            bos_token_id=end_ids[1], eos_token_id=end_ids, pad_token_id=end_ids[1], do_sample=False
        )
        model.save_pretrained(str(staging), safe_serialization=True)
        tile = {"height": VISION["image_size"], "width": VISION["image_size"]}
        # The PIL backend writes the same config as the torchvision one ("Ovis2ImageProcessor"), and
        # needs no torchvision to build it.
        image_processor = Ovis2ImageProcessorPil(crop_to_patches=True, size=tile, max_patches=MAX_TILES)
        tokens_per_tile = (VISION["image_size"] // (VISION["patch_size"] * HIDDEN_STRIDE)) ** 2
        processor = Ovis2Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
            image_seq_length=tokens_per_tile,
        )
        processor.save_pretrained(str(staging))
        (staging / "README.md").write_text(
            f"# Tiny Ovis2 checkpoint: {RANDOM_WEIGHTS_NOTE}\n\n"
            f"Written by `ovis_batch.model.tiny_ovis2.make_tiny_ovis2_model` (seed {seed}) in the converted "
            "Ovis2 `-hf` layout that transformers' `Ovis2ForConditionalGeneration` loads, for tests and "
            "demos. Nothing it generates means anything.\n"
        )
    return Path(path)
