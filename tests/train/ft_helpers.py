"""Helpers of the fine-tuning tests: pairs data on disk (real photos, every kind of bad pair), runs.

Settings keep a step cheap on two CPU cores: images of at most 128x128 pixels (16 visual tokens), a
batch of 4 pairs, fp32, no DataLoader workers.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

CAPTIONS = {
    "astronaut": "a woman in a space suit smiling",
    "chelsea": "a cat looking up",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on the launch pad",
    "camera": "a man with a camera on a tripod",
    "coins": "old coins laid out in rows",
    "hubble_deep_field": "galaxies in the deep sky",
    "immunohistochemistry": "stained tissue under a microscope",
}
# Bad pairs, by the reason the run summary counts them under.
BAD_PAIRS = {
    "no-caption": ("images/coffee.jpg", None, "missing_caption"),
    "blank-caption": ("images/coffee.jpg", "   ", "missing_caption"),
    "garbage": ("images/garbage.jpg", "a file that is not an image", "not_an_image"),
    "missing-file": ("images/absent.jpg", "a file that does not exist", "file_not_found"),
    "tiny-image": ("images/tiny.png", "an image of 20x20 pixels", "image_too_small"),
}
SMALL = [
    "min_pixels=1024",
    "max_pixels=16384",
    "batch_size=4",
    "dataloader_workers=0",
    "scan_workers=2",
    "learning_rate=1e-3",
    "lr_scheduler=constant",
    "logging_steps=1",
]


@dataclass(frozen=True)
class Run:
    """A finished fine-tuning run: its folder, the model it started from, the settings it was given."""

    run_dir: Path
    base: Path
    pairs: Path
    overrides: tuple[str, ...]
    freeze: str
    loss: str

    def checkpoint(self, step: int) -> Path:
        return self.run_dir / f"checkpoint-{step}"

    def losses(self) -> list[dict]:
        state = json.loads((self.run_dir / "trainer_state.json").read_text())
        return [e for e in state["log_history"] if "loss" in e]

    def summary(self) -> dict:
        return json.loads((self.run_dir / "finetune_summary.json").read_text())


def needs_trainer() -> None:
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("the Hugging Face Trainer needs accelerate (pip install 'accelerate>=1.1')")


def write_pairs(folder: Path) -> Path:
    """8 photo/caption pairs plus one pair of each bad kind; image paths relative to the Parquet file."""
    from skimage import data

    images = folder / "images"
    images.mkdir(parents=True)
    rows = []
    for name, caption in CAPTIONS.items():
        Image.fromarray(getattr(data, name)()).save(images / f"{name}.jpg", quality=90)
        rows.append({"image_id": name, "image": f"images/{name}.jpg", "caption": caption})
    (images / "garbage.jpg").write_bytes(b"this is not a JPEG")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(images / "tiny.png")
    for pair_id, (image, caption, _) in BAD_PAIRS.items():
        rows.append({"image_id": pair_id, "image": image, "caption": caption})
    path = folder / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def finetune_run(
    base: Path, pairs: Path, run_dir: Path, *extra: str, freeze: str, loss: str, **kwargs
) -> Run:
    from workflows.finetune import finetune

    needs_trainer()
    overrides = (*SMALL, *extra)
    finetune(str(pairs), str(base), run_dir, overrides=list(overrides), freeze=freeze, loss=loss, **kwargs)
    return Run(run_dir, base, pairs, overrides, freeze, loss)
