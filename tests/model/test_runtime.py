"""Behaviour of the public runtime API on the tiny checkpoint our own factory writes: thinking, budgets,
batching, sampling, embeddings and per-image errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ovis_batch.model.prompts import IMAGE_SUMMARY_PROMPT, TEXT_SUMMARY_PROMPT

PROMPT = "Write a short caption for this picture."


@pytest.fixture(scope="module")
def images(photos):
    """Real photos at three sizes and aspect ratios (the tiny model runs at its default pixel limits)."""
    astronaut = Image.fromarray(photos["astronaut"])  # 512 x 512
    chelsea = Image.fromarray(photos["chelsea"])  # 451 x 300
    coffee = Image.fromarray(photos["coffee"]).resize((900, 300))  # wide
    return [astronaut, chelsea, coffee]


def test_thinking_off_has_no_reasoning(tiny_model, images):
    (result,) = tiny_model.generate(images[:1], PROMPT, max_new_tokens=8)
    assert result.ok and result.reasoning is None and result.reasoning_tokens == 0
    assert 1 <= result.output_tokens == len(result.token_ids) <= 8
    assert result.prompt_tokens > result.visual_tokens > 0
    assert (result.width, result.height) == (512, 512)
    assert result.input_width % 32 == 0 and result.input_height % 32 == 0


def test_batch_equals_single_for_mixed_sizes(tiny_model, images):
    prompts = [PROMPT, "How many cats can you see?", "Describe the image in one sentence."]
    batch = tiny_model.generate(images, prompts, max_new_tokens=10)
    singles = [
        tiny_model.generate([im], p, max_new_tokens=10)[0] for im, p in zip(images, prompts, strict=True)
    ]
    assert [b.token_ids for b in batch] == [s.token_ids for s in singles]
    assert [b.text for b in batch] == [s.text for s in singles]
    assert len({b.prompt_tokens for b in batch}) == 3  # the rows really were padded differently


def test_thinking_budget_batch_equals_single(tiny_model, images):
    forced = len(tiny_model.prompts.early_stop_ids)
    kwargs = {"thinking": True, "thinking_budget": 4, "max_new_tokens": 4 + forced + 12}
    batch = tiny_model.generate(images, PROMPT, **kwargs)
    for image, result in zip(images, batch, strict=True):
        (single,) = tiny_model.generate([image], PROMPT, **kwargs)
        assert result.token_ids == single.token_ids
        assert result.thinking_truncated == single.thinking_truncated
        assert result.output_tokens <= 4 + forced + 12
        if result.thinking_truncated:
            # the forced ending follows the budget's 4 tokens and is part of the output and the reasoning
            assert result.token_ids[4 : 4 + forced] == tiny_model.prompts.early_stop_ids
            assert result.reasoning.endswith("based on the thinking directly now.")
            # reasoning runs up to and including the forced `</think>`; the "\n\n" after it opens the answer
            forced_end = tiny_model.prompts.early_stop_ids.index(tiny_model.special.think_end)
            assert result.reasoning_tokens == 4 + forced_end + 1


def test_thinking_without_budget_splits_at_first_think_end(tiny_model, images):
    (result,) = tiny_model.generate(images[:1], PROMPT, thinking=True, max_new_tokens=30)
    think_end = tiny_model.special.think_end
    if think_end in result.token_ids:
        k = result.token_ids.index(think_end)
        assert result.reasoning_tokens == k + 1
        assert (
            result.text
            == tiny_model.tokenizer.decode(result.token_ids[k + 1 :], skip_special_tokens=True).strip()
        )
        assert "</think>" not in result.reasoning
    else:
        assert result.reasoning == "" and result.reasoning_tokens == 0
    assert not result.thinking_truncated


def test_budget_that_leaves_no_room_for_an_answer_is_an_error(tiny_model, images):
    forced = len(tiny_model.prompts.early_stop_ids)
    with pytest.raises(ValueError, match="leaves no room for an answer"):
        tiny_model.generate(images[:1], PROMPT, thinking=True, thinking_budget=10, max_new_tokens=10 + forced)
    # one token of room is accepted
    (result,) = tiny_model.generate(
        images[:1], PROMPT, thinking=True, thinking_budget=3, max_new_tokens=4 + forced
    )
    assert result.output_tokens <= 4 + forced


def test_sampling_is_reproducible_with_a_seed(tiny_model, images):
    kwargs = {"do_sample": True, "temperature": 1.5, "top_k": 0, "top_p": 1.0, "max_new_tokens": 16}
    a = tiny_model.generate(images[:2], PROMPT, seed=7, **kwargs)
    b = tiny_model.generate(images[:2], PROMPT, seed=7, **kwargs)
    c = tiny_model.generate(images[:2], PROMPT, seed=8, **kwargs)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    greedy = tiny_model.generate(images[:2], PROMPT, max_new_tokens=16)
    assert [r.token_ids for r in a] != [r.token_ids for r in greedy]


def test_bad_images_become_error_results_and_the_batch_goes_on(tiny_model, images):
    tiny = Image.new("RGB", (20, 300))
    thread = Image.new("RGB", (6600, 32))  # aspect ratio 206
    results = tiny_model.generate([tiny, images[0], thread], PROMPT, max_new_tokens=6)
    assert [r.error_type for r in results] == ["image_too_small", None, "aspect_ratio_too_large"]
    assert "20" in results[0].error_message
    (alone,) = tiny_model.generate([images[0]], PROMPT, max_new_tokens=6)
    assert results[1].token_ids == alone.token_ids
    assert results[0].token_ids == [] and results[0].finish_reason == "error"


def test_prompts_must_match_images(tiny_model, images):
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        tiny_model.generate(images[:2], ["a", "b", "c"])


@pytest.mark.parametrize("strategy", ["last_token", "vte_mean"])
def test_embeddings_shape_norm_determinism_and_batch_invariance(tiny_model, images, strategy):
    vecs = tiny_model.embed_images(images, strategy=strategy)
    assert vecs.dtype == np.float32 and vecs.shape == (3, tiny_model.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vecs, tiny_model.embed_images(images, strategy=strategy))
    for i, image in enumerate(images):
        np.testing.assert_allclose(tiny_model.embed_images([image], strategy=strategy)[0], vecs[i], atol=1e-5)
    texts = ["a cat on a bench", "the astronaut", "coffee"]
    tvecs = tiny_model.embed_texts(texts, strategy=strategy)
    assert tvecs.shape == (3, tiny_model.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(tvecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(tiny_model.embed_texts(texts[1:2], strategy=strategy)[0], tvecs[1], atol=1e-5)
    # generate(..., embedding=) computes the same vectors from its own vision pass
    results = tiny_model.generate(images, PROMPT, max_new_tokens=2, embedding=strategy)
    np.testing.assert_allclose(np.stack([r.embedding for r in results]), vecs, atol=1e-5)


def test_vte_mean_lives_in_the_llm_input_space(tiny_model, images):
    """Oracle: the image side is the mean VTE embedding, the text side the mean token input embedding."""
    visual = tiny_model.visual_embeddings(images[1]).mean(0)
    expected_image = (visual / visual.norm()).numpy()
    np.testing.assert_allclose(tiny_model.embed_images([images[1]], "vte_mean")[0], expected_image, atol=1e-5)
    ids = tiny_model.prompts.encode("a cat")
    rows = tiny_model.module.get_input_embeddings().weight[ids].detach().mean(0)
    np.testing.assert_allclose(
        tiny_model.embed_texts(["a cat"], "vte_mean")[0], (rows / rows.norm()).numpy(), atol=1e-5
    )


def test_last_token_is_the_final_hidden_state_of_the_summary_prompt(tiny_model, images):
    """Oracle for both sides: an unpadded forward of the one-word-summary prompt, last position."""
    module = tiny_model.module
    with torch.no_grad():
        ids = tiny_model.prompts.build(TEXT_SUMMARY_PROMPT.format(text="a red bus"), None, thinking=False)
        hidden = module.llm.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        np.testing.assert_allclose(
            tiny_model.embed_texts(["a red bus"])[0], (hidden / hidden.norm()).numpy(), atol=1e-5
        )
        (prepared,) = tiny_model.prepare([images[2]])
        pixels, grids = tiny_model._pack([prepared])
        ids = tiny_model.prompts.build(IMAGE_SUMMARY_PROMPT, prepared.visual_tokens, thinking=False)
        embeds = module.embed_inputs(torch.tensor([ids]), pixels, grids)
        hidden = module.llm.model(inputs_embeds=embeds).last_hidden_state[0, -1]
    np.testing.assert_allclose(
        tiny_model.embed_images([images[2]])[0], (hidden / hidden.norm()).numpy(), atol=1e-5
    )


def test_embedding_errors(tiny_model):
    with pytest.raises(ValueError, match="unknown embedding strategy 'mean'"):
        tiny_model.embed_texts(["x"], strategy="mean")
    with pytest.raises(ValueError, match="text 1 is empty"):
        tiny_model.embed_texts(["x", "  "])
    from ovis_batch.model.preprocess import ImageInputError

    with pytest.raises(ImageInputError, match="image 0"):
        tiny_model.embed_images([Image.new("RGB", (8, 8))])


def test_prepared_uint8_inputs_give_the_same_answer(tiny_model, images):
    """The pipeline's CPU workers send uint8 patches; the answer must not depend on who prepared them."""
    prepared = tiny_model.prepare(images[:2])
    assert all(p.patches.dtype == np.uint8 for p in prepared)
    a = tiny_model.generate(prepared, PROMPT, max_new_tokens=6)
    b = tiny_model.generate(images[:2], PROMPT, max_new_tokens=6)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_model_info_identifies_the_weights(tiny_model, tiny_checkpoint):
    info = tiny_model.model_info()
    assert info["model_type"] == "ovis2_5" and info["dtype"] == "float32"
    assert len(info["weights_sha256"]) == 64
    assert info["name"] == str(tiny_checkpoint)
