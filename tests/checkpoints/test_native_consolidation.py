"""`ovis-batch checkpoint consolidate --layout native`: transformers' Ovis2.5 layout, read by both runtimes.

The tiny factory checkpoint (official layout) is consolidated to the native layout through the command
line, then run by our runtime and by `transformers.Ovis2_5ForConditionalGeneration`: both give what the
official folder gives. Images stay at most 96 px wide, where transformers' window order is raster order
(see tests/model/test_native_layout.py for the wider case).
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import ovis_batch
from ovis_batch.checkpoints import consolidate_checkpoint
from ovis_batch.cli import main as cli
from ovis_batch.model.checkpoint import CheckpointError, check_safetensors, weight_files

# Reading the native layout parses its config with transformers' own classes (5.25 and newer).
pytest.importorskip("transformers.models.ovis2_5", reason="transformers has no native Ovis2.5 before 5.25")

PROMPT = "Describe the image."
PIXELS = {"min_pixels": 32 * 32, "max_pixels": 96 * 160}
NEW_TOKENS = 10


def tensor_names(folder) -> set[str]:
    return {name for f in weight_files(folder) for name in check_safetensors(f) if name != "__metadata__"}


@pytest.fixture(scope="module")
def native(tiny_checkpoint, tmp_path_factory):
    destination = tmp_path_factory.mktemp("native") / "tiny-native"
    assert (
        cli(["checkpoint", "consolidate", str(tiny_checkpoint), str(destination), "--layout", "native"]) == 0
    )
    return destination


@pytest.fixture(scope="module")
def image(photos) -> Image.Image:
    return Image.fromarray(photos["astronaut"]).resize((64, 150))  # 2 merge blocks wide after resizing


def test_native_folder_holds_the_native_config_and_the_same_tensors(tiny_checkpoint, native):
    config = json.loads((native / "config.json").read_text())
    assert config["model_type"] == "ovis2_5" and config["architectures"] == [
        "Ovis2_5ForConditionalGeneration"
    ]
    assert {"text_config", "vision_config"} <= set(config) and "llm_config" not in config
    assert config["vision_config"]["vocab_size"] == 132 and config["tie_word_embeddings"] is True
    assert "RANDOM" in config["_comment"]
    # transformers saves the official tensor names (its loading map renames them): so do we.
    assert tensor_names(native) == tensor_names(tiny_checkpoint)
    tokenizer_config = json.loads((native / "tokenizer_config.json").read_text())
    assert tokenizer_config["image_token"] == "<|image_pad|>"
    assert "<|image_pad|>" in (native / "chat_template.jinja").read_text()
    assert not (native / "chat_template.json").exists() and not (native / "vocab.json").exists()
    preprocessor = json.loads((native / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"] == "Ovis2_5ImageProcessorPil"
    assert preprocessor["size"] == {"shortest_edge": 448 * 448, "longest_edge": 1792 * 1792}
    # The default layout stays the official one.
    official = consolidate_checkpoint(tiny_checkpoint, native.parent / "official")
    assert {"llm_config", "vit_config"} <= set(json.loads((official / "config.json").read_text()))


def test_our_runtime_gives_the_official_outputs(tiny_checkpoint, native, image):
    official = ovis_batch.load_model(tiny_checkpoint, device="cpu", **PIXELS)
    converted = ovis_batch.load_model(native, device="cpu", **PIXELS)
    assert torch.equal(
        converted.next_token_logits([image], PROMPT), official.next_token_logits([image], PROMPT)
    )
    mine = converted.generate([image], PROMPT, max_new_tokens=NEW_TOKENS)[0].token_ids
    assert mine == official.generate([image], PROMPT, max_new_tokens=NEW_TOKENS)[0].token_ids


@torch.no_grad()
def test_transformers_class_gives_the_official_outputs(tiny_checkpoint, native, image):
    from transformers import AutoImageProcessor, AutoTokenizer, Ovis2_5ForConditionalGeneration

    model, info = Ovis2_5ForConditionalGeneration.from_pretrained(
        native, dtype=torch.float32, trust_remote_code=False, output_loading_info=True
    )
    assert {k: v for k, v in info.items() if v} == {}
    tokenizer = AutoTokenizer.from_pretrained(native)
    pixels = AutoImageProcessor.from_pretrained(native)(
        images=[image], size={"shortest_edge": PIXELS["min_pixels"], "longest_edge": PIXELS["max_pixels"]}
    )
    grid = torch.as_tensor(pixels["image_grid_thw"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    expanded = (
        tokenizer.image_start_token
        + tokenizer.image_token * (int(grid.prod()) // 4)
        + tokenizer.image_end_token
    )
    ids = tokenizer(
        text.replace(tokenizer.image_token, expanded), add_special_tokens=False, return_tensors="pt"
    )
    inputs = {
        "input_ids": ids.input_ids,
        "pixel_values": torch.as_tensor(pixels["pixel_values"]),
        "image_grid_thw": grid,
    }

    official = ovis_batch.load_model(tiny_checkpoint, device="cpu", **PIXELS)
    expected = official.next_token_logits([image], PROMPT)[0]
    assert (model(**inputs).logits[0, -1] - expected).abs().max() <= 1e-4
    out = model.generate(
        **inputs,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        repetition_penalty=1.0,  # generation_config.json's 1.05 would apply even when greedy
        eos_token_id=official.end_ids,
        pad_token_id=official.special.pad,
    )
    theirs = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert theirs == official.generate([image], PROMPT, max_new_tokens=NEW_TOKENS)[0].token_ids


def test_a_native_source_consolidates_back_to_the_official_layout(tiny_checkpoint, native, tmp_path, image):
    back = consolidate_checkpoint(native, tmp_path / "back", dtype="bf16")
    config = json.loads((back / "config.json").read_text())
    assert {"llm_config", "vit_config", "visual_vocab_size"} <= set(config)
    assert config["dtype"] == config["llm_config"]["dtype"] == "bfloat16"
    assert "RANDOM" in config["_comment"]
    again = consolidate_checkpoint(back, tmp_path / "again", output_layout="native", dtype="fp32")
    logits = ovis_batch.load_model(again, device="cpu", **PIXELS).next_token_logits([image], PROMPT)
    bf16 = ovis_batch.load_model(back, device="cpu", dtype=torch.float32, **PIXELS).next_token_logits(
        [image], PROMPT
    )
    assert torch.equal(logits, bf16)  # the bf16 weights, widened exactly to fp32, through both layouts
    official = ovis_batch.load_model(tiny_checkpoint, device="cpu", **PIXELS).next_token_logits(
        [image], PROMPT
    )
    assert 0 < (logits - official).abs().max() < 0.5  # bf16 rounding shows, and stays small


def test_native_layout_is_refused_for_ovis2(tmp_path):
    from ovis_batch.model.tiny_ovis2 import make_tiny_ovis2_model

    source = make_tiny_ovis2_model(tmp_path / "tiny-ovis2", seed=0)
    with pytest.raises(CheckpointError, match=r"native layout is an Ovis2\.5 layout"):
        consolidate_checkpoint(source, tmp_path / "x", output_layout="native")
    assert not (tmp_path / "x").exists()


def test_fine_tuning_plans_a_native_source_as_the_official_one(tiny_checkpoint, native):
    """The fine-tuning job sizes its trainable plan from the config on the meta device: either layout."""
    from ovis_batch.train.job import _meta_model

    def shapes(folder) -> dict[str, tuple[int, ...]]:
        return {name: tuple(p.shape) for name, p in _meta_model(folder).named_parameters()}

    assert shapes(native) == shapes(tiny_checkpoint)
