"""Fine-tuning settings: the shipped YAML documents the defaults; impossible combinations fail by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from ovis_batch.config import ConfigError, load_config
from ovis_batch.train.settings import FinetuneConfig
from ovis_batch.train.trainer import deepspeed_config

YAML = Path(__file__).resolve().parents[2] / "configs" / "finetune.yaml"


def test_finetune_yaml_documents_the_defaults():
    assert load_config(FinetuneConfig, YAML) == FinetuneConfig()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["batch_size=1"], "needs batch_size >= 2"),
        (["loss=generation", "batch_size=1", "freeze=top:99"], None),  # the layer count is checked later
        (["loss=both", "generation_weight=0", "contrastive_weight=0"], "nothing would be learned"),
        (["caption_column=image"], "must differ"),
        (["min_pixels=4000000"], "must not exceed max_pixels"),
        (["deepspeed={stage: 2, offload_params: true}"], "need stage 3"),
        (["deepspeed={stage: 4}"], "deepspeed.stage"),
        (["max_shard_size=5 elephants"], "max_shard_size"),
        (["loss=contrastiv"], "loss: Input should be 'generation', 'contrastive' or 'both'"),
        (["learning_rate=0"], "learning_rate: Input should be greater than 0"),
        (["epoch=2"], "epoch: Extra inputs are not permitted"),
    ],
)
def test_impossible_settings_are_named(overrides, message):
    if message is None:
        load_config(FinetuneConfig, None, overrides)
        return
    with pytest.raises(ConfigError, match=message):
        load_config(FinetuneConfig, None, overrides)


def test_loss_weights_follow_the_loss():
    weights = {"generation_weight": 0.5, "contrastive_weight": 2.0}
    assert FinetuneConfig(loss="generation", **weights).loss_weights() == (1.0, 0.0)
    assert FinetuneConfig(loss="contrastive", **weights).loss_weights() == (0.0, 1.0)
    assert FinetuneConfig(loss="both", **weights).loss_weights() == (0.5, 2.0)


def test_deepspeed_config_lets_the_trainer_fill_sizes_and_gathers_zero3_weights_on_save():
    zero3 = deepspeed_config(load_config(FinetuneConfig, None, ["deepspeed={stage: 3}"]).deepspeed)
    assert zero3["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert zero3["train_micro_batch_size_per_gpu"] == "auto" and zero3["bf16"] == {"enabled": "auto"}
    assert "optimizer" not in zero3  # the Trainer's AdamW
    offload = load_config(FinetuneConfig, None, ["deepspeed={stage: 2, offload_optimizer: true}"]).deepspeed
    config = deepspeed_config(offload)
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["optimizer"]["type"] == "AdamW"  # DeepSpeed's own (CPU Adam) for offloaded states
