"""Our Ovis2.5 against upstream's own outputs on the tiny random checkpoint (tests/data/ovis25_upstream_tiny).

The goldens were computed by upstream's Hugging Face remote code (fp32, CPU); its README says how, and
`producer/` holds the scripts. Comparators follow the README's tolerances: exact ids and texts, vision
features within 2e-5, probabilities and embeddings within 1e-5, float32 logits within 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import ovis_batch

MIN_PIXELS, MAX_PIXELS = 64 * 64, 256 * 256


@pytest.fixture(scope="module")
def model(upstream_dir):
    return ovis_batch.load_model(
        upstream_dir / "checkpoint", device="cpu", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )


@pytest.fixture(scope="module")
def images(upstream_dir, upstream_reference):
    out = []
    for entry in upstream_reference["images"]:
        with Image.open(upstream_dir / entry["file"]) as im:
            im.load()
            out.append(im.copy())
    return out


def cases(reference):
    for case in reference["cases"]:
        yield case, case["image"], reference["prompts"][case["prompt"]]


def test_official_layout_loads_sharded_and_tied(model, upstream_dir):
    shards = sorted(p.name for p in (upstream_dir / "checkpoint").glob("*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    llm = model.module.llm
    assert llm.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32
    assert model.special.im_end == 602 and model.special.think_end == 625


@pytest.mark.parametrize("index", [0, 1, 2])
def test_preprocessing_and_visual_path(model, images, index, upstream_reference, upstream_tensors):
    entry = upstream_reference["images"][index]
    key = entry["key"]
    (prepared,) = model.prepare([images[index]])
    assert list(prepared.grid_thw) == entry["grid_thw"]
    assert prepared.visual_tokens == entry["visual_tokens"]
    pixels, grids = model._pack([prepared])
    assert abs(float(pixels.double().sum()) - entry["pixel_values_sum"]) < 1e-3
    module = model.module
    with torch.no_grad():
        features = module.visual_tokenizer.encode(pixels, grids)
        probs = module.visual_tokenizer(pixels, grids)
    assert (features - upstream_tensors[f"{key}.vit_features"]).abs().max() <= 2e-5
    assert (probs - upstream_tensors[f"{key}.visual_probs"]).abs().max() <= 1e-5
    embeds = model.visual_embeddings(images[index])
    assert (embeds - upstream_tensors[f"{key}.visual_embeddings"]).abs().max() <= 1e-5


def test_packed_images_match_one_at_a_time(model, images, upstream_tensors):
    """Three different sizes in one vision pass: each image's embeddings equal its own reference."""
    prepared = model.prepare(images)
    pixels, grids = model._pack(prepared)
    with torch.no_grad():
        packed = model.module.visual_embeddings(pixels, grids)
    for key, part in zip(
        ("img0", "img1", "img2"), packed.split([p.visual_tokens for p in prepared]), strict=True
    ):
        assert (part - upstream_tensors[f"{key}.visual_embeddings"]).abs().max() <= 1e-5


def test_prompt_ids_and_forced_ending(model, upstream_reference):
    assert model.prompts.early_stop_ids == upstream_reference["early_stop_token_ids"]
    for case, image_index, prompt in cases(upstream_reference):
        n = upstream_reference["images"][image_index]["visual_tokens"]
        assert model.prompts.build(prompt, n, thinking=False) == case["off"]["prompt_input_ids"]
        assert model.prompts.build(prompt, n, thinking=True) == case["on"]["prompt_input_ids"]


def test_last_logits(model, images, upstream_reference, upstream_tensors):
    for case, image_index, prompt in cases(upstream_reference):
        logits = model.next_token_logits([images[image_index]], prompt)[0]
        expected = upstream_tensors[f"case{image_index}_{case['prompt']}.last_logits"]
        assert (logits - expected).abs().max() <= 1e-4
        assert torch.topk(logits, 5).indices.tolist() == case["off"]["last_logits_top5"]


def test_greedy_thinking_off(model, images, upstream_reference):
    for case, image_index, prompt in cases(upstream_reference):
        (result,) = model.generate([images[image_index]], prompt, max_new_tokens=12)
        ref = case["off"]
        assert result.token_ids == ref["token_ids"]
        assert result.text == ref["text"].strip()
        assert result.reasoning is None and not result.thinking_truncated
        assert result.prompt_tokens == ref["prompt_tokens"]
        assert result.finish_reason == ("stop" if ref["ends_with_im_end"] else "length")


def test_thinking_budget_all_three_branches(model, images, upstream_reference):
    settings = upstream_reference["settings"]
    branches = set()
    for case, image_index, prompt in cases(upstream_reference):
        (result,) = model.generate(
            [images[image_index]],
            prompt,
            thinking=True,
            thinking_budget=settings["thinking_budget"],
            max_new_tokens=settings["thinking_max_new_tokens"],
        )
        ref = case["on"]
        assert result.token_ids == ref["token_ids"]
        assert result.thinking_truncated == ref["thinking_truncated"]
        # Upstream keeps the literal `</think>` at the end of the reasoning; we strip the tags.
        assert result.reasoning == ref["reasoning"].removesuffix("</think>").strip()
        assert result.text == ref["answer"]
        if ref["think_end_count"]:
            assert (
                result.reasoning_tokens
                == ref["token_ids"].index(upstream_reference["token_ids"]["</think>"]) + 1
            )
        else:
            assert result.reasoning_tokens == 0
        branches.add(
            "truncated" if ref["thinking_truncated"] else ("closed" if ref["think_end_count"] else "finished")
        )
    assert branches == {"truncated", "closed", "finished"}


def test_batch_equals_upstream_batch_and_singles(model, images, upstream_reference, upstream_tensors):
    batch = upstream_reference["batch"]
    rows_images = [images[i] for i, _ in batch["rows"]]
    rows_prompts = [upstream_reference["prompts"][p] for _, p in batch["rows"]]
    results = model.generate(rows_images, rows_prompts, max_new_tokens=12)
    assert [r.token_ids for r in results] == batch["token_ids_trimmed"]
    logits = model.next_token_logits(rows_images, rows_prompts)
    assert (logits - upstream_tensors["batch.first_step_logits"]).abs().max() <= 1e-4


def test_thinking_budget_in_a_batch_equals_singles(model, images, upstream_reference):
    """Upstream runs the budget one request at a time; ours is per row inside one batch."""
    settings = upstream_reference["settings"]
    rows_images = [images[c["image"]] for c in upstream_reference["cases"]]
    rows_prompts = [upstream_reference["prompts"][c["prompt"]] for c in upstream_reference["cases"]]
    results = model.generate(
        rows_images,
        rows_prompts,
        thinking=True,
        thinking_budget=settings["thinking_budget"],
        max_new_tokens=settings["thinking_max_new_tokens"],
    )
    for result, case in zip(results, upstream_reference["cases"], strict=True):
        assert result.token_ids == case["on"]["token_ids"]
        assert result.thinking_truncated == case["on"]["thinking_truncated"]
