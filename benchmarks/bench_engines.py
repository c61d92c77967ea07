"""Caption throughput of the two generation engines side by side, with upstream's loop as the floor,
and how often the engines agree token for token.

    python benchmarks/bench_engines.py          # on a GPU with vLLM (.[vllm]): 2B and 9B, 256/1024 tokens, thinking off/on
    python benchmarks/bench_engines.py --sizes 2b --new-tokens 256 --thinking off --images 32
    python benchmarks/bench_engines.py --sizes tiny --device cpu --images 4 --batch 4 \\
        --new-tokens 96 --thinking off,on                   # CPU dry run: floor and hf (vLLM is GPU-only)

Random weights of the real 2B and 9B shapes (OVIS_FACTS.md; speed does not depend on training), 1792x1024
photos (1792 visual tokens each), the tokenizer of `make-tiny-model --official-vocab` (Qwen3's ids, which
vLLM's Ovis2.5 needs). Three engines over the same prepared images and prompt, one run each:
- `floor`: one image at a time through the project's runtime (what upstream's own generate loop does);
- `hf`: the caption job's `engine: hf`, static batches of `--batch` rows (transformers' generate);
- `vllm`: the caption job's `engine: vllm` (`VllmOvisModel`: one request per row, all in flight, the
  two-phase thinking budget per request), vLLM building random weights itself (`load_format=dummy`).
Thinking on means `thinking_budget = new_tokens / 2`: random weights never close `</think>`, so every
row goes through both phases. Reported: images/s and output tokens/s (tokens actually generated; a
random model rarely stops early). The rows' output lengths are printed so that runs are comparable.

Agreement (`--agreement`, on by default with vllm): a tiny official-vocabulary checkpoint written to disk,
float32, greedy: the share of rows whose tokens are identical between `hf` and `vllm`, and the first
divergence (row, position, the two tokens) when not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpu_model import SIZES, photo, random_model, size_config

PROMPT = "Describe this image in detail."
QWEN3_VOCAB = 151936  # every size, tiny too: the tokenizer has Qwen3's ids


def settings_for(new_tokens: int, thinking: bool) -> dict:
    return {
        "max_new_tokens": new_tokens,
        "thinking": thinking,
        "thinking_budget": new_tokens // 2 if thinking else None,
    }


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_floor(model, prepared, settings, device) -> tuple[float, list]:
    started = time.perf_counter()
    results = [model.generate([p], PROMPT, **settings)[0] for p in prepared]
    synchronize(device)
    return time.perf_counter() - started, results


def run_hf(model, prepared, settings, device, batch: int) -> tuple[float, list]:
    started = time.perf_counter()
    results = []
    for i in range(0, len(prepared), batch):
        results += model.generate(prepared[i : i + batch], PROMPT, **settings)
    synchronize(device)
    return time.perf_counter() - started, results


def run_vllm(model, prepared, settings) -> tuple[float, list]:
    started = time.perf_counter()
    results = asyncio.run(model.agenerate(prepared, PROMPT, **settings))
    return time.perf_counter() - started, results


def config_folder(size: str, folder: Path, tokenizer_dir: Path) -> Path:
    """config.json of a real size plus the tokenizer files: what vLLM needs for `load_format=dummy`."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    config = size_config(size, QWEN3_VOCAB).to_dict()
    config["architectures"] = ["Ovis2_5"]
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    for f in tokenizer_dir.iterdir():
        if f.suffix in (".json", ".txt") and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, folder / f.name)
    return folder


def vllm_model(folder: Path, dtype: str, max_new_tokens: int, *, dummy: bool):
    from ovis_batch.model.checkpoint import chat_template
    from ovis_batch.model.runtime import load_tokenizer
    from ovis_batch.model.vllm_engine import (
        VllmEngine,
        VllmOvisModel,
        check_vllm_vocabulary,
        default_max_model_len,
    )

    tokenizer = load_tokenizer(folder)
    image_token_id = check_vllm_vocabulary(tokenizer, folder)
    engine = VllmEngine(
        folder,
        dtype=dtype,
        max_model_len=default_max_model_len(1792 * 1792, max_new_tokens),
        gpu_memory_utilization=0.85,
        max_num_seqs=256,
        stop_token_ids=[tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")],
        load_format="dummy" if dummy else "auto",
    )
    config = json.loads((folder / "config.json").read_text())
    return VllmOvisModel(
        engine,
        tokenizer,
        chat_template(folder),
        name=folder.name,
        weights_sha256="random",
        hidden_size=config["llm_config"]["hidden_size"],
        dtype=dtype,
        image_token_id=image_token_id,
        min_pixels=448 * 448,
        max_pixels=1792 * 1792,
    )


def throughput_rows(size: str, args, tokenizer_dir: Path, workdir: Path) -> list[dict]:
    device, dtype = args.device, args.dtype
    images = [photo()] * args.images
    rows = []
    engines = args.engines.split(",")
    cases = [(n, t == "on") for n in args.new_tokens for t in args.thinking.split(",")]
    if "floor" in engines or "hf" in engines:
        model = random_model(size, device, getattr(torch, dtype), tokenizer_dir, QWEN3_VOCAB)
        prepared = model.prepare(images)
        model.generate(prepared[:1], PROMPT, max_new_tokens=2)  # warm-up
        for new_tokens, thinking in cases:
            settings = settings_for(new_tokens, thinking)
            if "floor" in engines:
                seconds, results = run_floor(model, prepared[: args.floor_images], settings, device)
                rows.append(record(size, "floor", new_tokens, thinking, seconds, results))
            if "hf" in engines:
                seconds, results = run_hf(model, prepared, settings, device, args.batch)
                rows.append(record(size, f"hf (batch {args.batch})", new_tokens, thinking, seconds, results))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    if "vllm" in engines:
        folder = config_folder(size, workdir / f"config-{size}", tokenizer_dir)
        model = vllm_model(folder, dtype, max(args.new_tokens), dummy=True)
        prepared = model.prepare(images)
        asyncio.run(model.agenerate(prepared[:1], PROMPT, max_new_tokens=2))  # warm-up
        for new_tokens, thinking in cases:
            seconds, results = run_vllm(model, prepared, settings_for(new_tokens, thinking))
            rows.append(record(size, "vllm", new_tokens, thinking, seconds, results))
        model.engine.shutdown()
    return rows


def record(size, engine, new_tokens, thinking, seconds, results) -> dict:
    failed = [r for r in results if isinstance(r, Exception) or not r.ok]
    if failed:
        raise RuntimeError(f"{engine}: {len(failed)} rows failed, e.g. {failed[0]}")
    tokens = [r.output_tokens for r in results]
    return {
        "size": size,
        "engine": engine,
        "new_tokens": new_tokens,
        "thinking": "on" if thinking else "off",
        "images": len(results),
        "images_s": len(results) / seconds,
        "output_tokens_s": sum(tokens) / seconds,
        "tokens_per_row": f"{min(tokens)}-{max(tokens)}",
    }


def agreement(args, workdir: Path) -> dict:
    """hf vs vllm, greedy float32, the same tiny weights from disk: rows identical, first divergence."""
    import ovis_batch
    from ovis_batch.model.tiny import make_tiny_model

    folder = make_tiny_model(workdir / "agree", official_vocab=True)
    hf = ovis_batch.load_model(folder, device=args.device, dtype="float32")
    photos = [photo(w, h) for w, h in [(1792, 1024), (1024, 1024), (640, 448), (448, 1344)]] * 4
    prepared = hf.prepare(photos)
    prompts = [f"{PROMPT} ({i})" for i in range(len(prepared))]
    ours = hf.generate(prepared, prompts, max_new_tokens=args.agreement_tokens)
    vllm = vllm_model(folder, "float32", args.agreement_tokens, dummy=False)
    theirs = asyncio.run(vllm.agenerate(prepared, prompts, max_new_tokens=args.agreement_tokens))
    vllm.engine.shutdown()
    same, first = 0, None
    for row, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a.token_ids == b.token_ids:
            same += 1
        elif first is None:
            k = next(
                (i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y),
                min(len(a.token_ids), len(b.token_ids)),
            )
            first = {"row": row, "position": k, "hf": a.token_ids[k : k + 3], "vllm": b.token_ids[k : k + 3]}
    return {"rows": len(ours), "identical": same, "share": same / len(ours), "first_divergence": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2b,9b", help=f"of {', '.join(SIZES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--engines", default="floor,hf,vllm")
    parser.add_argument("--images", type=int, default=64, help="rows for hf and vllm")
    parser.add_argument("--floor-images", type=int, default=2, help="rows for the one-at-a-time floor")
    parser.add_argument("--batch", type=int, default=16, help="hf's static batch")
    parser.add_argument("--new-tokens", default="256,1024")
    parser.add_argument("--thinking", default="off,on")
    parser.add_argument("--agreement", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--agreement-tokens", type=int, default=48)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.new_tokens = [int(n) for n in args.new_tokens.split(",")]
    from ovis_batch.model.tiny import make_tiny_model
    from ovis_batch.model.vllm_engine import vllm_available

    if "vllm" in args.engines and not vllm_available():
        print("vllm: not installed here, its rows are skipped (pip install -e '.[vllm]' on a GPU machine)")
        args.engines = ",".join(e for e in args.engines.split(",") if e != "vllm")
    print(f"device={args.device} dtype={args.dtype} torch={torch.__version__} images=1792x1024")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tokenizer_dir = make_tiny_model(workdir / "tok", official_vocab=True)
        keys = ["size", "engine", "new_tokens", "thinking", "images", "images_s", "output_tokens_s"]
        keys.append("tokens_per_row")
        print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys), flush=True)
        for size in args.sizes.split(","):
            for row in throughput_rows(size.strip(), args, tokenizer_dir, workdir):
                cells = [f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
                print("| " + " | ".join(cells) + " |", flush=True)
        if args.agreement == "on" or (args.agreement == "auto" and "vllm" in args.engines):
            print(json.dumps({"agreement_fp32_greedy": agreement(args, workdir)}))


if __name__ == "__main__":
    main()
