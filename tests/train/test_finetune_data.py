"""Pairs data: the scan that skips and counts bad pairs, training examples, and batches."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from ft_helpers import BAD_PAIRS, CAPTIONS
from PIL import Image

from ovis_batch.model.images import decode_image
from ovis_batch.model.ovis2_5 import IMAGE_END_ID, IMAGE_START_ID, VISUAL_ATOM_ID
from ovis_batch.model.preprocess import prepare_image
from ovis_batch.model.prompts import IMAGE_SUMMARY_PROMPT, TEXT_SUMMARY_PROMPT
from ovis_batch.train.data import (
    ExampleBuilder,
    PairCollator,
    PairDataset,
    PairImages,
    PairScan,
    PairsError,
    read_pairs,
    scan_pairs,
)

PROMPT = "Describe this image in one or two sentences."
PIXELS = {"min_pixels": 32 * 32, "max_pixels": 128 * 128}


def images() -> PairImages:
    return PairImages(image_column="image", root=None, pixel_ceiling=10**8, fast=True, **PIXELS)


def builder(model, **options) -> ExampleBuilder:
    settings = {"generation": True, "contrastive": True, "embedding": "last_token", "max_caption_tokens": 64}
    settings.update(options)
    return ExampleBuilder(model.tokenizer, model.prompts.chat_template, prompt=PROMPT, **settings)


def read(path):
    return read_pairs(str(path), id_column="image_id", image_column="image", caption_column="caption")


def test_scan_keeps_good_pairs_and_counts_each_bad_one_by_reason(pairs_file, tiny_model):
    pairs = read(pairs_file)
    scan = scan_pairs(pairs, images(), builder(tiny_model), workers=2)
    ids = pairs.table.column("image_id").to_pylist()
    assert [ids[r] for r in scan.rows] == list(CAPTIONS)
    expected: dict[str, list[str]] = {}
    for pair_id, (_, _, reason) in BAD_PAIRS.items():
        expected.setdefault(reason, []).append(pair_id)
    assert scan.skipped == {reason: len(v) for reason, v in expected.items()}
    assert scan.skipped_ids == expected
    summary = scan.summary()
    assert (summary["pairs"], summary["used"], summary["skipped"]) == (13, 8, 5)
    # Each photo is scaled into 128x128 pixels at most: 16 visual tokens or fewer.
    assert all(0 < t <= 16 for t in scan.visual_tokens)


def test_scan_survives_a_save_and_load(pairs_file, tiny_model, tmp_path):
    scan = scan_pairs(read(pairs_file), images(), builder(tiny_model), workers=1)
    scan.save(tmp_path / "scan.parquet")
    assert PairScan.load(tmp_path / "scan.parquet") == scan


def test_images_are_prepared_as_inference_prepares_them(pairs_file):
    pairs = read(pairs_file)
    patches, grid = images().load("images/rocket.jpg", pairs.table.column("__file")[0].as_py())
    decoded = decode_image(pairs_file.parent / "images/rocket.jpg", max_pixels=PIXELS["max_pixels"])
    reference = prepare_image(decoded.image, source_size=(decoded.width, decoded.height), **PIXELS)
    assert grid == reference.grid_thw
    assert np.array_equal(patches, reference.patches)


def test_image_bytes_and_folders_of_files_are_read(tmp_path, tiny_model):
    from skimage import data

    (tmp_path / "part").mkdir()
    rows = []
    for name in ("astronaut", "coffee"):
        buffer = io.BytesIO()
        Image.fromarray(getattr(data, name)()).save(buffer, format="PNG")
        rows.append({"image_id": name, "image": buffer.getvalue(), "caption": name})
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "part" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1:]), tmp_path / "part" / "b.parquet")
    pairs = read(tmp_path / "part")
    scan = scan_pairs(pairs, images(), builder(tiny_model))
    assert (scan.rows, scan.skipped) == ([0, 1], {})


def test_missing_columns_are_named(tmp_path):
    pq.write_table(pa.table({"image_id": ["a"], "image": ["a.jpg"]}), tmp_path / "p.parquet")
    with pytest.raises(PairsError, match=r"no column\(s\) \['caption'\]"):
        read(tmp_path / "p.parquet")


def test_examples_use_the_runtime_prompts_and_mask_the_prompt(tiny_model):
    patches = np.zeros((16, 768), np.uint8)  # a 4x4 patch grid: 4 visual tokens
    example = builder(tiny_model).build(patches, (1, 4, 4), "a cat looking up")
    prompts, special = tiny_model.prompts, tiny_model.special
    prompt = prompts.build(PROMPT, 4, thinking=False)
    caption = prompts.encode("a cat looking up")
    assert example["input_ids"] == prompt + caption + [special.im_end]
    assert example["labels"] == [-100] * len(prompt) + caption + [special.im_end]
    assert prompt.count(VISUAL_ATOM_ID) == 4 and IMAGE_START_ID in prompt and IMAGE_END_ID in prompt
    assert prompt[-4:] == prompts.encode("<think>\n\n</think>\n\n")[-4:]  # thinking off, as the caption job
    assert example["image_query_ids"] == prompts.build(IMAGE_SUMMARY_PROMPT, 4, thinking=False)
    text = TEXT_SUMMARY_PROMPT.format(text="a cat looking up")
    assert example["text_ids"] == prompts.build(text, None, thinking=False)
    vte_mean = builder(tiny_model, embedding="vte_mean", generation=False).build(patches, (1, 4, 4), "a cat")
    assert set(vte_mean) == {"patches", "grid", "text_ids"} and vte_mean["text_ids"] == prompts.encode(
        "a cat"
    )


def test_long_captions_are_cut_and_counted(pairs_file, tiny_model):
    cut = builder(tiny_model, max_caption_tokens=3)
    example = cut.build(np.zeros((16, 768), np.uint8), (1, 4, 4), "a woman in a space suit smiling")
    assert len(example["labels"]) - example["labels"].count(-100) == 4  # 3 caption tokens + <|im_end|>
    scan = scan_pairs(read(pairs_file), images(), cut)
    assert scan.truncated_captions == sum(len(tiny_model.prompts.encode(c)) > 3 for c in CAPTIONS.values())


def test_collator_pads_right_and_packs_images(pairs_file, tiny_model):
    pairs = read(pairs_file)
    build = builder(tiny_model)
    dataset = PairDataset(pairs, scan_pairs(pairs, images(), build), images(), build)
    examples = [dataset[0], dataset[2]]
    batch = PairCollator(build.pad_id)(examples)
    assert batch["pixel_values"].dtype == torch.uint8
    assert batch["pixel_values"].shape[0] == sum(e["patches"].shape[0] for e in examples)
    assert batch["grid_thws"].tolist() == [list(e["grid"]) for e in examples]
    for key, mask in [
        ("input_ids", "attention_mask"),
        ("image_query_ids", "image_query_mask"),
        ("text_ids", "text_mask"),
    ]:
        for row, e in enumerate(examples):
            n = len(e[key])
            assert batch[key][row, :n].tolist() == e[key]
            assert batch[mask][row].tolist() == [1] * n + [0] * (batch[key].shape[1] - n)
            assert set(batch[key][row, n:].tolist()) <= {build.pad_id}
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_an_image_that_breaks_after_the_scan_is_named(pairs_file, tiny_model, tmp_path):
    import shutil

    shutil.copytree(pairs_file.parent, tmp_path / "copy")
    pairs = read(tmp_path / "copy" / "pairs.parquet")
    build = builder(tiny_model)
    dataset = PairDataset(pairs, scan_pairs(pairs, images(), build), images(), build)
    (tmp_path / "copy" / "images" / "chelsea.jpg").write_bytes(b"")
    with pytest.raises(PairsError, match=r"pair 'chelsea'.*the data changed during the run"):
        dataset[1]
