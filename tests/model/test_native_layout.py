"""transformers' native Ovis2.5 layout, and transformers' own implementation as a second reference.

The same tiny random weights (upstream's parity checkpoint, tests/data/ovis25_upstream_tiny) are written
in the native layout by `write_native_inference_files`, then run by our runtime and by
`transformers.Ovis2_5ForConditionalGeneration` (loaded from that folder, no remote code), with inputs
made by transformers' own image processor and tokenizer from that folder.

What the two implementations agree on, and where they differ (transformers 5.25):
- Both read the vision tower's last layer **before** `post_layernorm` (as upstream; vLLM applies it).
- transformers runs the vision tower in window order (3x3 blocks of 2x2 patches, from `window_size`
  112 px) and, although every layer is full attention, hands the head the last layer's output still in
  window order: the visual embeddings reach their placeholders permuted. Images at most 3 merge blocks
  (96 px) wide have the identity window order and agree exactly; wider ones (every real photo) do not.
  Upstream's goldens side with our runtime: its embeddings equal ours, in raster block order.
  `test_transformers_splices_visual_embeddings_in_window_order` pins the difference precisely.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import ovis_batch
from ovis_batch.model.checkpoint import CheckpointError, check_safetensors, model_identity, weight_files
from ovis_batch.model.layouts import (
    NATIVE_LAYOUT,
    OFFICIAL_LAYOUT,
    checkpoint_layout,
    official_config,
    write_native_inference_files,
)

# Reading the native layout parses its config with transformers' own classes (5.25 and newer).
pytest.importorskip("transformers.models.ovis2_5", reason="transformers has no native Ovis2.5 before 5.25")

MIN_PIXELS, MAX_PIXELS = 64 * 64, 256 * 256
WINDOW_BLOCKS = 112 // 16 // 2  # window_size / patch / merge: transformers' window side in merge blocks
GREEDY_TOKENS = 12


@pytest.fixture(scope="module")
def native_dir(upstream_dir, tmp_path_factory) -> Path:
    folder = Path(shutil.copytree(upstream_dir / "checkpoint", tmp_path_factory.mktemp("native") / "ckpt"))
    write_native_inference_files(folder, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return folder


@pytest.fixture(scope="module")
def ours(upstream_dir):
    return ovis_batch.load_model(
        upstream_dir / "checkpoint", device="cpu", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )


@pytest.fixture(scope="module")
def ours_native(native_dir):
    return ovis_batch.load_model(native_dir, device="cpu", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def hf(native_dir):
    """transformers' class on the native folder, with its own tokenizer and image processor."""
    from transformers import AutoImageProcessor, AutoTokenizer, Ovis2_5ForConditionalGeneration

    model, info = Ovis2_5ForConditionalGeneration.from_pretrained(
        native_dir, dtype=torch.float32, trust_remote_code=False, output_loading_info=True
    )
    assert {k: v for k, v in info.items() if v} == {}  # every tensor found, none left over
    tokenizer = AutoTokenizer.from_pretrained(native_dir, trust_remote_code=False)
    processor = AutoImageProcessor.from_pretrained(native_dir, trust_remote_code=False)
    return model.eval(), tokenizer, processor


@pytest.fixture(scope="module")
def images(upstream_dir, upstream_reference):
    out = {}
    for entry in upstream_reference["images"]:
        with Image.open(upstream_dir / entry["file"]) as im:
            out[entry["key"]] = im.convert("RGB")
    # Narrow and tall (2 x 8 merge blocks): three windows stacked, whose order is still raster order.
    out["narrow"] = out["img2"].crop((0, 0, 64, 250))
    return out


def hf_inputs(hf, image: Image.Image, prompt: str) -> dict:
    """What transformers' Ovis2_5Processor gives: pixel values from its image processor, and the chat
    template's image token expanded to start + token * n + end (its processor needs torchvision for the
    video side, absent here, so that one string replacement is done by hand)."""
    _, tokenizer, processor = hf
    pixels = processor(images=[image], size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    grid = torch.as_tensor(pixels["image_grid_thw"])
    n = int(grid[0].prod()) // 4
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    text = text.replace(
        tokenizer.image_token,
        tokenizer.image_start_token + tokenizer.image_token * n + tokenizer.image_end_token,
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    return {"input_ids": ids, "pixel_values": torch.as_tensor(pixels["pixel_values"]), "image_grid_thw": grid}


def window_order(h_blocks: int, w_blocks: int, side: int = WINDOW_BLOCKS) -> torch.Tensor:
    """Merge-block indices (raster) in window order: windows of side x side blocks, row by row, and the
    blocks of each window row by row; windows at the right and bottom edges are cut short."""
    order = []
    for wr in range(0, h_blocks, side):
        for wc in range(0, w_blocks, side):
            order += [
                r * w_blocks + c
                for r in range(wr, min(wr + side, h_blocks))
                for c in range(wc, min(wc + side, w_blocks))
            ]
    return torch.tensor(order)


def test_layouts_are_told_apart_by_the_config_keys(upstream_dir, native_dir):
    official = json.loads((upstream_dir / "checkpoint" / "config.json").read_text())
    native = json.loads((native_dir / "config.json").read_text())
    assert checkpoint_layout(official) == OFFICIAL_LAYOUT
    assert checkpoint_layout(native) == NATIVE_LAYOUT
    with pytest.raises(CheckpointError, match=r"text_config.*vision_config.*\['llm_config'\]"):
        checkpoint_layout({"model_type": "ovis2_5", "llm_config": {}})
    # The native config maps back to the official one it came from (shapes, vocabulary, tying).
    back = official_config(native)
    assert back["visual_vocab_size"] == official["visual_vocab_size"] == 132
    for key in ("hidden_size", "num_hidden_layers", "head_dim", "vocab_size", "tie_word_embeddings"):
        assert back["llm_config"][key] == official["llm_config"][key]
    for key in ("hidden_size", "num_hidden_layers", "image_size", "hidden_stride", "window_size"):
        assert back["vit_config"][key] == official["vit_config"][key]


def test_native_config_is_what_transformers_reads(native_dir, hf):
    config = hf[0].config
    assert config.text_config.hidden_size == 48 and config.text_config.head_dim == 16
    assert config.vision_config.hidden_size == 32 and config.vision_config.image_size == 160
    assert config.vision_config.vocab_size == 132 and config.tie_word_embeddings
    tokenizer = hf[1]
    for name in ("image_token", "image_start_token", "image_end_token", "video_start_token"):
        assert getattr(config, f"{name}_id") == tokenizer.convert_tokens_to_ids(getattr(tokenizer, name))
    assert hf[0].lm_head.weight.data_ptr() == hf[0].model.language_model.embed_tokens.weight.data_ptr()


def test_our_runtime_reads_the_native_folder_as_the_official_one(ours, ours_native, native_dir, images):
    official_state, native_state = ours.module.state_dict(), ours_native.module.state_dict()
    assert official_state.keys() == native_state.keys()
    assert all(torch.equal(official_state[k], native_state[k]) for k in official_state)
    assert ours_native.prompts.image_tag == "<|image_pad|>" and ours.prompts.image_tag == "<image>"
    prompt = "Write a short caption for this picture."
    assert ours_native.prompts.build(prompt, 9, thinking=True) == ours.prompts.build(prompt, 9, thinking=True)
    logits = ours_native.next_token_logits([images["img1"]], prompt)
    assert torch.equal(logits, ours.next_token_logits([images["img1"]], prompt))
    assert model_identity(native_dir)["hidden_size"] == 48


def test_transformers_module_names_load_too(hf, ours, tmp_path, native_dir):
    """`save_pretrained(save_original_format=False)` writes transformers' module names and the VTE
    transposed; our runtime reads them back to the same tensors."""
    folder = tmp_path / "module-names"
    hf[0].save_pretrained(folder, save_original_format=False)
    names = {
        name for file in weight_files(folder) for name in check_safetensors(file) if name != "__metadata__"
    }
    assert "model.multi_modal_projector.visual_embeddings_table.weight" in names and "vte.weight" not in names
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(native_dir / name, folder / name)
    reloaded = ovis_batch.load_model(folder, device="cpu").module.state_dict()
    expected = ours.module.state_dict()
    assert reloaded.keys() == expected.keys()
    assert all(torch.equal(reloaded[k], expected[k]) for k in expected)


def test_transformers_inputs_equal_ours(ours, hf, images, upstream_reference):
    """transformers' image processor and tokenizer give our pixels and our ids (placeholders mapped)."""
    config = hf[0].config
    placeholders = {
        -300: config.image_token_id,
        -301: config.image_start_token_id,
        -302: config.image_end_token_id,
    }
    for key, image in images.items():
        for prompt in upstream_reference["prompts"]:
            inputs = hf_inputs(hf, image, prompt)
            (prepared,) = ours.prepare([image])
            pixels, grids = ours._pack([prepared])
            assert inputs["image_grid_thw"].tolist() == [list(g) for g in grids]
            assert torch.equal(inputs["pixel_values"].float(), pixels), key
            ids = [
                placeholders.get(i, i)
                for i in ours.prompts.build(prompt, prepared.visual_tokens, thinking=False)
            ]
            assert inputs["input_ids"][0].tolist() == ids


@torch.no_grad()
def test_visual_embeddings_agree_where_the_window_order_is_raster(ours, hf, images, upstream_tensors):
    for key in ("img0", "narrow"):
        inputs = hf_inputs(hf, images[key], "x")
        theirs = (
            hf[0].model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        )
        mine = ours.visual_embeddings(images[key])
        assert (theirs - mine).abs().max() <= 1e-4, key
    reference = upstream_tensors["img0.visual_embeddings"]
    assert (ours.visual_embeddings(images["img0"]) - reference).abs().max() <= 1e-5


@torch.no_grad()
def test_transformers_splices_visual_embeddings_in_window_order(ours, hf, images, upstream_tensors):
    """transformers 5.25 hands the head the vision tower's output in window order: its embeddings are
    ours permuted by `window_order`, and upstream's goldens equal ours, not theirs. A transformers release
    that fixes it fails the first assertion: then this test becomes a plain parity check."""
    for key in ("img1", "img2"):
        inputs = hf_inputs(hf, images[key], "x")
        _, h, w = inputs["image_grid_thw"][0].tolist()
        theirs = (
            hf[0].model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        )
        mine = ours.visual_embeddings(images[key])
        order = window_order(h // 2, w // 2)
        assert not torch.equal(order, torch.arange(len(order)))
        assert (theirs - mine[order]).abs().max() <= 1e-4, key  # the same rows, in window order
        assert (theirs - mine).abs().max() > 0.5, key  # hence at the wrong placeholders
        reference = upstream_tensors[f"{key}.visual_embeddings"]
        assert (mine - reference).abs().max() <= 1e-5, key  # upstream agrees with our order


@torch.no_grad()
def test_last_logits_agree_and_follow_the_visual_embeddings(
    ours, hf, images, upstream_reference, upstream_tensors
):
    """With the raster-order images, transformers' own forward gives our logits. With the wider ones,
    giving transformers' language side our (upstream's) visual embeddings gives our logits too: the
    text side, the splicing and the indicator rows agree, and the window order is the only difference."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model = hf[0]
    for case in upstream_reference["cases"]:
        key = upstream_reference["images"][case["image"]]["key"]
        prompt = upstream_reference["prompts"][case["prompt"]]
        inputs = hf_inputs(hf, images[key], prompt)
        mine = ours.next_token_logits([images[key]], prompt)[0]
        if key == "img0":
            theirs = model(**inputs).logits[0, -1]
        else:
            visual = BaseModelOutputWithPooling(pooler_output=(ours.visual_embeddings(images[key]),))
            theirs = model(input_ids=inputs["input_ids"], mm_encoder_outputs={"image": visual}).logits[0, -1]
            wrong = model(**inputs).logits[0, -1]
            assert (wrong - mine).abs().max() > 1e-2, key
        assert (theirs - mine).abs().max() <= 1e-4, key
        reference = upstream_tensors[f"case{case['image']}_{case['prompt']}.last_logits"]
        assert (mine - reference).abs().max() <= 1e-4


@torch.no_grad()
def test_greedy_tokens_identical(ours, hf, images, upstream_reference):
    model = hf[0]
    for key in ("img0", "narrow"):
        for prompt in upstream_reference["prompts"]:
            inputs = hf_inputs(hf, images[key], prompt)
            out = model.generate(
                **inputs,
                max_new_tokens=GREEDY_TOKENS,
                do_sample=False,
                repetition_penalty=1.0,  # generation_config.json's 1.05 would apply even when greedy
                eos_token_id=ours.end_ids,
                pad_token_id=ours.special.pad,
            )
            theirs = out[0, inputs["input_ids"].shape[1] :].tolist()
            (mine,) = ours.generate([images[key]], prompt, max_new_tokens=GREEDY_TOKENS)
            assert theirs == mine.token_ids, (key, prompt)
