"""Pairs data on disk and fine-tuning runs of the tiny model, made once per session and shared.

Each test reads what it needs from a run's folder; see ft_helpers.py for the settings of the runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ft_helpers import Run, finetune_run, write_pairs


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="session")
def both_run(tiny_checkpoint, pairs_file, tmp_path_factory) -> Run:
    """Both losses (last_token), top:1; 5 steps of 4 pairs (2 steps an epoch), checkpoints at 3 and 5.

    Shards of at most 200 KB, so that the tiny model's checkpoints are sharded like a real model's.
    """
    run_dir = tmp_path_factory.mktemp("both") / "run"
    extra = ("max_steps=5", "save_steps=3", "max_shard_size=200KB")
    return finetune_run(tiny_checkpoint, pairs_file, run_dir, *extra, freeze="top:1", loss="both")


@pytest.fixture(scope="session")
def contrastive_run(tiny_checkpoint, pairs_file, tmp_path_factory) -> Run:
    """The contrastive loss alone with the vte_mean embedding, training the VTE and the visual head."""
    run_dir = tmp_path_factory.mktemp("contrastive") / "run"
    extra = ("max_steps=3", "save_steps=3", "embedding=vte_mean", "train_visual_head=true")
    return finetune_run(tiny_checkpoint, pairs_file, run_dir, *extra, freeze="vte", loss="contrastive")
