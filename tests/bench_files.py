"""Benchmark files in VLMEvalKit's TSV layout, built from scikit-image photos (base64 PNG), for the tests
of `bench` (tests/bench/) and of `bench` against an object store (tests/storage/).

Nothing here downloads. `write_tsv` writes rows as VLMEvalKit's files hold them (tab-separated, a header,
empty cells for missing values), to a local path or a URI; the builders make the benchmark kinds the
tests need.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ovis_batch.storage import location

OPTION_TEXTS = ["a cat", "an astronaut", "a cup of coffee", "a rocket"]


def photo_base64(photo: np.ndarray, width: int, height: int) -> str:
    """A photo resized to width x height, as base64 PNG (what VLMEvalKit's `image` column holds)."""
    buffer = io.BytesIO()
    Image.fromarray(photo).resize((width, height)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_tsv(path: Path | str, rows: list[dict]) -> Path | str:
    """Rows as a VLMEvalKit TSV file (columns in first-seen order, missing cells empty); `path` is a local
    path or a URI."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    location(path).write_text(pd.DataFrame(rows, columns=columns).to_csv(sep="\t", index=False))
    return path


def rotate(options: list[str], answer: int, k: int) -> tuple[list[str], int]:
    """MMBench's circular rotation k of the options (option i moves to i - k), and where the answer goes."""
    n = len(options)
    return [options[(i + k) % n] for i in range(n)], (answer - k) % n


def circular_rows(photos: dict[str, np.ndarray], groups: int, size: int = 48) -> list[dict]:
    """`groups` MMBench-style questions of four options, each with its three rotations (index + k * 1e6)."""
    names = sorted(photos)
    categories = [
        ("object_localization", "finegrained_perception (instance-level)"),
        ("scene", "coarse_perception"),
    ]
    rows = []
    for q in range(1, groups + 1):
        photo = photos[names[q % len(names)]][q % 7 :, q % 5 :]
        image = photo_base64(photo, size + q % 3 * 8, size)
        category, l2 = categories[q % 2]
        for k in range(4):
            options, answer = rotate(OPTION_TEXTS, q % 4, k)
            rows.append(
                {
                    "index": q + k * 1_000_000,
                    "question": f"What is shown in picture {q}?",
                    "hint": "The photo was taken outdoors." if q % 3 == 0 else None,
                    "A": options[0],
                    "B": options[1],
                    "C": options[2],
                    "D": options[3],
                    "answer": "ABCD"[answer],
                    "category": category,
                    "l2-category": l2,
                    "split": "dev",
                    "image": image,
                }
            )
    return rows
