"""Ovis2 (`model_type: ovis2`) through transformers' native classes, behind the runtime API.

The tiny random checkpoint comes from our own factory (`tiny_ovis2.py`) in the converted `-hf` layout.
The oracle is transformers itself: `Ovis2Processor` on the same image and chat prompt, then
`Ovis2ForConditionalGeneration.generate` / forward; our answers must be the same token ids (greedy) and
the same logits and hidden states (float32, CPU, within 1e-5).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import ovis_batch
from ovis_batch.model.preprocess import ImageInputError, prepare_image
from ovis_batch.model.prompts import IMAGE_SUMMARY_PROMPT, TEXT_SUMMARY_PROMPT
from ovis_batch.model.tiny_ovis2 import make_tiny_ovis2_model

PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def tiny_ovis2_dir(tmp_path_factory):
    return make_tiny_ovis2_model(tmp_path_factory.mktemp("ovis2") / "tiny-ovis2", seed=0)


@pytest.fixture(scope="module")
def model(tiny_ovis2_dir):
    return ovis_batch.load_model(tiny_ovis2_dir, device="cpu")


@pytest.fixture(scope="module")
def images(photos):
    """Real photos: two large ones of different aspect (12 tiles + thumbnail) and a small crop (4 + 1)."""
    return [
        Image.fromarray(photos["astronaut"]),  # 512 x 512
        Image.fromarray(photos["chelsea"]),  # 451 x 300
        Image.fromarray(photos["coffee"][150:198, 200:264]),  # 64 x 48
    ]


def oracle_inputs(model, image, prompt):
    """What transformers' own processor makes of (image, prompt) with the checkpoint's chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return model.processor(images=[image], text=[text], return_tensors="pt")


def test_loads_through_transformers_native_classes(model, tiny_ovis2_dir):
    from transformers import Ovis2ForConditionalGeneration, Ovis2Processor

    assert isinstance(model.module, Ovis2ForConditionalGeneration)
    assert isinstance(model.processor, Ovis2Processor)
    assert json.loads((tiny_ovis2_dir / "config.json").read_text())["model_type"] == "ovis2"
    assert "RANDOM WEIGHTS" in (tiny_ovis2_dir / "README.md").read_text()
    assert sorted(p.name for p in tiny_ovis2_dir.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(tiny_ovis2_dir.glob("*.bin"))
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.hidden_size == 64
    assert model.module.lm_head.weight.data_ptr() == model.module.get_input_embeddings().weight.data_ptr()


def test_prompt_and_pixels_are_the_processors(model, images):
    for image in images:
        expected = oracle_inputs(model, image, PROMPT)
        (prepared,) = model.prepare([image])
        torch.testing.assert_close(prepared.pixel_values, expected["pixel_values"], rtol=0, atol=0)
        assert model._prompt_ids(PROMPT, prepared) == expected["input_ids"][0].tolist()
        assert prepared.visual_tokens == prepared.tiles * model.processor.image_seq_length


def test_greedy_generate_equals_transformers_generate(model, images):
    for image in images[:2]:
        (result,) = model.generate([image], PROMPT, max_new_tokens=16)
        inputs = oracle_inputs(model, image, PROMPT)
        with torch.inference_mode():
            out = model.module.generate(**inputs, max_new_tokens=16, do_sample=False)
        expected = out[0, inputs["input_ids"].shape[1] :].tolist()
        ends = [i for i, t in enumerate(expected) if t in model.end_ids]
        expected = expected[: ends[0] + 1] if ends else expected
        assert result.token_ids == expected
        assert result.text == model.tokenizer.decode(expected, skip_special_tokens=True).strip()
        assert result.prompt_tokens == inputs["input_ids"].shape[1]
        assert result.output_tokens == len(expected) and result.visual_tokens == 13 * 4
        assert (result.width, result.height) == image.size


def test_answers_stop_at_im_end_which_is_kept(model, images):
    (result,) = model.generate(images[2:], PROMPT, max_new_tokens=24)
    assert result.finish_reason == "stop"
    assert result.token_ids[-1] == model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert "<|im_end|>" not in result.text
    (cut,) = model.generate(images[:1], PROMPT, max_new_tokens=3)
    assert cut.finish_reason == "length" and cut.output_tokens == 3


def test_batch_of_mixed_sizes_equals_singles(model, images):
    prompts = [PROMPT, "How many cats can you see?", "What colour is it?"]
    batch = model.generate(images, prompts, max_new_tokens=12)
    singles = [model.generate([im], p, max_new_tokens=12)[0] for im, p in zip(images, prompts, strict=True)]
    assert [b.token_ids for b in batch] == [s.token_ids for s in singles]
    assert [b.text for b in batch] == [s.text for s in singles]
    assert len({b.prompt_tokens for b in batch}) == 3  # the rows really were padded differently
    assert len({tuple(b.token_ids) for b in batch}) == 3  # and the answers depend on the image


def test_next_token_logits_equal_the_native_forward(model, images):
    logits = model.next_token_logits(images, PROMPT)
    assert logits.dtype == torch.float32 and logits.shape == (3, model.module.config.text_config.vocab_size)
    for i, image in enumerate(images):
        with torch.inference_mode():
            expected = model.module(**oracle_inputs(model, image, PROMPT)).logits[0, -1]
        torch.testing.assert_close(logits[i], expected, rtol=0, atol=1e-4)


def test_thinking_is_refused(model, images):
    with pytest.raises(ValueError, match="Ovis2 has no thinking mode"):
        model.generate(images[:1], PROMPT, thinking=True, thinking_budget=8, max_new_tokens=64)
    with pytest.raises(ValueError, match="Ovis2 has no thinking mode"):
        model.next_token_logits(images[:1], PROMPT, thinking=True)


def test_bad_images_become_error_results_and_the_batch_goes_on(model, images):
    tiny = Image.new("RGB", (20, 300))
    thread = np.zeros((32, 6600, 3), np.uint8)  # aspect ratio 206
    results = model.generate([tiny, images[2], thread], PROMPT, max_new_tokens=8)
    assert [r.error_type for r in results] == ["image_too_small", None, "aspect_ratio_too_large"]
    assert "20" in results[0].error_message
    assert results[0].token_ids == [] and results[0].finish_reason == "error"
    (alone,) = model.generate([images[2]], PROMPT, max_new_tokens=8)
    assert results[1].token_ids == alone.token_ids and results[1].ok
    with pytest.raises(ImageInputError, match="image 1"):
        model.embed_images([images[2], tiny])


def test_native_resolution_inputs_are_refused(model, images):
    prepared = prepare_image(images[0])  # Ovis2.5's uint8 patches
    with pytest.raises(TypeError, match="PreparedImage"):
        model.generate([prepared], PROMPT, max_new_tokens=4)


def test_arrays_and_pil_images_give_the_same_answer(model, photos):
    array = photos["chelsea"]
    a = model.generate([array], PROMPT, max_new_tokens=8)
    b = model.generate([Image.fromarray(array)], PROMPT, max_new_tokens=8)
    assert a[0].token_ids == b[0].token_ids


def test_max_pixels_caps_the_tiles(model, images):
    tile = model.tile_width * model.tile_height
    assert model.max_tiles() == 12  # the default 1792^2 asks for more than the checkpoint's max_patches
    # min_pixels has nothing to act on (tiles are resized to the tile size); it must not exceed max_pixels
    (one,) = model.prepare(images[:1], min_pixels=tile, max_pixels=tile)
    assert one.tiles == 1 and one.visual_tokens == 4 and (one.input_width, one.input_height) == (32, 32)
    (four,) = model.prepare(images[:1], min_pixels=tile, max_pixels=4 * tile + 5)
    rows, cols = four.grid
    assert 1 < rows * cols <= 4 and four.tiles == rows * cols + 1  # the grid plus a thumbnail
    (result,) = model.generate(images[:1], PROMPT, max_new_tokens=2, min_pixels=tile, max_pixels=tile)
    assert result.visual_tokens == 4 and (result.input_width, result.input_height) == (32, 32)


@pytest.mark.parametrize("strategy", ["last_token", "vte_mean"])
def test_embeddings_shape_norm_determinism_and_batch_invariance(model, images, strategy):
    vecs = model.embed_images(images, strategy=strategy)
    assert vecs.dtype == np.float32 and vecs.shape == (3, model.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vecs, model.embed_images(images, strategy=strategy))
    for i, image in enumerate(images):
        np.testing.assert_allclose(model.embed_images([image], strategy=strategy)[0], vecs[i], atol=1e-5)
    texts = ["a cat on a bench", "the astronaut", "coffee"]
    tvecs = model.embed_texts(texts, strategy=strategy)
    assert tvecs.dtype == np.float32 and tvecs.shape == (3, model.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(tvecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(tvecs, model.embed_texts(texts, strategy=strategy))
    np.testing.assert_allclose(model.embed_texts(texts[1:2], strategy=strategy)[0], tvecs[1], atol=1e-5)
    results = model.generate(images, PROMPT, max_new_tokens=2, embedding=strategy)
    np.testing.assert_allclose(np.stack([r.embedding for r in results]), vecs, atol=1e-5)


def test_vte_mean_oracle(model, images):
    """Image side: the mean of what the native model splices in at the `<IMG_ATOM>` positions."""
    inputs = oracle_inputs(model, images[1], PROMPT)
    with torch.inference_mode():
        spliced = model.module.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    spliced = spliced.reshape(-1, model.hidden_size)
    torch.testing.assert_close(model.visual_embeddings(images[1]), spliced, rtol=0, atol=1e-6)
    mean = spliced.mean(0)
    np.testing.assert_allclose(model.embed_images([images[1]], "vte_mean")[0], mean / mean.norm(), atol=1e-5)
    ids = model.tokenizer("a cat", add_special_tokens=False).input_ids
    rows = model.module.get_input_embeddings().weight[ids].detach().mean(0)
    np.testing.assert_allclose(model.embed_texts(["a cat"], "vte_mean")[0], rows / rows.norm(), atol=1e-5)


def test_last_token_oracle(model, images):
    """Both sides: an unpadded native forward of the one-word-summary prompt, last position."""
    inputs = oracle_inputs(model, images[2], IMAGE_SUMMARY_PROMPT)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": TEXT_SUMMARY_PROMPT.format(text="a bus")}]}
    ]
    text = model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with torch.inference_mode():
        image_hidden = model.module.model(**inputs).last_hidden_state[0, -1]
        text_ids = model.tokenizer(text, return_tensors="pt").input_ids
        text_hidden = model.module.model(input_ids=text_ids).last_hidden_state[0, -1]
    np.testing.assert_allclose(
        model.embed_images([images[2]])[0], image_hidden / image_hidden.norm(), atol=1e-5
    )
    np.testing.assert_allclose(model.embed_texts(["a bus"])[0], text_hidden / text_hidden.norm(), atol=1e-5)


def test_model_info_identifies_the_weights(model, tiny_ovis2_dir):
    info = model.model_info()
    assert info["model_type"] == "ovis2" and info["dtype"] == "float32" and info["hidden_size"] == 64
    assert info["name"] == str(tiny_ovis2_dir) and info["revision"] is None
    assert len(info["weights_sha256"]) == 64 and int(info["weights_sha256"], 16) >= 0
    assert model.name == str(tiny_ovis2_dir)
    assert (model.min_pixels, model.max_pixels) == (info["min_pixels"], info["max_pixels"])


def test_weights_that_do_not_match_the_config_are_refused(tiny_ovis2_dir, tmp_path):
    """transformers only warns about missing weights (and leaves them random); the loader refuses."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ovis_batch.model.checkpoint import CheckpointError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_ovis2_dir, broken)
    state = load_file(broken / "model.safetensors")
    state["model.vte.weight"] = state.pop("model.visual_embeddings_table.weight")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 missing.*visual_embeddings_table"):
        ovis_batch.load_model(broken, device="cpu")


def test_factory_refuses_to_overwrite_and_is_reproducible(tiny_ovis2_dir, tmp_path):
    from ovis_batch.model.checkpoint import weight_files, weights_fingerprint

    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_tiny_ovis2_model(tiny_ovis2_dir)
    again = make_tiny_ovis2_model(tmp_path / "again", seed=0)
    fingerprint = weights_fingerprint(weight_files(tiny_ovis2_dir))
    assert weights_fingerprint(weight_files(again)) == fingerprint
    other = make_tiny_ovis2_model(tmp_path / "again", seed=1, overwrite=True)
    assert weights_fingerprint(weight_files(other)) != fingerprint
