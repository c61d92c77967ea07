"""Freeze specs: what each one trains, counted on the tiny model's real parameter names (meta device)."""

from __future__ import annotations

import re

import pytest
import torch

from ovis_batch.config import ConfigError, load_config
from ovis_batch.train.freeze import FreezeError, apply_trainable, plan_trainable
from ovis_batch.train.settings import FinetuneConfig, FreezeSpec, parse_freeze

LAYERS = 3  # the tiny model's LLM layers
POST_LN = "visual_tokenizer.vit.vision_model.post_layernorm."


def meta_model(folder, *, tied: bool = True):
    from ovis_batch.model.ovis2_5 import Ovis2_5Config, Ovis2_5ForConditionalGeneration

    config = Ovis2_5Config.from_pretrained(str(folder))
    config.llm_config.tie_word_embeddings = tied
    with torch.device("meta"):
        return Ovis2_5ForConditionalGeneration(config)


def plan(model, spec: str, loss: str = "both", embedding: str = "last_token", **options):
    llm = model.config.llm_config
    return plan_trainable(
        model.named_parameters(),
        parse_freeze(spec),
        num_layers=llm.num_hidden_layers,
        tied_embeddings=llm.tie_word_embeddings,
        loss=loss,
        embedding=embedding,
        **options,
    )


def layer(name: str) -> int | None:
    match = re.match(r"llm\.model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


# spec, options, which parameter names it must train (all others frozen)
EXPECTED = {
    "vte": ({}, lambda n: n == "vte.weight"),
    "vte+head": (
        {"train_visual_head": True},
        lambda n: n == "vte.weight" or n.startswith("visual_tokenizer.head."),
    ),
    "top:1": (
        {},
        lambda n: layer(n) == 2 or n in ("llm.model.norm.weight", "llm.model.embed_tokens.weight"),
    ),
    "top:2 no lm_head": (
        {"train_lm_head": False},
        lambda n: layer(n) in (1, 2) or n == "llm.model.norm.weight",
    ),
    "bottom:2": ({}, lambda n: layer(n) in (0, 1)),
    "vision+top:1": (
        {},
        lambda n: (
            (n.startswith(("visual_tokenizer.", "vte.")) and not n.startswith(POST_LN))
            or layer(n) == 2
            or n in ("llm.model.norm.weight", "llm.model.embed_tokens.weight")
        ),
    ),
    "all": ({}, lambda n: not n.startswith(POST_LN)),
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_each_spec_trains_exactly_its_parameters(tiny_checkpoint, case):
    model = meta_model(tiny_checkpoint)
    options, expected = EXPECTED[case]
    result = plan(model, case.split(" ")[0].replace("+head", ""), **options)
    names = dict(model.named_parameters())
    assert set(result.trainable) == {n for n in names if expected(n)}
    assert result.trainable_count == sum(names[n].numel() for n in result.trainable)
    assert result.total_count == sum(p.numel() for p in names.values())
    assert f"training {result.trainable_count:,} of {result.total_count:,} parameters" in result.describe()
    assert f"({100 * result.trainable_count / result.total_count:.2f}%)" in result.describe()


def test_untied_model_trains_lm_head_not_the_embeddings(tiny_checkpoint):
    model = meta_model(tiny_checkpoint, tied=False)
    trained = set(plan(model, "top:1").trainable)
    assert "llm.lm_head.weight" in trained and "llm.model.embed_tokens.weight" not in trained
    # The last-token contrastive loss reads hidden states, never lm_head: it is left out, with a note.
    contrastive = plan(model, "top:1", loss="contrastive")
    assert "llm.lm_head.weight" not in contrastive.trainable
    assert any("get no gradient" in note for note in contrastive.notes)


def test_tied_lm_head_is_announced(tiny_checkpoint):
    assert any("tied to the token embedding" in n for n in plan(meta_model(tiny_checkpoint), "top:1").notes)


def test_bottom_layers_come_with_a_warning(tiny_checkpoint):
    result = plan(meta_model(tiny_checkpoint), "bottom:1")
    assert any("erase the model's general ability" in w for w in result.warnings)
    assert "warning: bottom:1" in result.describe()


def test_vte_mean_contrastive_reaches_only_the_visual_side_and_the_token_embeddings(tiny_checkpoint):
    model = meta_model(tiny_checkpoint)
    result = plan(model, "all", loss="contrastive", embedding="vte_mean")
    assert all(
        n.startswith(("visual_tokenizer.", "vte.")) or n == "llm.model.embed_tokens.weight"
        for n in result.trainable
    )
    assert not any(layer(n) is not None for n in result.trainable)


def test_more_layers_than_the_model_has_is_refused(tiny_checkpoint):
    with pytest.raises(FreezeError, match=r"names 4 LLM layers but the model has 3; use K <= 3"):
        plan(meta_model(tiny_checkpoint), "vision+top:4")


def test_nothing_trainable_is_refused(tiny_checkpoint):
    # top:1 without lm_head: one layer (11 tensors) and the final norm; the vte_mean loss reaches none.
    with pytest.raises(FreezeError, match=r"leaves nothing trainable.*reaches none of the 12 selected"):
        plan(
            meta_model(tiny_checkpoint),
            "top:1",
            loss="contrastive",
            embedding="vte_mean",
            train_lm_head=False,
        )


@pytest.mark.parametrize("text", ["top", "top:0", "top:-1", "middle:2", "vte:1", "all:3", "top:two", ""])
def test_malformed_specs_are_refused_by_name(text):
    with pytest.raises(ValueError):
        parse_freeze(text)
    with pytest.raises(ConfigError, match="freeze"):
        load_config(FinetuneConfig, None, [f"freeze={text!r}" if text else "freeze=''"])


def test_specs_parse_and_print_back():
    for text in ("vte", "all", "top:4", "bottom:2", "vision+top:12"):
        assert str(parse_freeze(text)) == text
    assert parse_freeze(" top:3 ") == FreezeSpec("top", 3)


def test_apply_sets_requires_grad_from_the_plan(tiny_model):
    module = tiny_model.module
    before = {n: p.requires_grad for n, p in module.named_parameters()}
    try:
        result = plan(module, "top:1")
        apply_trainable(module, result)
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        assert trainable == set(result.trainable)
        assert module.llm.lm_head.weight.requires_grad  # tied: the same tensor as the embeddings
    finally:
        for n, p in module.named_parameters():
            p.requires_grad_(before[n])
