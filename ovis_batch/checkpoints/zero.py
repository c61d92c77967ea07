"""DeepSpeed ZeRO checkpoint folders (`global_stepN/`): safe reading, checks, and weight consolidation.

What lives here: locating the ZeRO folder through `latest`, reading its files with
`torch.load(weights_only=True)`, checking that the partitions on disk match the world size the files
claim, and rebuilding whole tensors, either the 16-bit weights that ZeRO-1/2 keep whole in
`mp_rank_00_model_states.pt` or the fp32 master weights spread over the ranks' optimizer partitions
(the job of the `zero_to_fp32.py` script that DeepSpeed copies into each checkpoint; that script is
never executed, and DeepSpeed itself is not needed).

The file format, as DeepSpeed writes it (stage <= 2 / stage 3):
- `*_model_states.pt` (one, `mp_rank_00_...`, / one per rank, `zero_pp_rank_R_mp_rank_00_...`):
  `module` (the whole 16-bit state dict / empty placeholders), `param_shapes` (one ordered
  name -> shape dict per optimizer parameter group, in flattening order), `shared_params`
  (tied name -> source name), `buffer_names`, `frozen_param_shapes` and `frozen_param_fragments`
  (parameters without gradients: whole / this rank's slice; ZeRO-1 records neither, its frozen
  parameters are only in `module`), `dp_world_size`, `ds_config`.
- `*_zero_pp_rank_R_mp_rank_00_optim_states.pt`, one per rank, `optimizer_state_dict` with
  `zero_stage`, `partition_count` (the world size the partitions were cut for) and the fp32 master
  weights: `single_partition_of_fp32_groups` (per group, rank R's equal slice of the group's flat,
  padded vector, so concatenating the ranks gives the group; parameters follow each other in
  `param_shapes` order, each followed by its `param_alignment_paddings` entry) /
  `fp32_flat_groups` (per group; every parameter is cut into `world_size` slices of
  ceil(numel / world_size), zero-padded, and rank R stores its slice of each parameter in order).

What does not live here: deciding which weights a checkpoint folder should be loaded from and writing
inference checkpoints (`layout.py`, `consolidate.py`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ovis_batch.model.checkpoint import CheckpointError

ZERO_FOLDER = re.compile(r"^global_step\d+$")
_OPTIM_FILE = re.compile(r"^(?:(bf16|fp16|fp32)_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_ZERO3_MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


# DeepSpeed pickles a few of its own small objects into its files. `weights_only=True` refuses any
# class it does not know, so exactly these are mapped, by their full name, onto inert stand-ins that
# only hold the pickled attributes. No other class can be unpickled, and nothing is imported or run.
class _LossScalerState:
    """Stand-in for `deepspeed.runtime.fp16.loss_scaler.LossScaler` / `DynamicLossScaler` (attributes only)."""


class _ZeroStage(int):
    """Stand-in for `deepspeed.runtime.zero.config.ZeroStageEnum` (an IntEnum pickled by value)."""


class _FragmentAddress:
    """Stand-in for `deepspeed.utils.tensor_fragment.fragment_address` (numel, start)."""


DEEPSPEED_PICKLED_TYPES: dict[str, type] = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": _LossScalerState,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": _LossScalerState,
    "deepspeed.runtime.zero.config.ZeroStageEnum": _ZeroStage,
    "deepspeed.utils.tensor_fragment.fragment_address": _FragmentAddress,
}


def load_deepspeed_file(path: Path) -> dict[str, Any]:
    """A DeepSpeed `.pt` file, unpickled with `weights_only=True`, memory-mapped, on CPU."""
    allowed = [(stand_in, name) for name, stand_in in DEEPSPEED_PICKLED_TYPES.items()]
    try:
        with torch.serialization.safe_globals(allowed):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing") from exc
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError (bad zip), EOFError, ...
        raise CheckpointError(
            f"{path} could not be read safely ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}). "
            "ovis-batch never unpickles arbitrary objects; if the file is truncated, copy it again; if it "
            "holds a class other than DeepSpeed's loss scaler, ZeRO stage and fragment address, it is not "
            "a DeepSpeed checkpoint file ovis-batch can read"
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a DeepSpeed checkpoint dict")
    return data


@dataclass
class ZeroCheckpoint:
    """One ZeRO tag folder (`global_stepN/`) with its files sorted by rank, checked for completeness."""

    folder: Path
    stage: int
    world_size: int
    model_state_files: list[Path]
    optim_files: list[Path]
    ds_config: dict = field(default_factory=dict)
    ds_version: str | None = None
    frozen_parameters: int = 0  # parameters trained without gradients: no fp32 master, only 16-bit weights

    @property
    def tag(self) -> str:
        return self.folder.name

    @property
    def training_dtype(self) -> torch.dtype:
        """The 16-bit (or 32-bit) precision the model's forward pass used in training."""
        if (self.ds_config.get("bf16") or {}).get("enabled"):
            return torch.bfloat16
        if (self.ds_config.get("fp16") or {}).get("enabled"):
            return torch.float16
        return torch.float32

    @property
    def has_fp32_masters(self) -> bool:
        """Whether the optimizer partitions, which hold the fp32 master weights, are in this copy."""
        return bool(self.optim_files)

    @property
    def has_whole_16bit_weights(self) -> bool:
        """ZeRO-1/2 keep the whole module in `mp_rank_00_model_states.pt`; ZeRO-3 keeps only partitions."""
        return self.stage <= 2


def find_zero_folder(checkpoint: Path) -> Path | None:
    """The ZeRO tag folder a checkpoint's `latest` file names (or its single `global_step*` folder)."""
    latest = checkpoint / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        folder = checkpoint / tag
        if not tag or "/" in tag or not folder.is_dir():
            raise CheckpointError(
                f"{latest} names the ZeRO folder {tag!r}, which is not in {checkpoint}; the checkpoint copy "
                "is incomplete (copy that folder too) or `latest` is stale (write the right tag into it)"
            )
        return folder
    folders = sorted(p for p in checkpoint.iterdir() if p.is_dir() and ZERO_FOLDER.match(p.name))
    if len(folders) > 1:
        raise CheckpointError(
            f"{checkpoint} holds several ZeRO folders ({', '.join(p.name for p in folders)}) and no `latest` "
            "file saying which one is current; write that folder's name into "
            f"{latest}"
        )
    return folders[0] if folders else None


def _ranked(folder: Path, pattern: re.Pattern, rank_group: int, what: str) -> list[Path]:
    ranked: dict[int, Path] = {}
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if not match:
            continue
        if int(match.group(rank_group + 1)) != 0:
            raise CheckpointError(
                f"{path}: model-parallel rank {int(match.group(rank_group + 1))}; checkpoints of tensor- or "
                "pipeline-parallel training are not supported (only data-parallel ZeRO)"
            )
        ranked[int(match.group(rank_group))] = path
    missing = sorted(set(range(max(ranked, default=-1) + 1)) - set(ranked))
    if missing:
        raise CheckpointError(f"{folder} lacks the {what} of rank(s) {missing}; copy the whole folder again")
    return [ranked[r] for r in sorted(ranked)]


def read_zero_checkpoint(folder: Path) -> ZeroCheckpoint:
    """Find the stage and files of a ZeRO folder and check that they agree with each other.

    Reads only the model-state files (small for ZeRO-3, memory-mapped for ZeRO-1/2); the optimizer
    files are opened only when their master weights are needed.
    """
    optim_files = _ranked(folder, _OPTIM_FILE, 2, "optimizer partition (*_optim_states.pt)")
    zero3_models = _ranked(folder, _ZERO3_MODEL_FILE, 1, "model states (zero_pp_rank_*_model_states.pt)")
    whole_model = sorted(p for p in folder.iterdir() if _MODEL_FILE.match(p.name))
    if zero3_models:
        model_files = zero3_models
    elif whole_model:
        model_files = whole_model[:1]
    else:
        raise CheckpointError(
            f"{folder} has no DeepSpeed model states (mp_rank_00_model_states.pt or "
            "zero_pp_rank_*_mp_rank_00_model_states.pt); it is not a complete ZeRO checkpoint folder"
        )
    first = load_deepspeed_file(model_files[0])
    ds_config = first.get("ds_config") or {}
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 3 if zero3_models else 2))
    if (stage == 3) != bool(zero3_models):
        raise CheckpointError(
            f"{model_files[0]}: ds_config says ZeRO stage {stage} but the folder holds the files of "
            f"{'stage 3' if zero3_models else 'stage 1/2'}"
        )
    claimed = first.get("dp_world_size")
    if claimed is None:
        claimed = len(optim_files)
    if stage == 3 and len(model_files) != claimed:
        raise CheckpointError(
            f"{model_files[0]} says the model was trained on {claimed} data-parallel ranks, but {folder} "
            f"holds model states of {len(model_files)} rank(s); the ZeRO files come from different runs or "
            "some are missing"
        )
    if len(optim_files) not in (0, claimed):
        raise CheckpointError(
            f"{model_files[0]} says the model was trained on {claimed} data-parallel ranks, but {folder} "
            f"holds optimizer partitions of {len(optim_files)} rank(s) "
            f"({', '.join(p.name for p in optim_files)}); the ZeRO files come from different runs or some "
            "are missing"
        )
    return ZeroCheckpoint(
        folder=folder,
        stage=stage,
        world_size=int(claimed),
        model_state_files=model_files,
        optim_files=optim_files,
        ds_config=ds_config,
        ds_version=first.get("ds_version"),
        frozen_parameters=len(
            _unmastered_module_weights(first, model_files[0])
            if stage <= 2
            else first.get("frozen_param_shapes") or {}
        ),
    )


def zero_parameter_shapes(zero: ZeroCheckpoint) -> dict[str, torch.Size]:
    """Every tensor's full shape (trainable in flattening order, then frozen), without shared aliases."""
    states = load_deepspeed_file(zero.model_state_files[0])
    shapes: dict[str, torch.Size] = {}
    for group in _param_shape_groups(states, zero.model_state_files[0]):
        shapes.update(group)
    shapes.update(states.get("frozen_param_shapes") or {})
    if zero.stage <= 2:
        unmastered = _unmastered_module_weights(states, zero.model_state_files[0])
        shapes.update({name: tensor.shape for name, tensor in unmastered.items()})
    return {name: torch.Size(shape) for name, shape in shapes.items()}


def shared_parameters(zero: ZeroCheckpoint) -> dict[str, str]:
    """Tied tensors: name -> the name whose storage it shares (e.g. the LM head -> the input embeddings)."""
    return dict(load_deepspeed_file(zero.model_state_files[0]).get("shared_params") or {})


def zero_16bit_weights(zero: ZeroCheckpoint) -> dict[str, torch.Tensor]:
    """The whole 16-bit state dict that ZeRO-1/2 save in `mp_rank_00_model_states.pt` (shared names kept)."""
    if not zero.has_whole_16bit_weights:
        raise CheckpointError(
            f"{zero.folder}: ZeRO-3 model states hold no whole weights; consolidate the optimizer partitions"
        )
    path = zero.model_state_files[0]
    module = load_deepspeed_file(path).get("module")
    if not isinstance(module, dict) or not module:
        raise CheckpointError(f"{path} holds no module weights (`module` is empty)")
    return dict(module)


def zero_fp32_weights(zero: ZeroCheckpoint) -> dict[str, torch.Tensor]:
    """Whole fp32 master weights rebuilt from every rank's optimizer partition (as zero_to_fp32 does).

    Trainable parameters come from the partitions; frozen ones (no optimizer state) from the model
    states, in the precision they were trained in (ZeRO-1 lists them nowhere but in its whole module,
    and DeepSpeed's own reader leaves them out; here they are kept); persistent buffers from rank 0's
    module; tied names point at the same tensor as their source.
    """
    if not zero.optim_files:
        raise CheckpointError(f"{zero.folder} holds no optimizer partitions (*_optim_states.pt)")
    model_states = [load_deepspeed_file(p) for p in zero.model_state_files]
    optimizers = [_zero_optimizer_state(zero, p) for p in zero.optim_files]
    key = "fp32_flat_groups" if zero.stage == 3 else "single_partition_of_fp32_groups"
    partitions = [
        _master_partitions(optimizer, key, path)
        for optimizer, path in zip(optimizers, zero.optim_files, strict=True)
    ]
    shape_groups = _param_shape_groups(model_states[0], zero.model_state_files[0])
    if len(partitions[0]) != len(shape_groups):
        raise CheckpointError(
            f"{zero.optim_files[0]} has {len(partitions[0])} parameter groups but "
            f"{zero.model_state_files[0]} describes {len(shape_groups)}; the files come from different runs"
        )
    state: dict[str, torch.Tensor] = {}
    buffer_names = set(model_states[0].get("buffer_names") or [])
    module = model_states[0].get("module") or {}
    state.update({name: t for name, t in module.items() if name in buffer_names})
    if zero.stage <= 2:
        paddings = optimizers[0].get("param_alignment_paddings")
        state.update(_merge_stage12(zero, shape_groups, partitions, paddings))
        state.update(model_states[0].get("frozen_param_fragments") or {})
        for name, tensor in _unmastered_module_weights(model_states[0], zero.model_state_files[0]).items():
            state.setdefault(name, tensor)
    else:
        state.update(_merge_stage3(zero, shape_groups, partitions))
        state.update(_merge_stage3_frozen(zero, model_states))
    for alias, source in (model_states[0].get("shared_params") or {}).items():
        if source in state:
            state[alias] = state[source]
    return state


# ------------------------------------------------------------------------------------------- internals


def _param_shape_groups(states: dict, path: Path) -> list[dict[str, Any]]:
    groups = states.get("param_shapes")
    if isinstance(groups, dict):  # very old DeepSpeed: one group
        groups = [groups]
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"{path} has no `param_shapes`; it is not a DeepSpeed model-states file")
    return groups


def _unmastered_module_weights(states: dict, path: Path) -> dict[str, torch.Tensor]:
    """ZeRO-1/2: the whole module's parameters that no optimizer group holds (trained frozen), 16-bit.

    ZeRO-2 also lists them in `frozen_param_shapes`; ZeRO-1 does not, so the module is the only record.
    """
    trainable = {name for group in _param_shape_groups(states, path) for name in group}
    skip = trainable | set(states.get("buffer_names") or []) | set(states.get("shared_params") or {})
    return {name: t for name, t in (states.get("module") or {}).items() if name not in skip}


def _zero_optimizer_state(zero: ZeroCheckpoint, path: Path) -> dict[str, Any]:
    """One rank's `optimizer_state_dict`, checked against the folder (stage, world size)."""
    optimizer = load_deepspeed_file(path).get("optimizer_state_dict")
    if not isinstance(optimizer, dict) or "zero_stage" not in optimizer:
        raise CheckpointError(
            f"{path} is not a ZeRO optimizer partition (no optimizer_state_dict.zero_stage)"
        )
    if int(optimizer["zero_stage"]) != zero.stage:
        raise CheckpointError(
            f"{path} was written by ZeRO stage {int(optimizer['zero_stage'])}, the model states by stage "
            f"{zero.stage}; the files come from different runs"
        )
    counts = optimizer.get("partition_count")
    claimed = max(counts) if isinstance(counts, list) else counts
    if claimed != len(zero.optim_files):
        raise CheckpointError(
            f"{path} was partitioned for {claimed} data-parallel ranks, but {zero.folder} holds "
            f"{len(zero.optim_files)} optimizer partition file(s); the files come from different runs or "
            "some are missing"
        )
    optimizer.pop("optimizer_state_dict", None)  # Adam moments: not needed, let them go
    optimizer.pop("base_optimizer_state", None)
    return optimizer


def _master_partitions(optimizer: dict[str, Any], key: str, path: Path) -> list[torch.Tensor]:
    """This rank's fp32 flat partitions, one per parameter group."""
    groups = optimizer.get(key)
    if not isinstance(groups, list) or not all(isinstance(g, torch.Tensor) for g in groups):
        raise CheckpointError(f"{path} has no `{key}` fp32 master weights")
    return [g.detach() for g in groups]


def _numel(shape: Any) -> int:
    return math.prod(shape)


def _merge_stage12(
    zero: ZeroCheckpoint,
    shape_groups: list[dict[str, Any]],
    partitions: list[list[torch.Tensor]],
    paddings: list[list[int]] | None,
) -> dict[str, torch.Tensor]:
    """ZeRO-1/2: each group's flat vector is the ranks' equal slices end to end."""
    state: dict[str, torch.Tensor] = {}
    for g, shapes in enumerate(shape_groups):
        flat = torch.cat([rank_groups[g] for rank_groups in partitions])
        group_paddings = paddings[g] if paddings is not None else [0] * len(shapes)
        if len(group_paddings) != len(shapes):
            raise CheckpointError(
                f"{zero.optim_files[0]}: {len(group_paddings)} alignment paddings for the "
                f"{len(shapes)} parameters of group {g}; the files come from different runs"
            )
        offset = 0
        for (name, shape), padding in zip(shapes.items(), group_paddings, strict=True):
            n = _numel(shape)
            if offset + n > flat.numel():
                raise _short(zero, g, offset + n, flat.numel())
            state[name] = flat.narrow(0, offset, n).view(tuple(shape))
            offset += n + padding
        # DeepSpeed pads each group's flat vector to a multiple of 2 * world_size (and the sum of the
        # slices is that padded length), so what is left over must be less than one alignment unit.
        align = 2 * zero.world_size
        if math.ceil(offset / align) * align != math.ceil(flat.numel() / align) * align:
            raise _short(zero, g, offset, flat.numel())
    return state


class _RankSlices:
    """One rank's parameter slices, read in order across its (possibly several) flat groups."""

    def __init__(self, groups: list[torch.Tensor]) -> None:
        self.groups = groups
        self.group, self.offset = 0, 0

    @property
    def remaining(self) -> int:
        return sum(g.numel() for g in self.groups[self.group :]) - self.offset

    def take(self, n: int) -> torch.Tensor:
        pieces = []
        while n:
            if self.group >= len(self.groups):
                raise ValueError("ran out of partition elements")
            here = min(n, self.groups[self.group].numel() - self.offset)
            pieces.append(self.groups[self.group].narrow(0, self.offset, here))
            self.offset += here
            n -= here
            if self.offset == self.groups[self.group].numel():
                self.group, self.offset = self.group + 1, 0
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _merge_stage3(
    zero: ZeroCheckpoint, shape_groups: list[dict[str, Any]], partitions: list[list[torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """ZeRO-3: each parameter is the ranks' ceil(numel / world) slices end to end, minus the padding."""
    ranks = [_RankSlices(groups) for groups in partitions]
    state: dict[str, torch.Tensor] = {}
    for shapes in shape_groups:
        for name, shape in shapes.items():
            n = _numel(shape)
            per_rank = math.ceil(n / zero.world_size)
            try:
                pieces = [rank.take(per_rank) for rank in ranks]
            except ValueError:
                raise _short(zero, None, per_rank, ranks[0].remaining) from None
            state[name] = torch.cat(pieces).narrow(0, 0, n).view(tuple(shape))
    left = ranks[0].remaining
    if left:
        raise CheckpointError(
            f"{zero.optim_files[0]} holds {left} master-weight elements beyond the parameters that "
            f"{zero.model_state_files[0]} describes; the files come from different runs"
        )
    return state


def _merge_stage3_frozen(zero: ZeroCheckpoint, model_states: list[dict]) -> dict[str, torch.Tensor]:
    shapes = model_states[0].get("frozen_param_shapes") or {}
    state = {}
    for name, shape in shapes.items():
        fragments = [(s.get("frozen_param_fragments") or {}).get(name) for s in model_states]
        if any(f is None for f in fragments):
            raise CheckpointError(f"{zero.folder}: a rank's model states lack the frozen parameter {name}")
        state[name] = (
            torch.cat([f.reshape(-1) for f in fragments]).narrow(0, 0, _numel(shape)).view(tuple(shape))
        )
    return state


def _short(zero: ZeroCheckpoint, group: int | None, needed: int, available: int) -> CheckpointError:
    where = f" (parameter group {group})" if group is not None else ""
    return CheckpointError(
        f"{zero.folder}: the optimizer partitions{where} hold {available} master-weight elements where the "
        f"parameter shapes in {zero.model_state_files[0].name} need {needed}; the partitions do not match "
        f"the world size ({zero.world_size}) or the model the files claim"
    )
