"""What a checkpoint directory holds: a released model, a Hugging Face Trainer `checkpoint-N`, DeepSpeed ZeRO.

`describe_checkpoint(path)` sorts the files of a directory into what inference can use (config,
tokenizer, weights) and what only resuming training needs (optimizer, scheduler, RNG state, ZeRO
optimizer partitions), decides where the weights come from, and reads `trainer_state.json`.

Where the weights come from, in order of preference:
1. top-level safetensors (released models, Trainer checkpoints, DeepSpeed runs that gathered 16-bit
   weights on save), used as they are when they cover every parameter the ZeRO files list;
2. ZeRO-1/2: the whole 16-bit module in `global_stepN/mp_rank_00_model_states.pt`;
3. ZeRO-3 without gathered weights: the fp32 master partitions, consolidated (see `zero.py`).

Which precision those weights end in, and whether the fp32 master weights of the ZeRO optimizer
partitions are read instead, depends on the precision asked for: `weights_precision` decides it, for
`consolidate_checkpoint` and for the report of `checkpoint inspect` alike.

What does not live here: reading tensors out of ZeRO files (`zero.py`) and writing inference
checkpoints (`consolidate.py`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ovis_batch.checkpoints.zero import (
    ZeroCheckpoint,
    find_zero_folder,
    read_zero_checkpoint,
    zero_parameter_shapes,
)
from ovis_batch.model.checkpoint import CheckpointError, check_safetensors, read_config, weight_files
from ovis_batch.storage import local_path

TRAINER_STATE = "trainer_state.json"
CHECKPOINT_FOLDER = re.compile(r"^checkpoint-(\d+)$")
# Files that only resuming training reads (never needed, never copied, for inference).
RESUME_ONLY_PATTERNS = (
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "training_args.bin",
    TRAINER_STATE,
    "latest",
    "zero_to_fp32.py",
    "zero_to_torch.py",
)
# Files an inference checkpoint carries besides its weights.
INFERENCE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "README.md",
)

WEIGHTS_SAFETENSORS = "safetensors"
WEIGHTS_ZERO_16BIT = "zero-16bit"
WEIGHTS_ZERO_PARTITIONS = "zero-partitions"
# Not a place the default load reads from, but what a consolidation may read: the optimizer partitions.
WEIGHTS_ZERO_FP32_MASTER = "zero-fp32-master"

# The precisions a consolidation can be asked for, by their command-line names.
PRECISIONS: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


@dataclass(frozen=True)
class TrainerState:
    """What `trainer_state.json` says about the run at this checkpoint."""

    path: Path
    global_step: int
    epoch: float | None
    max_steps: int | None
    last_loss: float | None  # the last logged training loss
    last_loss_step: int | None
    last_learning_rate: float | None
    losses: tuple[tuple[int, float], ...] = ()  # (step, training loss) for every logged step

    def summary(self) -> str:
        parts = [f"global step {self.global_step}"]
        if self.max_steps:
            parts[0] += f" of {self.max_steps}"
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch:g}")
        if self.last_loss is not None:
            parts.append(f"last loss {self.last_loss:.4g} (step {self.last_loss_step})")
        if self.last_learning_rate is not None:
            parts.append(f"learning rate {self.last_learning_rate:.3g}")
        return ", ".join(parts)


def read_trainer_state(path: Path) -> TrainerState:
    """Parse a `trainer_state.json` (the file itself, or a checkpoint folder that holds one)."""
    if path.is_dir():
        path = path / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc}); the checkpoint was not saved completely"
        ) from exc
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise CheckpointError(f"{path} has no integer `global_step`; it is not a Hugging Face Trainer state")
    history = state.get("log_history") or []
    if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
        raise CheckpointError(f"{path}: `log_history` is not a list of records")
    losses = tuple(
        (int(e.get("step", 0)), float(e["loss"]))
        for e in history
        if isinstance(e.get("loss"), int | float) and math.isfinite(e["loss"])
    )
    rates = [e["learning_rate"] for e in history if isinstance(e.get("learning_rate"), int | float)]
    epoch = state.get("epoch")
    return TrainerState(
        path=path,
        global_step=state["global_step"],
        epoch=float(epoch) if isinstance(epoch, int | float) else None,
        max_steps=state.get("max_steps") if isinstance(state.get("max_steps"), int) else None,
        last_loss=losses[-1][1] if losses else None,
        last_loss_step=losses[-1][0] if losses else None,
        last_learning_rate=float(rates[-1]) if rates else None,
        losses=losses,
    )


@dataclass
class CheckpointLayout:
    """The parts of a checkpoint directory, and where its inference weights come from."""

    path: Path
    config: dict
    safetensors: list[Path]  # top-level weight files (checked: index complete, not truncated)
    zero: ZeroCheckpoint | None = None
    trainer_state: TrainerState | None = None
    weights_source: str = WEIGHTS_SAFETENSORS
    parameter_count: int | None = None
    inference_files: list[Path] = field(default_factory=list)
    resume_only_files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stored_dtypes: list[str] = field(default_factory=list)  # of the top-level safetensors, e.g. ["bfloat16"]

    @property
    def is_trainer(self) -> bool:
        return (self.path / TRAINER_STATE).is_file() or (self.path / "training_args.bin").is_file()

    @property
    def kind(self) -> str:
        if self.zero is not None:
            prefix = "Trainer checkpoint, " if self.is_trainer else ""
            return f"{prefix}DeepSpeed ZeRO-{self.zero.stage}"
        return "Trainer checkpoint" if self.is_trainer else "released model"


def local_folder(path: str | os.PathLike, what: str) -> Path:
    """A checkpoint or training-run folder: on a local disk or a shared mount; a URI is refused by name."""
    return Path(local_path(path, what, "checkpoint folders are read from a local disk"))


def describe_checkpoint(path: str | os.PathLike, *, read_state: bool = True) -> CheckpointLayout:
    """Sort a checkpoint directory's parts and decide where its weights come from (errors name the file).

    `read_state=False` skips `trainer_state.json`, which inference does not need (a damaged one then
    does not stop a load).
    """
    path = local_folder(path, "checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass a checkpoint folder")
    if not (path / "config.json").is_file():
        runs = training_run_checkpoints(path)
        if runs:
            raise CheckpointError(
                f"{path} is a training run, not a checkpoint: pass one of its checkpoints "
                f"({', '.join(p.name for _, p in runs)})"
            )
    config = read_config(path)
    zero_folder = find_zero_folder(path)
    zero = read_zero_checkpoint(zero_folder) if zero_folder else None
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    safetensors = weight_files(path) if has_safetensors or zero is None else []
    layout = CheckpointLayout(path=path, config=config, safetensors=safetensors, zero=zero)
    top_names, layout.stored_dtypes = _safetensors_shapes(safetensors)
    if _ties_embeddings(config):
        top_names.pop("llm.lm_head.weight", None)
    if zero is not None:
        zero_shapes = zero_parameter_shapes(zero)
        layout.parameter_count = sum(math.prod(s) for s in zero_shapes.values())
        missing = sorted(set(zero_shapes) - set(top_names))
        if top_names and not missing:
            layout.weights_source = WEIGHTS_SAFETENSORS
        else:
            if top_names:
                layout.notes.append(
                    f"the top-level safetensors lack {len(missing)} of the {len(zero_shapes)} parameters the "
                    f"ZeRO files list (e.g. {missing[0]}); the ZeRO files are used instead"
                )
            layout.weights_source = (
                WEIGHTS_ZERO_16BIT if zero.has_whole_16bit_weights else WEIGHTS_ZERO_PARTITIONS
            )
    else:
        layout.parameter_count = sum(math.prod(s) for s in top_names.values())
    if read_state and (path / TRAINER_STATE).is_file():
        layout.trainer_state = read_trainer_state(path / TRAINER_STATE)
    layout.inference_files = sorted(p for pattern in INFERENCE_PATTERNS for p in path.glob(pattern))
    resume = {p for pattern in RESUME_ONLY_PATTERNS for p in path.glob(pattern)}
    if zero is not None and layout.weights_source == WEIGHTS_SAFETENSORS:
        resume.update([*zero.model_state_files, *zero.optim_files])
    elif zero is not None and layout.weights_source == WEIGHTS_ZERO_16BIT:
        resume.update(zero.optim_files)
    layout.resume_only_files = sorted(resume)
    absent = [n for n in ("preprocessor_config.json", "generation_config.json") if not (path / n).is_file()]
    if absent:
        layout.notes.append(f"no {' or '.join(absent)}: ovis-batch uses its own defaults for them")
    return layout


@dataclass(frozen=True)
class WeightsPrecision:
    """Which weights a load or a consolidation reads, and the precision it gives them."""

    source: str  # WEIGHTS_SAFETENSORS, WEIGHTS_ZERO_16BIT or WEIGHTS_ZERO_FP32_MASTER
    dtype: torch.dtype | None  # what every floating-point tensor is cast to; None: each as read
    description: str  # for people: which file, which weights, what rounding

    @property
    def dtype_name(self) -> str | None:
        return _dtype_name(self.dtype) if self.dtype is not None else None


def weights_precision(
    layout: CheckpointLayout, dtype: torch.dtype | None = None, *, from_optimizer: bool = False
) -> WeightsPrecision:
    """Where the weights of `layout` come from when `dtype` is asked for (None: the model-source default).

    A DeepSpeed run in bf16 or fp16 keeps two copies of each trained weight: the fp32 master weights
    in the optimizer partitions, which the optimizer updates, and the 16-bit module weights the model
    computes with, which are those masters rounded once after every step. So:
    - the precision the model trained in, or none asked (what `load_model` reads): the 16-bit module
      weights; ZeRO-3 keeps no whole ones, so the masters are rounded to it, which gives the same bits;
    - any other precision, fp32 above all: the masters, rounded at most once. Casting the 16-bit copy
      instead would hand out bf16-rounded values (about 3 significant digits) as if they were fp32;
    - a checkpoint without ZeRO files, or a ZeRO run in fp32 (one copy): the stored weights, cast.
    `from_optimizer` takes the masters whatever the precision. Errors name the missing files.
    """
    zero = layout.zero
    if from_optimizer:
        if zero is None or not zero.has_fp32_masters:
            raise CheckpointError(
                f"{layout.path} holds no DeepSpeed ZeRO optimizer partitions, so there are no fp32 master "
                "weights to take; drop --from-optimizer"
            )
        return _from_masters(zero, dtype)
    trained = zero.training_dtype if zero is not None else None
    if zero is not None and trained != torch.float32 and dtype not in (None, trained):
        if not zero.has_fp32_masters:
            short = {v: k for k, v in PRECISIONS.items()}[trained]
            raise CheckpointError(
                f"{zero.folder} holds no optimizer partitions (*_optim_states.pt), which is where this "
                f"{_dtype_name(trained)} run keeps its fp32 master weights; {_dtype_name(dtype)} weights would "
                f"only be its {_dtype_name(trained)} weights recast. Copy those files from the training run's "
                f"{zero.tag}/ folder, or ask for --dtype {short} (the weights the model ran with)"
            )
        return _from_masters(zero, dtype)
    if layout.weights_source == WEIGHTS_ZERO_PARTITIONS:
        return _from_masters(zero, dtype or trained)
    if layout.weights_source == WEIGHTS_ZERO_16BIT:
        what = f"the whole module weights in {zero.tag}/{zero.model_state_files[0].name}"
        if trained != torch.float32:
            what += " (the 16-bit weights the model ran with)"
        return _stored(WEIGHTS_ZERO_16BIT, what, trained, dtype)
    stored = getattr(torch, layout.stored_dtypes[0]) if len(layout.stored_dtypes) == 1 else None
    return _stored(WEIGHTS_SAFETENSORS, "the top-level safetensors", stored, dtype)


def _stored(
    source: str, what: str, stored: torch.dtype | None, dtype: torch.dtype | None
) -> WeightsPrecision:
    """Weights read as a checkpoint holds them, cast to `dtype` when that differs."""
    if dtype is None or dtype == stored:
        held = _dtype_name(stored) if stored is not None else "as stored"
        return WeightsPrecision(source, stored, f"{held}, {what}")  # casting to `stored` copies nothing
    held = _dtype_name(stored) if stored is not None else "mixed precisions"
    return WeightsPrecision(source, dtype, f"{_dtype_name(dtype)}, {what} ({held}) cast")


def _from_masters(zero: ZeroCheckpoint, dtype: torch.dtype | None) -> WeightsPrecision:
    """The fp32 master weights of the optimizer partitions, rounded once to `dtype` if it is narrower."""
    where = f"the fp32 master weights in {zero.tag}/*_optim_states.pt"
    trained = _dtype_name(zero.training_dtype)
    if dtype is None or dtype == torch.float32:
        text = f"float32, {where} (the values DeepSpeed's zero_to_fp32 gives)"
        if zero.frozen_parameters and zero.training_dtype != torch.float32:
            # Parameters trained frozen get no optimizer state: their 16-bit weights are all there is.
            kept = "upcast" if dtype is not None else "kept in it"
            text += f"; the {zero.frozen_parameters} frozen parameters have no master: their {trained} weights, {kept}"
    elif dtype == zero.training_dtype:
        text = f"{trained}, {where} rounded to it: the 16-bit weights the model ran with"
    else:
        text = f"{_dtype_name(dtype)}, {where} rounded to it"
    return WeightsPrecision(WEIGHTS_ZERO_FP32_MASTER, dtype, text)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def precision_choices(layout: CheckpointLayout) -> dict[str, WeightsPrecision | CheckpointError]:
    """What a load (`model_source`) and each `consolidate --dtype` would give, or why it cannot."""
    choices: dict[str, WeightsPrecision | CheckpointError] = {}
    for name, dtype in [("model_source", None), *PRECISIONS.items()]:
        try:
            choices[name] = weights_precision(layout, dtype)
        except CheckpointError as err:
            choices[name] = err
    return choices


def weight_bearing_files(layout: CheckpointLayout) -> list[Path]:
    """config.json and every file the inference weights are read from (for change detection)."""
    files = [layout.path / "config.json"]
    if layout.weights_source == WEIGHTS_SAFETENSORS:
        index = layout.path / "model.safetensors.index.json"
        files += [*([index] if index.is_file() else []), *layout.safetensors]
    else:
        files += layout.zero.model_state_files
        if layout.weights_source == WEIGHTS_ZERO_PARTITIONS:
            files += layout.zero.optim_files
    return files


def checkpoint_stamp(layout: CheckpointLayout) -> str:
    """sha256 over the weight-bearing files' names, sizes and modification times: changes when any is rewritten.

    Instant even for large checkpoints (no file is read), which is what deciding "already consolidated" or
    "already scored" needs; the weights' own fingerprint (`weights_fingerprint`) is taken from the files
    actually loaded.
    """
    import hashlib

    stamp = [str(layout.path.resolve()), layout.weights_source]
    for f in weight_bearing_files(layout):
        info = f.stat()
        stamp.append([str(f.relative_to(layout.path)), info.st_size, info.st_mtime_ns])
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()


def _ties_embeddings(config: dict) -> bool:
    llm = config.get("llm_config") or config.get("text_config") or {}
    return bool(llm.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))


def _safetensors_shapes(files: list[Path]) -> tuple[dict[str, list[int]], list[str]]:
    """Every tensor's shape, and the floating-point precisions stored, from the files' headers."""
    shapes: dict[str, list[int]] = {}
    dtypes: set[str] = set()
    for f in files:
        header = check_safetensors(f)
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        shapes.update({k: v["shape"] for k, v in tensors.items()})
        dtypes.update(
            _SAFETENSORS_DTYPES[v["dtype"]] for v in tensors.values() if v["dtype"] in _SAFETENSORS_DTYPES
        )
    return shapes, sorted(dtypes)


def training_run_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """The `checkpoint-N` folders of a Trainer output directory, as (N, folder) sorted by N."""
    run = local_folder(run, "training run")
    found = []
    for p in run.iterdir() if run.is_dir() else []:
        match = CHECKPOINT_FOLDER.match(p.name)
        if match and p.is_dir():
            found.append((int(match.group(1)), p))
    return sorted(found)


def _size(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )


def _human(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError


_WEIGHTS_HOW = {
    WEIGHTS_SAFETENSORS: "top-level safetensors, used as they are",
    WEIGHTS_ZERO_16BIT: "whole 16-bit module in the ZeRO model states, converted once on load (cached)",
    WEIGHTS_ZERO_PARTITIONS: "only ZeRO partitions hold them: consolidated once on load (cached)",
}


def layout_summary(layout: CheckpointLayout) -> dict:
    """What `checkpoint inspect` reports, as plain JSON-able values."""
    state = layout.trainer_state
    zero = layout.zero
    return {
        "path": str(layout.path),
        "kind": layout.kind,
        "model_type": layout.config.get("model_type"),
        "global_step": state.global_step if state else None,
        "epoch": state.epoch if state else None,
        "last_loss": state.last_loss if state else None,
        "last_learning_rate": state.last_learning_rate if state else None,
        "weights_source": layout.weights_source,
        "weight_files": [{"file": p.name, "bytes": _size(p)} for p in layout.safetensors],
        "weights_complete": True,  # describe_checkpoint raises when they are not
        "parameter_count": layout.parameter_count,
        "zero": None
        if zero is None
        else {
            "stage": zero.stage,
            "world_size": zero.world_size,
            "tag": zero.tag,
            "training_dtype": str(zero.training_dtype).removeprefix("torch."),
            "deepspeed_version": zero.ds_version,
        },
        "precision": {
            name: {"error": str(choice)}
            if isinstance(choice, CheckpointError)
            else {
                "dtype": choice.dtype_name,
                "weights_from": choice.source,
                "description": choice.description,
            }
            for name, choice in precision_choices(layout).items()
        },
        "inference_files": [p.name for p in layout.inference_files],
        "resume_only_files": [str(p.relative_to(layout.path)) for p in layout.resume_only_files],
        "notes": layout.notes,
    }


def format_layout(layout: CheckpointLayout) -> str:
    """The human-readable report of `checkpoint inspect`."""
    s = layout_summary(layout)
    rows = [("kind", s["kind"]), ("model", f"{s['model_type']} (config.json)")]
    if layout.zero is not None:
        z = s["zero"]
        rows.append(
            (
                "deepspeed",
                f"ZeRO-{z['stage']}, world size {z['world_size']}, folder {z['tag']}/, "
                f"trained in {z['training_dtype']}, DeepSpeed {z['deepspeed_version'] or '?'}",
            )
        )
    rows.append(
        ("training", layout.trainer_state.summary() if layout.trainer_state else "no trainer_state.json")
    )
    files = ", ".join(f"{w['file']} ({_human(w['bytes'])})" for w in s["weight_files"]) or "none at top level"
    rows.append(("weight files", f"{files}; complete" if s["weight_files"] else files))
    rows.append(("weights", _WEIGHTS_HOW[layout.weights_source]))
    if layout.weights_source == WEIGHTS_ZERO_PARTITIONS:
        rows.append(
            ("", f"from {layout.zero.tag}/*_optim_states.pt (fp32 masters; their Adam moments only resume)")
        )
    rows += _precision_rows(layout)
    if layout.parameter_count is not None:
        rows.append(("parameters", f"{layout.parameter_count:,}"))
    rows.append(("inference", ", ".join(s["inference_files"]) + " + the weights above"))
    resume = [f"{name} ({_human(_size(layout.path / name))})" for name in s["resume_only_files"]]
    rows.append(("resume only", ", ".join(resume) or "-"))
    if layout.zero is not None and set(layout.zero.optim_files) & set(layout.resume_only_files):
        rows.append(("", "(a load does not need the *_optim_states.pt; consolidate --dtype fp32 reads them)"))
    if any(p.name.startswith("zero_to_") for p in layout.resume_only_files):
        rows.append(("", "(the zero_to_*.py scripts are never executed by ovis-batch)"))
    rows += [("note", note) for note in layout.notes]
    width = max(len(k) for k, _ in rows)
    return "\n".join([str(layout.path), *(f"  {k:<{width}}  {v}" for k, v in rows)])


def _precision_rows(layout: CheckpointLayout) -> list[tuple[str, str]]:
    """One line per precision: what loading gives, and what each `consolidate --dtype` reads."""
    choices = precision_choices(layout)
    source = choices["model_source"]
    if layout.zero is None:  # one copy of the weights: every precision is a cast of it
        assert isinstance(source, WeightsPrecision)
        return [("precision", f"as a model source: {source.description}; consolidate --dtype casts it")]
    rows = []
    for name, choice in choices.items():
        label = "as a model source" if name == "model_source" else f"consolidate --dtype {name}"
        text = f"not available ({choice})" if isinstance(choice, CheckpointError) else choice.description
        rows.append(("precision" if not rows else "", f"{label}: {text}"))
    return rows
