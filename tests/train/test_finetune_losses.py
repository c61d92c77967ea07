"""The training losses against their references: the model's own loss, the runtime's embeddings, a naive InfoNCE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovis_batch.model.preprocess import PreparedImage, normalize_patches, prepare_image
from ovis_batch.train.data import ExampleBuilder, PairCollator
from ovis_batch.train.model import FinetuneModel, LearnedTemperature, caption_loss, info_nce
from ovis_batch.train.session import enable_activation_checkpointing

PIXELS = {"min_pixels": 32 * 32, "max_pixels": 128 * 128}
CAPTIONS = ["a woman in a space suit", "a cat looking up", "a cup of coffee on a saucer"]


@pytest.fixture(scope="module")
def prepared(photos) -> list[PreparedImage]:
    return [prepare_image(photos[name], **PIXELS) for name in ("astronaut", "chelsea", "coffee")]


def batch_for(model, prepared, embedding: str) -> dict[str, torch.Tensor]:
    build = ExampleBuilder(
        model.tokenizer,
        model.prompts.chat_template,
        prompt="Describe the image.",
        max_caption_tokens=64,
        generation=True,
        contrastive=True,
        embedding=embedding,
    )
    examples = [build.build(p.patches, p.grid_thw, c) for p, c in zip(prepared, CAPTIONS, strict=True)]
    return PairCollator(build.pad_id)(examples)


def wrapper(model, embedding: str = "last_token", generation: float = 1.0, contrastive: float = 1.0):
    temperature = LearnedTemperature(0.07, "cpu", betas=(0.9, 0.999), eps=1e-8) if contrastive else None
    return FinetuneModel(
        model.module,
        generation_weight=generation,
        contrastive_weight=contrastive,
        embedding=embedding,
        temperature=temperature,
    ).eval()


def test_caption_loss_equals_the_models_own_loss(tiny_model, prepared):
    batch = batch_for(tiny_model, prepared, "last_token")
    module = tiny_model.module
    with torch.no_grad():
        reference = module(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=normalize_patches(batch["pixel_values"]),
            grid_thws=batch["grid_thws"],
            labels=batch["labels"],
        ).loss
        grids = [tuple(g) for g in batch["grid_thws"].tolist()]
        visual = module.visual_embeddings(normalize_patches(batch["pixel_values"]), grids)
        embeds = module.embed_inputs(batch["input_ids"], visual_embeds=visual)
        ours = caption_loss(module.llm, embeds, batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("embedding", ["last_token", "vte_mean"])
def test_training_embeddings_are_the_runtimes_embeddings(tiny_model, prepared, embedding):
    batch = batch_for(tiny_model, prepared, embedding)
    model = wrapper(tiny_model, embedding)
    with torch.no_grad():
        grids = [tuple(g) for g in batch["grid_thws"].tolist()]
        visual = model.ovis.visual_embeddings(normalize_patches(batch["pixel_values"]), grids)
        image = model.image_vectors(
            visual, grids, batch.get("image_query_ids"), batch.get("image_query_mask")
        )
        text = model.text_vectors(batch["text_ids"], batch["text_mask"])
    expected_image = tiny_model.embed_images(prepared, strategy=embedding)
    expected_text = tiny_model.embed_texts(CAPTIONS, strategy=embedding)
    np.testing.assert_allclose(F.normalize(image, dim=-1).numpy(), expected_image, atol=2e-5)
    np.testing.assert_allclose(F.normalize(text, dim=-1).numpy(), expected_text, atol=2e-5)


def naive_info_nce(image: torch.Tensor, text: torch.Tensor, temperature: float) -> float:
    """Both directions written out pair by pair: -log softmax of the matching pair, averaged."""

    def unit(v: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    image, text = [unit(v) for v in image.tolist()], [unit(v) for v in text.tolist()]
    n = len(image)
    sim = [
        [sum(a * b for a, b in zip(image[i], text[j], strict=True)) / temperature for j in range(n)]
        for i in range(n)
    ]
    image_to_text = [-sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(n))) for i in range(n)]
    text_to_image = [-sim[j][j] + math.log(sum(math.exp(sim[i][j]) for i in range(n))) for j in range(n)]
    return (sum(image_to_text) / n + sum(text_to_image) / n) / 2


@pytest.mark.parametrize("temperature", [0.07, 0.5, 0.005])
def test_info_nce_matches_the_naive_formula(temperature):
    generator = torch.Generator().manual_seed(0)
    image, text = torch.randn(5, 7, generator=generator), torch.randn(5, 7, generator=generator)
    logit_scale = torch.tensor(math.log(1 / temperature))
    # The temperature is kept >= 0.01 (logit scale <= log 100), as CLIP keeps it.
    expected = naive_info_nce(image, text, max(temperature, 0.01))
    assert info_nce(image, text, logit_scale).item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_is_symmetric_and_zero_for_a_single_pair():
    image, text = torch.randn(4, 6), torch.randn(4, 6)
    scale = torch.tensor(2.0)
    assert info_nce(image, text, scale).item() == pytest.approx(info_nce(text, image, scale).item(), rel=1e-6)
    assert info_nce(image[:1], text[:1], scale).item() == pytest.approx(0.0, abs=1e-7)


def test_the_loss_is_the_weighted_sum_and_every_trainable_part_gets_a_gradient(tiny_model, prepared):
    batch = batch_for(tiny_model, prepared, "last_token")
    model = wrapper(tiny_model, generation=0.3, contrastive=2.0)
    out = model(**batch)
    expected = 0.3 * out.generation_loss + 2.0 * out.contrastive_loss
    torch.testing.assert_close(out.loss.detach(), expected)
    assert out.temperature.item() == pytest.approx(0.07)
    model.zero_grad()
    out.loss.backward()
    try:
        assert model.temperature.logit_scale.grad.abs() > 0
        assert model.ovis.vte.weight.grad.abs().sum() > 0
        model.temperature.step(learning_rate=0.1)
        assert model.temperature.value != pytest.approx(0.07, rel=1e-6)
        assert model.temperature.logit_scale.grad is None
    finally:
        model.zero_grad(set_to_none=True)


def test_generation_only_skips_the_contrastive_inputs(tiny_model, prepared):
    batch = batch_for(tiny_model, prepared, "last_token")
    for key in ("image_query_ids", "image_query_mask", "text_ids", "text_mask"):
        batch.pop(key)
    model = wrapper(tiny_model, contrastive=0.0)
    with torch.no_grad():
        out = model(**batch)
    assert out.contrastive_loss is None and out.temperature is None
    torch.testing.assert_close(out.loss, out.generation_loss)


def test_the_model_holds_exactly_the_official_parameter_names(tiny_model):
    model = wrapper(tiny_model)
    assert list(model.state_dict()) == list(tiny_model.module.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in tiny_model.module.named_parameters()]


def test_the_temperature_state_survives_json_exactly():
    import json

    temperature = LearnedTemperature(0.07, "cpu", betas=(0.9, 0.999), eps=1e-8)
    for _ in range(3):
        (temperature.logit_scale * 1.7).sum().backward()
        temperature.step(learning_rate=0.01)
    restored = LearnedTemperature(0.5, "cpu", betas=(0.9, 0.999), eps=1e-8)
    restored.load(json.loads(json.dumps(temperature.state())))
    for t in (temperature, restored):
        (t.logit_scale * 1.7).sum().backward()
        t.step(learning_rate=0.01)
    assert torch.equal(restored.logit_scale, temperature.logit_scale)
    assert restored.state() == temperature.state()


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_checkpoint, prepared):
    import ovis_batch

    results = []
    for checkpointing in (False, True):
        model = ovis_batch.load_model(tiny_checkpoint, device="cpu")
        if checkpointing:
            enable_activation_checkpointing(model.module)
            assert model.module.llm.model.layers[0].gradient_checkpointing
            assert model.module.visual_tokenizer.vit.vision_model.encoder.gradient_checkpointing
        trained = wrapper(model).train()
        out = trained(**batch_for(model, prepared, "last_token"))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in trained.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6)
