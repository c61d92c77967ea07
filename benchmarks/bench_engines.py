"""Caption throughput of the two generation engines side by side, with upstream's loop as the floor,
and how often the engines agree token for token.

    python benchmarks/bench_engines.py          # on a GPU with vLLM (.[vllm]): 2B and 9B, 256/1024 tokens, thinking off/on
    python benchmarks/bench_engines.py --sizes 2b --new-tokens 256 --thinking off --images 32
    .venv-vllm/bin/python benchmarks/bench_engines.py --device cpu --sizes small --image-size 448x448 \\
        --images 64 --batch 16 --engines hf,vllm --new-tokens 256 --thinking off,on   # CPU: vLLM's CPU build

Random weights (speed does not depend on training), nothing downloaded, the tokenizer of
`make-tiny-model --official-vocab` (Qwen3's ids, which vLLM's Ovis2.5 needs). On a GPU: the real 2B and
9B shapes (OVIS_FACTS.md) and 1792x1024 photos (1792 visual tokens each), vLLM building its own random
weights (`load_format=dummy`). On CPU: a `small` model (hidden 256, 4 layers, head size 64, a 4-layer
128-wide vision tower) whose random weights are written to disk, so that both engines run the very same
model; vLLM runs eagerly (no torch.compile) with a KV cache of `--vllm-kv-cache-gib`. Engines, over the
same prepared images and prompt, one run each:
- `floor`: one image at a time through the project's runtime (what upstream's own generate loop does);
- `hf`: the caption job's `engine: hf`, static batches of `--batch` rows (transformers' generate);
- `vllm`: the caption job's `engine: vllm` (`VllmOvisModel`: one request per row, all in flight, the
  two-phase thinking budget per request).
Thinking on means `thinking_budget = new_tokens / 2`: random weights never close `</think>`, so every
row goes through both phases. Reported: images/s and output tokens/s (tokens actually generated; a
random model rarely stops early). The rows' output lengths are printed so that runs are comparable, and on
CPU (the same weights in both engines) how many of vLLM's rows have exactly hf's tokens.

Agreement (`--agreement`, on by default with vllm): the tiny checkpoint vLLM runs
(`make-tiny-model --official-vocab --head-dim 32 --seed 2`), float32, greedy: the share of rows whose
tokens are identical between `hf` and `vllm`, and the first divergence (row, position, the two tokens).
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


def run_vllm(runner: asyncio.Runner, model, prepared, settings) -> tuple[float, list]:
    started = time.perf_counter()
    results = runner.run(model.agenerate(prepared, PROMPT, **settings))
    return time.perf_counter() - started, results


def model_folder(size: str, folder: Path, tokenizer_dir: Path, weights=None) -> Path:
    """config.json of a size plus the tokenizer files (what vLLM needs for `load_format=dummy`), and the
    weights of `weights` (an Ovis2.5 module) when given, so that vLLM runs that very model."""
    import shutil

    from ovis_batch.model.tiny import write_sharded_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    config = size_config(size, QWEN3_VOCAB).to_dict()
    config["architectures"] = ["Ovis2_5"]
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    for f in tokenizer_dir.iterdir():
        if f.suffix in (".json", ".txt") and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, folder / f.name)
    if weights is not None:
        state = {k: v.detach().float().cpu().contiguous() for k, v in weights.state_dict().items()}
        if config["llm_config"]["tie_word_embeddings"]:
            state.pop("llm.lm_head.weight", None)  # tied, as in the released 2B
        write_sharded_safetensors(state, folder)
    return folder


def vllm_model(folder: Path, args, max_new_tokens: int, *, dummy: bool):
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
    cpu = args.device == "cpu"
    engine = VllmEngine(
        folder,
        dtype=args.dtype,
        max_model_len=default_max_model_len(1792 * 1792, max_new_tokens),
        gpu_memory_utilization=None if cpu else 0.85,
        kv_cache_bytes=int(args.vllm_kv_cache_gib * 2**30) if cpu else None,
        max_num_seqs=256,
        stop_token_ids=[tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")],
        enforce_eager=cpu,  # CPU: no torch.compile (minutes of compiling for a few minutes of decoding)
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
        dtype=args.dtype,
        image_token_id=image_token_id,
        min_pixels=448 * 448,
        max_pixels=1792 * 1792,
        device=args.device,
    )


def throughput_rows(size: str, args, tokenizer_dir: Path, workdir: Path) -> list[dict]:
    device, dtype = args.device, args.dtype
    images = [photo(*args.image_size)] * args.images
    rows = []
    engines = args.engines.split(",")
    cases = [(n, t == "on") for n in args.new_tokens for t in args.thinking.split(",")]
    same_weights = device == "cpu"  # small enough to write: vLLM then runs the very same model
    weights = None
    hf_tokens: dict[tuple[int, bool], list] = {}  # (new tokens, thinking) -> hf's rows' token ids
    if "floor" in engines or "hf" in engines or same_weights:
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
                hf_tokens[new_tokens, thinking] = [r.token_ids for r in results]
        weights = model.module if same_weights else None
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    if "vllm" in engines:
        folder = model_folder(size, workdir / f"model-{size}", tokenizer_dir, weights)
        del weights
        model = vllm_model(folder, args, max(args.new_tokens), dummy=not same_weights)
        prepared = model.prepare(images)
        with asyncio.Runner() as runner:  # the engine serves the loop of its first request
            runner.run(model.agenerate(prepared[:1], PROMPT, max_new_tokens=2))  # warm-up
            for new_tokens, thinking in cases:
                seconds, results = run_vllm(runner, model, prepared, settings_for(new_tokens, thinking))
                row = record(size, "vllm", new_tokens, thinking, seconds, results)
                if same_weights and (new_tokens, thinking) in hf_tokens:  # the same model: the same tokens?
                    pairs = zip(hf_tokens[new_tokens, thinking], results, strict=True)
                    same = sum(a == r.token_ids for a, r in pairs)
                    row["same_tokens_as_hf"] = f"{same}/{len(results)}"
                rows.append(row)
            model.close()
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

    folder = make_tiny_model(workdir / "agree", official_vocab=True, head_dim=32, seed=2)
    hf = ovis_batch.load_model(folder, device=args.device, dtype="float32")
    photos = [photo(w, h) for w, h in [(1792, 1024), (1024, 1024), (640, 448), (448, 1344)]] * 4
    prepared = hf.prepare(photos)
    prompts = [f"{PROMPT} ({i})" for i in range(len(prepared))]
    ours = hf.generate(prepared, prompts, max_new_tokens=args.agreement_tokens)
    vllm = vllm_model(folder, argparse.Namespace(**{**vars(args), "dtype": "float32"}), 64, dummy=False)
    with asyncio.Runner() as runner:
        theirs = runner.run(vllm.agenerate(prepared, prompts, max_new_tokens=args.agreement_tokens))
        vllm.close()
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
    parser.add_argument("--image-size", default="1792x1024", help="WxH of the photo every row shows")
    parser.add_argument("--floor-images", type=int, default=2, help="rows for the one-at-a-time floor")
    parser.add_argument("--batch", type=int, default=16, help="hf's static batch")
    parser.add_argument("--new-tokens", default="256,1024")
    parser.add_argument("--thinking", default="off,on")
    parser.add_argument("--vllm-kv-cache-gib", type=float, default=2.0, help="vLLM's KV cache on CPU")
    parser.add_argument("--agreement", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--agreement-tokens", type=int, default=48)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.new_tokens = [int(n) for n in args.new_tokens.split(",")]
    args.image_size = tuple(int(v) for v in args.image_size.lower().split("x"))
    from ovis_batch.model.tiny import make_tiny_model
    from ovis_batch.model.vllm_engine import vllm_device

    if "vllm" in args.engines and vllm_device() != args.device:
        build = vllm_device() or "not installed"
        print(f"vllm: the installed build is {build}, not for {args.device}: its rows are skipped")
        args.engines = ",".join(e for e in args.engines.split(",") if e != "vllm")
    print(
        f"device={args.device} dtype={args.dtype} torch={torch.__version__} "
        f"images={args.image_size[0]}x{args.image_size[1]}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tokenizer_dir = make_tiny_model(workdir / "tok", official_vocab=True)
        keys = ["size", "engine", "new_tokens", "thinking", "images", "images_s", "output_tokens_s"]
        keys += ["tokens_per_row", "same_tokens_as_hf"]
        print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys), flush=True)
        for size in args.sizes.split(","):
            for row in throughput_rows(size.strip(), args, tokenizer_dir, workdir):
                row.setdefault("same_tokens_as_hf", "")
                cells = [f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
                print("| " + " | ".join(cells) + " |", flush=True)
        if args.agreement == "on" or (args.agreement == "auto" and "vllm" in args.engines):
            print(json.dumps({"agreement_fp32_greedy": agreement(args, workdir)}))


if __name__ == "__main__":
    main()
