"""The caption job's overhead on CPU: Ray Data end to end against the same model in a plain loop, and the
decode stage's images/s per CPU against the raw decode floor.

    python benchmarks/bench_pipeline_cpu.py [--rows 192] [--new-tokens 32] [--width 1792 --height 1024]

Everything runs on this machine with the tiny random-weight checkpoint (written to a temporary folder).
1. Decode stage, one core, in process: `DecodeStage` (fetch, decode, orient, RGB, resize, uint8 patches,
   error handling) over a manifest batch, against `Image.open(...).convert("RGB")` of the same files.
2. End to end: `ovis-batch caption` on a local Ray (1 decode actor, 1 model replica) against a plain
   in-process loop that decodes, prepares and generates the same rows in batches of the same size with
   an already loaded model. Ray's figure is given twice: the whole run (Ray start, actor start, model
   load: a fixed cost) and its marginal rate (from a run of half the rows: the fixed costs cancel),
   which is the rate a long nightly job sees.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image


def make_manifest(folder: Path, rows: int, width: int, height: int) -> Path:
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(rows):
        image = Image.fromarray(photos[i % len(photos)]).resize((width, height), Image.Resampling.BICUBIC)
        image.save(folder / "images" / f"{i}.jpg", quality=90)
        records.append({"image_id": f"r{i:05d}", "image": f"images/{i}.jpg"})
    pq.write_table(pa.Table.from_pylist(records), folder / "manifest.parquet")
    return folder / "manifest.parquet"


def bench_decode(manifest: Path, settings) -> dict:
    from ovis_batch.pipeline.stages import DecodeStage

    table = pq.read_table(manifest)
    paths = [str(manifest.parent / p) for p in table.column("image").to_pylist()]
    table = table.append_column("path", pa.array([str(manifest)] * table.num_rows))
    stage = DecodeStage(
        id_column="image_id",
        image_column="image",
        prompt=settings.prompt,
        prompt_column=None,
        passthrough=[],
        manifest=None,
        input_kind="patches",
        min_pixels=settings.min_pixels,
        max_pixels=settings.max_pixels,
        pixel_ceiling=settings.pixel_ceiling,
        fast=True,
    )
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as im:
            im.convert("RGB")
    floor = time.perf_counter() - started
    started = time.perf_counter()
    out = stage(table)
    decode = time.perf_counter() - started
    assert out.num_rows == table.num_rows and set(out.column("status").to_pylist()) == {"ok"}
    return {
        "raw_decode_images_s_per_cpu": len(paths) / floor,
        "decode_stage_images_s_per_cpu": len(paths) / decode,
        "decode_stage_vs_floor": floor / decode,
    }


def bench_plain_loop(manifest: Path, model_dir: Path, settings) -> dict:
    import ovis_batch
    from ovis_batch.model.images import decode_image
    from ovis_batch.model.preprocess import prepare_image

    model = ovis_batch.load_model(model_dir, device="cpu")
    paths = [manifest.parent / p for p in pq.read_table(manifest).column("image").to_pylist()]
    started = time.perf_counter()
    tokens = 0
    for i in range(0, len(paths), settings.batch_rows):
        prepared = []
        for path in paths[i : i + settings.batch_rows]:
            decoded = decode_image(path, max_pixels=settings.max_pixels, fast=True)
            prepared.append(
                prepare_image(
                    decoded.image,
                    min_pixels=settings.min_pixels,
                    max_pixels=settings.max_pixels,
                    source_size=(decoded.width, decoded.height),
                )
            )
        results = model.generate(prepared, settings.prompt, max_new_tokens=settings.max_new_tokens)
        tokens += sum(r.output_tokens for r in results)
    seconds = time.perf_counter() - started
    return {"plain_loop_rows_s": len(paths) / seconds, "plain_loop_output_tokens_s": tokens / seconds}


def bench_ray(manifest: Path, model_dir: Path, output: Path, overrides: list[str], rows: int) -> dict:
    """Whole-run rate, and the marginal rate: (rows - rows/2) / (time(rows) - time(rows/2)).

    The marginal rate cancels the fixed costs (Ray start, actor start, model load) that a long job pays
    once, without relying on when shards happen to be flushed.
    """
    from workflows.caption import run_caption

    seconds = {}
    for n in (rows // 2, rows):
        started = time.perf_counter()
        summary = run_caption(
            str(manifest), str(output / str(n)), str(model_dir), overrides=overrides, limit=n, quiet=True
        )
        seconds[n] = time.perf_counter() - started
        assert summary["rows_committed"] == n
    return {
        "ray_rows_s_whole_run": rows / seconds[rows],
        "ray_rows_s_marginal": (rows - rows // 2) / (seconds[rows] - seconds[rows // 2]),
        "ray_whole_run_s": seconds[rows],
        "ray_fixed_cost_s": seconds[rows]
        - rows / ((rows - rows // 2) / (seconds[rows] - seconds[rows // 2])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=192)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--width", type=int, default=1792)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--max-pixels", type=int, default=448 * 448)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from ovis_batch.config import CaptionConfig, load_config
    from ovis_batch.model.tiny import make_tiny_model

    overrides = [
        f"max_new_tokens={args.new_tokens}",
        f"max_pixels={args.max_pixels}",
        "min_pixels=4096",
        "decode_workers=1",
        "batch_rows=8",
        "rows_per_shard=8",
    ]
    settings = load_config(CaptionConfig, None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = make_manifest(root / "data", args.rows, args.width, args.height)
        model_dir = make_tiny_model(root / "model")
        results = {
            "rows": args.rows,
            "image": f"{args.width}x{args.height} JPEG",
            "max_pixels": args.max_pixels,
        }
        results |= bench_decode(manifest, settings)
        results |= bench_plain_loop(manifest, model_dir, settings)
        results |= bench_ray(manifest, model_dir, root / "out", overrides, args.rows)
        results["ray_marginal_vs_plain_loop"] = results["ray_rows_s_marginal"] / results["plain_loop_rows_s"]
        results["ray_whole_run_vs_plain_loop"] = (
            results["ray_rows_s_whole_run"] / results["plain_loop_rows_s"]
        )
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
