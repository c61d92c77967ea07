"""Fine-tuning speed: optimizer steps/s (and peak GPU memory) of `ovis-batch finetune`'s Trainer.

    python benchmarks/bench_finetune.py                                   # CPU: the tiny model, 448x448 photos
    python benchmarks/bench_finetune.py --size 2b --device cuda           # GPU: real 2B size, 1792x1024, top:4 and vte
    python benchmarks/bench_finetune.py --size 2b --device cuda --freeze top:4 --batch 4 --gradient-checkpointing
    python benchmarks/bench_finetune.py --size tiny --random-weights --resolution 1792x1024 --batch 2 --steps 2  # GPU mode, dry

What runs is the product's own training step: the run's settings (`FinetuneConfig`, so the same
`TrainingArguments`: bf16 autocast on GPU, fp32 on CPU), `plan_trainable` + `apply_trainable`,
`FinetuneModel` with its losses and `LearnedTemperature`, `OvisTrainer`, and batches made by
`ExampleBuilder` + `PairCollator` from real photos scaled to `--resolution` (prepared once: image
decoding runs in DataLoader workers during a real run and is measured by bench_preprocess_cpu.py).
The tiny model is the project's factory checkpoint loaded with `load_model`; the 2B and 9B sizes are
random weights of the real shapes built on the device (`bench_gpu_model.random_model`, fp32 master
weights as the Trainer keeps them): the speed of a step does not depend on what the weights are. The
first `--warmup` steps are not timed; the median of the timed steps is reported (s/step, steps/s,
pairs/s); no checkpoint is written.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_gpu_model beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHOTOS = {
    "astronaut": "a woman in a space suit smiling",
    "chelsea": "a cat looking up",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on the launch pad",
}


class Examples(torch.utils.data.Dataset):
    """Training examples of photos prepared once, cycled to `count` items."""

    def __init__(self, examples: list[dict], count: int) -> None:
        self.examples, self.count = examples, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        return self.examples[index % len(self.examples)]


def examples_for(model, settings, width: int, height: int) -> list[dict]:
    from skimage import data

    from ovis_batch.model.preprocess import prepare_image
    from ovis_batch.train.job import example_builder

    build = example_builder(settings, model.tokenizer, model.prompts.chat_template)
    out = []
    for name, caption in PHOTOS.items():
        image = Image.fromarray(getattr(data, name)()).resize((width, height), Image.Resampling.BICUBIC)
        prepared = prepare_image(image, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)
        out.append(build.build(prepared.patches, prepared.grid_thw, caption))
    return out


def load(size: str, device: str, workdir: Path, random_weights: bool):
    """The tiny factory checkpoint (as a real run loads it) or random weights of a size built on `device`."""
    import ovis_batch

    tiny = workdir / "tiny"
    if not tiny.is_dir():
        ovis_batch.make_tiny_model(tiny)
    if not random_weights:
        return ovis_batch.load_model(tiny, device=device, dtype=torch.float32)
    from bench_gpu_model import random_model

    return random_model(size, device, torch.float32, tiny)


def measure(model, args, freeze: str, workdir: Path) -> dict:
    from transformers import TrainerCallback

    from ovis_batch.config import load_config
    from ovis_batch.train.data import PairCollator
    from ovis_batch.train.freeze import apply_trainable, plan_trainable
    from ovis_batch.train.model import FinetuneModel, LearnedTemperature
    from ovis_batch.train.settings import FinetuneConfig
    from ovis_batch.train.trainer import OvisTrainer, training_arguments

    width, height = (int(v) for v in args.resolution.split("x"))
    steps = args.warmup + args.steps
    settings = load_config(
        FinetuneConfig,
        None,
        [
            f"freeze={freeze}",
            f"loss={args.loss}",
            f"embedding={args.embedding}",
            f"batch_size={args.batch}",
            f"max_steps={steps}",
            f"save_steps={steps + 1}",
            f"logging_steps={steps + 1}",
            f"gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
            "dataloader_workers=0",
            f"max_pixels={max(width * height, 32 * 32)}",
            f"min_pixels={min(width * height, 448 * 448)}",
        ],
    )
    module = model.module.float().train()
    llm = module.config.llm_config
    plan = plan_trainable(
        module.named_parameters(),
        settings.freeze_spec,
        num_layers=llm.num_hidden_layers,
        tied_embeddings=bool(llm.tie_word_embeddings),
        loss=settings.loss,
        embedding=settings.embedding,
    )
    apply_trainable(module, plan)
    if settings.gradient_checkpointing:
        module.activation_checkpointing_enable({"use_reentrant": False})
    train_args = training_arguments(settings, workdir / f"run-{freeze}", device=args.device)
    generation, contrastive = settings.loss_weights()
    temperature = None
    if contrastive:
        betas = (train_args.adam_beta1, train_args.adam_beta2)
        temperature = LearnedTemperature(0.07, train_args.device, betas=betas, eps=train_args.adam_epsilon)
    wrapped = FinetuneModel(
        module,
        generation_weight=generation,
        contrastive_weight=contrastive,
        embedding=settings.embedding,
        temperature=temperature,
    )
    examples = examples_for(model, settings, width, height)
    times: list[float] = []
    warmup = args.warmup

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if args.device.type == "cuda":
                torch.cuda.synchronize()
            self.started = time.perf_counter()
            if state.global_step == warmup and args.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kwargs):
            if args.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.started)
            control.should_save = False  # nothing to measure in writing a checkpoint

    trainer = OvisTrainer(
        model=wrapped,
        args=train_args,
        train_dataset=Examples(examples, steps * args.batch),
        data_collator=PairCollator(model.special.pad),
        source_dir=workdir / "tiny",
        max_shard_size=settings.max_shard_size,
        temperature=temperature,
        callbacks=[StepClock()],
    )
    trainer.train()
    timed = sorted(times[args.warmup :])
    seconds = timed[len(timed) // 2]  # the median step: robust to other work on a shared machine
    row = {
        "size": args.size,
        "freeze": freeze,
        "trainable": f"{plan.trainable_count:,} ({100 * plan.share:.1f}%)",
        "loss": f"{args.loss}/{args.embedding}" if contrastive else args.loss,
        "resolution": args.resolution,
        "visual_tokens": sum(e["grid"][1] * e["grid"][2] // 4 for e in examples) // len(examples),
        "batch": args.batch,
        "s_per_step": seconds,
        "fastest_s": timed[0],
        "steps_s": 1 / seconds,
        "pairs_s": args.batch / seconds,
    }
    if args.device == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "2b", "9b"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--freeze", help="comma-separated specs (default: top:1,vte tiny; top:4,vte others)")
    parser.add_argument("--loss", choices=["generation", "contrastive", "both"], default="both")
    parser.add_argument("--embedding", choices=["last_token", "vte_mean"], default="last_token")
    parser.add_argument("--resolution", help="WIDTHxHEIGHT (default: 448x448 tiny, 1792x1024 otherwise)")
    parser.add_argument("--batch", type=int, help="pairs per step (default: 4 tiny, 8 otherwise)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--random-weights", action="store_true", help="tiny: random weights built on the device, as 2b/9b"
    )
    args = parser.parse_args()
    real = args.size != "tiny"
    args.freeze = args.freeze or ("top:4,vte" if real else "top:1,vte")
    args.resolution = args.resolution or ("1792x1024" if real else "448x448")
    args.batch = args.batch or (8 if real else 4)
    if args.device == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for freeze in args.freeze.split(","):
            # A fresh model per spec: nothing carries over from the previous one.
            model = load(args.size, args.device, Path(tmp), args.random_weights or real)
            rows.append(measure(model, args, freeze.strip(), Path(tmp)))
            model = None
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(
        f"device={args.device} torch={torch.__version__} steps={args.steps} (after {args.warmup} warm-up) "
        f"gradient_checkpointing={args.gradient_checkpointing}"
    )
    keys = list(dict.fromkeys(itertools.chain.from_iterable(rows)))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        cells = [f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
