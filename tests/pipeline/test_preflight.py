"""Settings checked against the checkpoint before any work: the thinking budget's room for the forced end
of thinking (counted with the checkpoint's own tokenizer) and the context limits. A setting that can only
fail is refused in one line, exit 2, with nothing written; it never becomes a folder of error rows that
then refuses the corrected rerun."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from caption_cli import caption_args
from PIL import Image

from ovis_batch.cli import main as cli
from ovis_batch.errors import EXIT_USAGE
from ovis_batch.model.limits import (
    GenerationSettingsError,
    check_generation_settings,
    generation_limits,
    max_visual_tokens,
)
from ovis_batch.model.prompts import EARLY_STOP_TEXT
from ovis_batch.model.runtime import load_tokenizer


@pytest.fixture(scope="module")
def official_vocab_checkpoint(tmp_path_factory):
    from ovis_batch.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("official") / "tiny", seed=0, official_vocab=True)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("preflight")
    Image.fromarray(photos["coffee"]).save(folder / "coffee.jpg")
    pq.write_table(pa.table({"image_id": ["coffee"], "image": ["coffee.jpg"]}), folder / "manifest.parquet")
    return folder / "manifest.parquet"


def forced_ending_tokens(folder) -> int:
    """The oracle: the forced ending tokenised on its own by the checkpoint's tokenizer."""
    return len(load_tokenizer(folder)(EARLY_STOP_TEXT, add_special_tokens=False).input_ids)


def test_the_forced_ending_is_counted_with_each_checkpoints_own_tokenizer(
    upstream_dir, official_vocab_checkpoint
):
    upstream = upstream_dir / "checkpoint"  # the parity fixture: Ovis2.5's own vocabulary
    counted = [
        generation_limits(folder, prompt="Describe.", max_pixels=50176, thinking=True).forced_ending_tokens
        for folder in (upstream, official_vocab_checkpoint)
    ]
    assert counted == [forced_ending_tokens(upstream), forced_ending_tokens(official_vocab_checkpoint)]
    assert counted[0] != counted[1]  # two vocabularies, two lengths: no constant stands for both


def test_a_budget_without_room_for_the_forced_ending_is_refused_before_work(
    official_vocab_checkpoint, manifest, tmp_path, capsys
):
    ending = forced_ending_tokens(official_vocab_checkpoint)
    output = tmp_path / "out"
    settings = ["thinking=true", "thinking_budget=16", "max_new_tokens=48"]
    assert 16 + ending + 1 > 48  # the settings of the report: they pass the settings' own validation
    status = cli(caption_args(manifest, output, official_vocab_checkpoint, *settings))
    assert status == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: max_new_tokens=48 leaves no room for an answer after thinking_budget=16: this checkpoint's "
        f"tokenizer writes the forced end of thinking in {ending} tokens, so max_new_tokens must be at least "
        f"{16 + ending + 1} (16 + {ending} + 1; more for useful answers). Raise max_new_tokens or lower "
        "thinking_budget"
    ]
    assert not output.exists()  # nothing written: the corrected rerun starts cleanly
    limits = check_generation_settings(
        official_vocab_checkpoint,
        prompt="Describe.",
        max_new_tokens=16 + ending + 1,
        thinking=True,
        thinking_budget=16,
        max_pixels=50176,
    )
    assert limits.forced_ending_tokens == ending  # the least value the message names is accepted


def test_rows_longer_than_the_context_are_refused_before_work(tiny_checkpoint):
    limits = generation_limits(tiny_checkpoint, prompt="Describe.", max_pixels=1792 * 1792, thinking=False)
    assert limits.context_tokens == 40960  # the tiny config's max_position_embeddings
    too_many = limits.context_tokens - limits.prompt_tokens + 1
    with pytest.raises(GenerationSettingsError, match=r"more than the language model's context .* \(40960\)"):
        check_generation_settings(
            tiny_checkpoint,
            prompt="Describe.",
            max_new_tokens=too_many,
            thinking=False,
            thinking_budget=None,
            max_pixels=1792 * 1792,
        )
    check_generation_settings(
        tiny_checkpoint,
        prompt="Describe.",
        max_new_tokens=too_many - 1,
        thinking=False,
        thinking_budget=None,
        max_pixels=1792 * 1792,
    )
    with pytest.raises(GenerationSettingsError, match=r"more than vllm_max_model_len allows \(4096\)"):
        check_generation_settings(
            tiny_checkpoint,
            prompt="Describe.",
            max_new_tokens=1024,
            thinking=False,
            thinking_budget=None,
            max_pixels=1792 * 1792,
            engine_max_len=4096,
        )


def test_the_longest_prompt_counts_the_visual_tokens_of_an_image_at_max_pixels(tiny_checkpoint):
    small = generation_limits(tiny_checkpoint, prompt="Describe.", max_pixels=448 * 448, thinking=False)
    large = generation_limits(tiny_checkpoint, prompt="Describe.", max_pixels=1792 * 1792, thinking=False)
    assert max_visual_tokens(1792 * 1792) == 1792 * 1792 // (32 * 32) == 3136
    assert large.prompt_tokens - small.prompt_tokens == 3136 - 196
