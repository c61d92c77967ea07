"""CPU cost of turning encoded images into model inputs, per core, against a plain decode.

    python benchmarks/bench_preprocess_cpu.py                # under a minute on one core
    python benchmarks/bench_preprocess_cpu.py --repeats 21   # steadier on a busy machine

Everything runs in this one process on one thread (torch is limited to one thread; PIL decodes and
resizes on the calling thread), so the rates are per core: a CPU stage with N workers does about N
times as much. Images are encoded in memory first, so no disk I/O is timed.

Pipelines timed per image (the best of `--repeats` runs after one warm-up, the pipelines of an image
taking turns: other processes on a shared machine only ever add time, so the minimum is the steadiest
estimate of the work itself):

- floor:  `Image.open(...).convert("RGB")`, a full decode and nothing else;
- draft:  PIL's DCT-domain draft decode alone, at the size fast mode requests (only where one applies);
- exact:  decode_image(fast=False) + prepare_image + normalize_patches (upstream's pixels);
- fast:   decode_image(fast=True) + prepare_image + normalize_patches (the batch default).

Images: a 12-megapixel 4000x3000 JPEG (a skimage photo upscaled, quality 90, as the issue asks), the
same size built from native-resolution skimage photos (the detail of a real camera photo: upscaled
photos decode faster than real ones), and a 1792x1024 JPEG that needs no resize at the default limits.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from skimage import data

from ovis_batch.model.images import DRAFT_MARGIN, decode_image
from ovis_batch.model.preprocess import DEFAULT_MAX_PIXELS, normalize_patches, prepare_image, smart_resize


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def upscaled_photo(width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(data.chelsea()).resize((width, height), Image.Resampling.BICUBIC))


def detailed_mosaic(width: int, height: int) -> np.ndarray:
    """Native-resolution skimage photos tiled to the requested size."""
    tiles = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    tiles += [np.repeat(gray()[:, :, None], 3, axis=2) for gray in (data.camera, data.grass, data.gravel)]
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    y, index = 0, 0
    while y < height:
        x, row_height = 0, 0
        while x < width:
            tile = tiles[index % len(tiles)][: height - y, : width - x]
            canvas[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
            x, row_height, index = x + tile.shape[1], max(row_height, tile.shape[0]), index + 1
        y += row_height
    return canvas


def to_model_inputs(encoded: bytes, max_pixels: int, fast: bool) -> torch.Tensor:
    decoded = decode_image(encoded, max_pixels=max_pixels, fast=fast)
    prepared = prepare_image(
        decoded.image, max_pixels=max_pixels, source_size=(decoded.width, decoded.height)
    )
    return normalize_patches(torch.from_numpy(prepared.patches))


def plain_decode(encoded: bytes) -> Image.Image:
    return Image.open(io.BytesIO(encoded)).convert("RGB")


def draft_decode(encoded: bytes, request: tuple[int, int]) -> Image.Image:
    image = Image.open(io.BytesIO(encoded))
    image.draft("RGB", request)
    return image.convert("RGB")


def best_seconds(runs: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best time of each run, taking turns so that a burst of load elsewhere hits them all alike."""
    for run in runs:
        run()  # warm-up
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for index, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per pipeline (best reported)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n")

    photo_12mp, detailed_12mp = jpeg(upscaled_photo(4000, 3000)), jpeg(detailed_mosaic(4000, 3000))
    # 640*640: a cheaper setting (at most 400 visual tokens) where a 12 MP photo has room for a draft.
    cases = [
        ("12 MP photo, upscaled", photo_12mp, DEFAULT_MAX_PIXELS),
        ("12 MP photo, upscaled", photo_12mp, 640 * 640),
        ("12 MP, native detail", detailed_12mp, DEFAULT_MAX_PIXELS),
        ("12 MP, native detail", detailed_12mp, 640 * 640),
        ("1792x1024 photo", jpeg(upscaled_photo(1792, 1024)), DEFAULT_MAX_PIXELS),
    ]
    print(
        "| image | max_pixels | model input | pipeline | decoded at | ms / image | images/s per core "
        "| time vs floor |"
    )
    print("|---|---:|---|---|---|---:|---:|---:|")
    for name, encoded, max_pixels in cases:
        with Image.open(io.BytesIO(encoded)) as probe:
            width, height = probe.size
        target_height, target_width = smart_resize(height, width, max_pixels=max_pixels)
        request = (DRAFT_MARGIN * target_width, DRAFT_MARGIN * target_height)
        fast_size = decode_image(encoded, max_pixels=max_pixels, fast=True).image.size
        drafts = fast_size != (width, height)

        pipelines: list[tuple[str, Callable[[], object], tuple[int, int]]] = [
            ("floor: open + convert", lambda e=encoded: plain_decode(e), (width, height))
        ]
        if drafts:
            pipelines.append(
                ("draft decode alone", lambda e=encoded, r=request: draft_decode(e, r), fast_size)
            )
        pipelines.append(
            ("exact", lambda e=encoded, m=max_pixels: to_model_inputs(e, m, fast=False), (width, height))
        )
        pipelines.append(
            ("fast", lambda e=encoded, m=max_pixels: to_model_inputs(e, m, fast=True), fast_size)
        )

        timings = best_seconds([run for _, run, _ in pipelines], args.repeats)
        floor = timings[0]
        for (label, _, decoded_size), seconds in zip(pipelines, timings, strict=True):
            print(
                f"| {name} | {max_pixels} | {target_width}x{target_height} | {label} | "
                f"{decoded_size[0]}x{decoded_size[1]} | {seconds * 1000:.1f} | {1 / seconds:.2f} | "
                f"{seconds / floor:.2f} |"
            )


if __name__ == "__main__":
    main()
