"""Generate and embed throughput of Ovis2.5 at the real 2B and 9B sizes, random weights, at 1792x1024.

    python benchmarks/bench_gpu_model.py                      # on a GPU: 2B and 9B, bf16, flash-attn if installed
    python benchmarks/bench_gpu_model.py --sizes 2b --batch 8 --new-tokens 256
    python benchmarks/bench_gpu_model.py --sizes tiny --device cpu --batch 2 --new-tokens 8   # CPU dry run
    python benchmarks/bench_gpu_model.py --end-to-end         # also the caption job through Ray (GPU replicas)

The speed of a model does not depend on whether its weights were trained, so random weights of the real
shapes (OVIS_FACTS.md) measure what a released checkpoint would do; nothing is downloaded. Each size is
built directly on the device (meta init, then random normal weights in the run dtype), with the tiny
tokenizer (ids are ids) and a real photo scaled to 1792x1024 (1792 visual tokens per image). Reported:
images/s and output tokens/s for greedy generation (fixed `max_new_tokens`; a random model rarely stops
early, and the early stops are counted), prefill-only images/s (`next_token_logits`), embed images/s
(`last_token` and `vte_mean`), load-free peak GPU memory. With `--end-to-end` the caption job runs on a
local Ray over a manifest of such photos (decode on CPU actors, one GPU replica) and its `_run.json`
figures are printed beside the in-process ones.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

SIZES = {
    # name: (llm hidden, layers, heads, kv heads, head_dim, mlp, tied, vit layers, vit hidden, vit heads, vit mlp)
    "tiny": (48, 3, 4, 2, 16, 96, True, 3, 32, 2, 64),
    # Bigger than tiny, small enough for CPU engine comparisons: head size 64 (vLLM's CPU attention needs it)
    "small": (256, 4, 4, 2, 64, 768, True, 4, 128, 2, 512),
    "2b": (2048, 28, 16, 8, 128, 6144, True, 27, 1152, 16, 4304),
    "9b": (4096, 36, 32, 8, 128, 12288, False, 27, 1152, 16, 4304),
}


def size_config(size: str, vocab_size: int | None = None):
    """The Ovis2.5 config of a size (`vocab_size`: the language model's, default Qwen3's 151936, or 640
    for `tiny`)."""
    from ovis_batch.model.ovis2_5 import Ovis2_5Config

    hidden, layers, heads, kv, head_dim, mlp, tied, vlayers, vhidden, vheads, vmlp = SIZES[size]
    return Ovis2_5Config(
        llm_config={
            "model_type": "qwen3",
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": head_dim,
            "intermediate_size": mlp,
            "tie_word_embeddings": tied,
            "vocab_size": vocab_size or (640 if size == "tiny" else 151936),
            "rope_theta": 1000000,
            "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-6,
        },
        vit_config={
            "hidden_size": vhidden,
            "num_hidden_layers": vlayers,
            "num_attention_heads": vheads,
            "intermediate_size": vmlp,
            "image_size": 160 if size == "tiny" else 512,
        },
        visual_vocab_size=132 if size == "tiny" else 65536,
        hidden_size=hidden,
    )


def random_model(
    size: str, device: str, dtype: torch.dtype, tokenizer_dir: Path, vocab_size: int | None = None
):
    """An OvisModel with random weights of the given real size (`size_config`), built on the device."""
    from ovis_batch.model.checkpoint import chat_template
    from ovis_batch.model.ovis2_5 import Ovis2_5ForConditionalGeneration
    from ovis_batch.model.runtime import OvisModel, _materialize_buffers, load_tokenizer

    config = size_config(size, vocab_size)
    tied = config.llm_config.tie_word_embeddings
    config.llm_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        module = Ovis2_5ForConditionalGeneration(config)
    module.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name or name.endswith("head.1.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=generator)
    if tied:
        module.llm.lm_head.weight = module.llm.model.embed_tokens.weight
    module = module.to(dtype).eval()
    # to_empty left the rotary frequencies uninitialised; rebuilt after the cast, they stay float32
    _materialize_buffers(module, torch.device(device), computed=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    return OvisModel(
        module, tokenizer, chat_template(tokenizer_dir), name=f"random-{size}", weights_sha256="random"
    )


def photo(width: int = 1792, height: int = 1024) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.BICUBIC)


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def bench_size(size: str, args, tokenizer_dir: Path) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = random_model(size, device, dtype, tokenizer_dir)
    prepared = model.prepare([photo()] * args.batch)
    prompt = "Describe this image in detail."
    out = {"size": size, "batch": args.batch, "visual_tokens": prepared[0].visual_tokens}
    results = []

    def generate():
        results[:] = model.generate(prepared, prompt, max_new_tokens=args.new_tokens)

    seconds = timed(generate, device, args.repeats)
    tokens = sum(r.output_tokens for r in results)
    out.update(generate_images_s=args.batch / seconds, output_tokens_s=tokens / seconds)
    out["prefill_images_s"] = args.batch / timed(
        lambda: model.next_token_logits(prepared, prompt), device, args.repeats
    )
    for strategy in ("last_token", "vte_mean"):
        seconds = timed(lambda s=strategy: model.embed_images(prepared, strategy=s), device, args.repeats)
        out[f"embed_{strategy}_images_s"] = args.batch / seconds
    if device == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    model = None  # free the weights before the next size
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def write_random_checkpoint(size: str, folder: Path, tokenizer_dir: Path, device: str) -> Path:
    """A random-weight checkpoint of a real size in the official layout (tokenizer from the tiny model)."""
    import shutil

    from ovis_batch.model.tiny import write_sharded_safetensors

    model = random_model(size, device, torch.bfloat16 if device == "cuda" else torch.float32, tokenizer_dir)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in model.module.state_dict().items()}
    if model.module.llm.config.tie_word_embeddings:
        state.pop("llm.lm_head.weight", None)
    write_sharded_safetensors(state, folder, shards=4)
    config = model.module.config.to_dict()
    config["_comment"] = "RANDOM WEIGHTS (benchmark model): outputs are meaningless"
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "generation_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def bench_end_to_end(args, size: str, workdir: Path, tokenizer_dir: Path) -> dict:
    """The caption job through Ray (CPU decode actors, one model replica) on a manifest of 1792x1024 JPEGs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workflows.caption import run_caption

    images = workdir / "images"
    images.mkdir(parents=True, exist_ok=True)
    image = photo()
    rows = []
    for i in range(args.e2e_rows):
        image.save(images / f"{i}.jpg", quality=90)
        rows.append({"image_id": f"r{i}", "image": f"images/{i}.jpg"})
    pq.write_table(pa.Table.from_pylist(rows), workdir / "manifest.parquet")
    model_dir = write_random_checkpoint(size, workdir / "model", tokenizer_dir, args.device)
    gpus = 1 if args.device == "cuda" else 0
    summary = run_caption(
        str(workdir / "manifest.parquet"),
        str(workdir / "out"),
        str(model_dir),
        overrides=[
            f"max_new_tokens={args.new_tokens}",
            f"gpus_per_replica={gpus}",
            f"batch_rows={args.batch}",
            "batch_visual_tokens=100000",
            f"decode_workers={4 if gpus else 1}",
            "embedding=last_token",
        ],
        overwrite=True,
        quiet=True,
    )
    return {"size": size, **summary["this_run"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2b,9b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--end-to-end", action="store_true")
    parser.add_argument("--e2e-rows", type=int, default=32)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    from ovis_batch.model.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = make_tiny_model(Path(tmp) / "tok")
        rows = [bench_size(size.strip(), args, tokenizer_dir) for size in args.sizes.split(",")]
        print(
            f"device={args.device} dtype={args.dtype} batch={args.batch} new_tokens={args.new_tokens} "
            f"torch={torch.__version__}"
        )
        keys = [
            "size",
            "visual_tokens",
            "generate_images_s",
            "output_tokens_s",
            "prefill_images_s",
            "embed_last_token_images_s",
            "embed_vte_mean_images_s",
            "peak_memory_gib",
        ]
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for row in rows:
            print(
                "| "
                + " | ".join(
                    f"{row.get(k, float('nan')):.2f}"
                    if isinstance(row.get(k), float)
                    else str(row.get(k, "-"))
                    for k in keys
                )
                + " |"
            )
        if args.end_to_end:
            for size in args.sizes.split(","):
                result = bench_end_to_end(
                    args, size.strip(), Path(tmp) / f"e2e-{size.strip()}", tokenizer_dir
                )
                print(json.dumps({"end_to_end": result}, indent=2))


if __name__ == "__main__":
    main()
