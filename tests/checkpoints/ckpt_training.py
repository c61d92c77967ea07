"""Real training checkpoints of the tiny model: a few Hugging Face Trainer steps on CPU, optionally DeepSpeed.

    python tests/checkpoints/ckpt_training.py --base TINY_DIR --out RUN_DIR --refs REFS_DIR \
        --steps 2 --save-steps 2 --deepspeed-stage 3 --freeze-vision

The batch is four photo/caption pairs (scikit-image's bundled photos), tokenised with the runtime's own
prompt builder; labels are -100 on every prompt position, so the loss is the caption's. After each save,
the weights the model holds at that moment (gathered from the ZeRO-3 partitions when sharded) are written
to `REFS_DIR/step-N.safetensors`: the oracle that loading the checkpoint must reproduce.

`--world-size 2 --deepspeed-stage N` instead runs a bare DeepSpeed engine on two local processes (gloo) and
writes one ZeRO checkpoint (`RUN_DIR/global_step2/`) with partitions from two ranks.

DeepSpeed runs go through this script in a child process: DeepSpeed and accelerate keep process-wide
state (the process group, the accelerator singleton) that must not leak into the test process.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

CAPTIONS = {
    "astronaut": "a woman in a space suit",
    "chelsea": "a cat looking up",
    "coffee": "a cup of coffee",
    "rocket": "a rocket on the pad",
}
# Small inputs keep a step fast: each photo becomes at most 128x128 pixels (16 visual tokens).
MAX_PIXELS = 128 * 128


def caption_examples(model) -> list[dict]:
    """One training example per photo: prompt ids + caption ids, labels masked on the prompt."""
    from skimage import data

    examples = []
    for name, caption in CAPTIONS.items():
        prepared = model.prepare([getattr(data, name)()], min_pixels=32 * 32, max_pixels=MAX_PIXELS)[0]
        prompt = model.prompts.build("Describe the image.", prepared.visual_tokens, thinking=False)
        answer = [*model.prompts.encode(caption), model.special.im_end]
        pixel_values, grid_thws = model._pack([prepared])
        examples.append(
            {
                "input_ids": prompt + answer,
                "labels": [-100] * len(prompt) + answer,
                "pixel_values": pixel_values,
                "grid_thws": grid_thws,
            }
        )
    return examples


class CaptionCollator:
    """Right-pads ids (pad token) and labels (-100); concatenates the packed images in batch order."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in batch)

        def padded(key: str, fill: int) -> torch.Tensor:
            return torch.tensor([e[key] + [fill] * (width - len(e[key])) for e in batch])

        return {
            "input_ids": padded("input_ids", self.pad_id),
            "labels": padded("labels", -100),
            "attention_mask": torch.tensor(
                [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in batch]
            ),
            "pixel_values": torch.cat([e["pixel_values"] for e in batch]),
            "grid_thws": torch.tensor([g for e in batch for g in e["grid_thws"]]),
        }


def _reference_callback(refs: Path, zero3: bool):
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    class SaveReference(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            params = list(model.parameters())
            if zero3:
                import deepspeed

                gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            else:
                gather = nullcontext()
            with gather:
                weights = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
            refs.mkdir(parents=True, exist_ok=True)
            save_file(weights, str(refs / f"step-{state.global_step}.safetensors"))

    return SaveReference()


def deepspeed_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True, "weight_decay": 0.0}},
    }


def _single_process_deepspeed(port: int) -> None:
    """One-rank DeepSpeed over gloo; no shared-memory allreduce kernel (a ~100 s C++ build, useless here)."""
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import importlib

    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed("gloo")


def train(
    base: Path,
    out: Path,
    refs: Path,
    *,
    steps: int = 3,
    save_steps: int = 1,
    deepspeed_stage: int | None = None,
    freeze_vision: bool = False,
    port: int = 29611,
) -> None:
    """Train the tiny model at `base` for `steps` steps (batch 2), saving `checkpoint-N` every `save_steps`."""
    from transformers import Trainer, TrainingArguments

    import ovis_batch

    torch.manual_seed(0)
    model = ovis_batch.load_model(base, device="cpu")
    module = model.module.train()
    for name, param in module.named_parameters():
        param.requires_grad_(not (freeze_vision and name.startswith("visual_tokenizer.vit.")))
    extra = {}
    if deepspeed_stage is not None:
        _single_process_deepspeed(port)
        extra = {"deepspeed": deepspeed_config(deepspeed_stage), "bf16": True}
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        save_steps=save_steps,
        logging_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        **extra,
    )
    trainer = Trainer(
        model=module,
        args=args,
        train_dataset=caption_examples(model),
        data_collator=CaptionCollator(model.special.pad),
        processing_class=model.tokenizer,
        callbacks=[_reference_callback(refs, zero3=deepspeed_stage == 3)],
    )
    trainer.train()


def _data_parallel_worker(
    rank: int, world_size: int, base: Path, out: Path, refs: Path, stage: int, port: int
):
    import importlib

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    import deepspeed
    from safetensors.torch import save_file

    import ovis_batch

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed("gloo")
    model = ovis_batch.load_model(base, device="cpu")
    module = model.module.train()
    for name, param in module.named_parameters():
        param.requires_grad_(not name.startswith("visual_tokenizer.vit."))
    config = deepspeed_config(stage) | {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    config["optimizer"]["params"]["lr"] = 1e-3
    del config["train_batch_size"]
    engine, *_ = deepspeed.initialize(
        model=module, config=config, model_parameters=[p for p in module.parameters() if p.requires_grad]
    )
    collate = CaptionCollator(model.special.pad)
    examples = caption_examples(model)
    for step in range(2):  # each rank its own example
        batch = collate([examples[(2 * step + rank) % len(examples)]])
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        engine.backward(engine(**batch).loss)
        engine.step()
    engine.save_checkpoint(str(out), tag="global_step2")
    gather = deepspeed.zero.GatheredParameters(list(module.parameters())) if stage == 3 else nullcontext()
    with gather:
        weights = {n: p.detach().clone().contiguous() for n, p in module.named_parameters()}
    if rank == 0:
        refs.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(refs / "step-2.safetensors"))


def train_data_parallel(
    base: Path, out: Path, refs: Path, *, stage: int, world_size: int = 2, port: int
) -> None:
    """A bare DeepSpeed engine on `world_size` local processes (gloo), 2 steps, one ZeRO checkpoint.

    The checkpoint gets the base model's config and tokenizer files, as a training script would copy.
    """
    import shutil

    import torch.multiprocessing as mp

    mp.spawn(_data_parallel_worker, args=(world_size, base, out, refs, stage, port), nprocs=world_size)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.json"):
        shutil.copy(base / name, out / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--refs", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save-steps", type=int, default=1)
    parser.add_argument("--deepspeed-stage", type=int, choices=(1, 2, 3))
    parser.add_argument("--freeze-vision", action="store_true")
    parser.add_argument("--port", type=int, default=29611)
    parser.add_argument(
        "--world-size", type=int, default=1, help="> 1: a bare DeepSpeed engine on local processes"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    if args.world_size > 1:
        train_data_parallel(
            args.base,
            args.out,
            args.refs,
            stage=args.deepspeed_stage,
            world_size=args.world_size,
            port=args.port,
        )
        return 0
    train(
        args.base,
        args.out,
        args.refs,
        steps=args.steps,
        save_steps=args.save_steps,
        deepspeed_stage=args.deepspeed_stage,
        freeze_vision=args.freeze_vision,
        port=args.port,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
