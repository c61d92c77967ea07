"""Training checkpoints as model sources: clean inference checkpoints, and the folder `load_model` reads.

    ovis-batch checkpoint consolidate runs/ft/checkpoint-1200 models/ft-1200 --dtype bf16

`consolidate_checkpoint` writes what a released model holds (sharded safetensors + index, config,
tokenizer, chat template, preprocessor and generation files) and nothing a resumed training needs, in
the official layout or, with `--layout native`, in transformers' native Ovis2.5 layout (same tensors;
see `ovis_batch/model/layouts.py`).
`resolve_model_dir` is the hook of `load_model`: a folder whose top-level safetensors are complete
is returned as it is; otherwise (weights only inside ZeRO files) the checkpoint is consolidated once
into a cache folder, keyed by the ZeRO files' names, sizes and modification times, and that folder is
returned, so that every later load (every actor of a batch job) reads plain safetensors.

Precision (decided by `layout.weights_precision`): by default, and for `load_model`, the weights the
model ran with: a checkpoint's own weights as stored, and for ZeRO-3 partitions the fp32 masters
rounded to the precision the model trained in (bf16/fp16 from the DeepSpeed config), which gives
exactly its 16-bit weights. Asking a ZeRO checkpoint of a 16-bit run for another precision (fp32
above all) reads the fp32 master weights of the optimizer partitions, the values DeepSpeed's own
`zero_to_fp32` gives, never the 16-bit copy cast back up. `from_optimizer=True` takes the masters
whatever the precision.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ovis_batch.checkpoints.layout import (
    PRECISIONS,
    WEIGHTS_SAFETENSORS,
    WEIGHTS_ZERO_16BIT,
    WEIGHTS_ZERO_FP32_MASTER,
    CheckpointLayout,
    WeightsPrecision,
    checkpoint_stamp,
    describe_checkpoint,
    local_folder,
    weights_precision,
)
from ovis_batch.checkpoints.zero import zero_16bit_weights, zero_fp32_weights
from ovis_batch.model.checkpoint import CheckpointError, iter_tensors
from ovis_batch.model.layouts import (
    LAYOUTS,
    NATIVE_LAYOUT,
    OFFICIAL_LAYOUT,
    official_config,
    official_tensors,
    write_native_inference_files,
)
from ovis_batch.model.preprocess import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from ovis_batch.storage import local_path

DTYPES = PRECISIONS
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
CACHE_ENV = "OVIS_BATCH_CACHE_DIR"
_CACHE_FORMAT = 1  # bump when the cache folder's contents change meaning


def checkpoint_weights(
    layout: CheckpointLayout, *, dtype: str | None = None, from_optimizer: bool = False
) -> dict[str, torch.Tensor]:
    """The checkpoint's whole weights in `dtype` ("bf16", "fp16", "fp32"; None: the model-source default).

    Where they come from is `weights_precision`'s decision (see the module docstring).
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    precision = weights_precision(layout, DTYPES.get(dtype), from_optimizer=from_optimizer)
    return read_weights(layout, precision)


def read_weights(layout: CheckpointLayout, precision: WeightsPrecision) -> dict[str, torch.Tensor]:
    """Read the weights `precision` names and cast them once, straight from the file read, to its dtype."""
    if precision.source == WEIGHTS_ZERO_FP32_MASTER:
        state = zero_fp32_weights(layout.zero)
    elif precision.source == WEIGHTS_ZERO_16BIT:
        state = zero_16bit_weights(layout.zero)
    elif precision.source == WEIGHTS_SAFETENSORS:
        state = dict(iter_tensors(layout.safetensors))
    else:
        raise AssertionError(f"unknown weights source {precision.source!r}")
    if precision.dtype is None:
        return state
    cast: dict[int, torch.Tensor] = {}  # one cast per distinct tensor, so tied names stay one tensor
    for name, tensor in state.items():
        if id(tensor) not in cast:
            cast[id(tensor)] = tensor.to(precision.dtype) if tensor.is_floating_point() else tensor
        state[name] = cast[id(tensor)]
    return state


def consolidate_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    dtype: str | None = None,
    from_optimizer: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    output_layout: str = OFFICIAL_LAYOUT,
) -> Path:
    """Write a clean inference checkpoint of `source` to `destination` (atomically) and return it.

    `dtype` is "bf16", "fp16", "fp32" or None (keep the precision described in the module docstring).
    `output_layout` is "official" (AIDC-AI's release layout) or "native" (transformers' `ovis2_5`, for
    tools that expect converted checkpoints; Ovis2.5 only): the same tensors either way, see
    `ovis_batch/model/layouts.py`. An Ovis2.5 source may be in either layout.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if output_layout not in LAYOUTS:
        raise ValueError(f"output_layout must be one of {', '.join(LAYOUTS)}, got {output_layout!r}")
    source = local_folder(source, "checkpoint")
    destination = Path(local_path(destination, "destination", "checkpoints are written as local folders"))
    if destination.exists() and not overwrite and (not destination.is_dir() or any(destination.iterdir())):
        raise FileExistsError(
            f"{destination} exists and is not empty; choose another folder or pass overwrite"
        )
    layout = describe_checkpoint(source, read_state=False)
    config = _official_config(layout, output_layout)  # before reading: a refused layout costs nothing
    # The precision is chosen before reading, not cast afterwards: fp32 asked of a 16-bit ZeRO run
    # must read the optimizer's fp32 masters, which a cast of the 16-bit weights cannot give back.
    precision = weights_precision(layout, DTYPES.get(dtype), from_optimizer=from_optimizer)
    state = read_weights(layout, precision)
    state = dict(official_tensors(state.items()))  # a native source may use transformers' module names
    state = _drop_tied(state, config)
    _check_names(layout, config, set(state))
    provenance = {
        "consolidated_from": str(source.resolve()),
        "weights_from": precision.source,
        "weights_precision": precision.description,
    }
    if layout.zero is not None:
        provenance["zero_tag"] = layout.zero.tag
    _write_atomically(layout, config, state, destination, provenance, max_shard_bytes, output_layout)
    return destination


def resolve_model_dir(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder `load_model` can read as a released checkpoint: `path` itself, or a consolidated cache copy.

    Errors (missing shard, `latest` naming no folder, partitions of another world size, unknown model
    type) are `CheckpointError`s naming the file.
    """
    path = Path(path)
    layout = describe_checkpoint(path, read_state=False)
    if layout.weights_source == WEIGHTS_SAFETENSORS:
        return path
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(f"{_CACHE_FORMAT}:{checkpoint_stamp(layout)}".encode()).hexdigest()[:16]
    target = root / f"{path.resolve().parent.name}-{path.name}-{key}"
    if target.is_dir():  # renamed into place only when complete
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{target.name}.lock"):
        if not target.is_dir():  # another process may have finished it while we waited
            consolidate_checkpoint(path, target)
    return target


def default_cache_dir() -> Path:
    """`$OVIS_BATCH_CACHE_DIR`, else `$XDG_CACHE_HOME/ovis-batch/consolidated` (`~/.cache/...`)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ovis-batch" / "consolidated"


# ------------------------------------------------------------------------------------------- internals


@contextlib.contextmanager
def _exclusive_lock(lock_file: Path) -> Iterator[None]:
    with open(lock_file, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _official_config(layout: CheckpointLayout, output_layout: str) -> dict:
    """The source's config.json, an Ovis2.5 one in the official layout whichever layout it is in."""
    if layout.config.get("model_type") != "ovis2_5":
        if output_layout != OFFICIAL_LAYOUT:
            raise CheckpointError(
                f"{layout.path / 'config.json'}: the {output_layout} layout is an Ovis2.5 layout; a "
                f"{layout.config.get('model_type')!r} checkpoint is written as it is (drop --layout)"
            )
        return layout.config
    return official_config(layout.config, layout.path / "config.json")


def _drop_tied(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Released Ovis2.5 checkpoints with tied embeddings carry no `llm.lm_head.weight`: match them."""
    llm = config.get("llm_config") or {}
    if llm.get("tie_word_embeddings"):
        return {n: t for n, t in state.items() if n != "llm.lm_head.weight"}
    return state


def _check_names(layout: CheckpointLayout, config_dict: dict, names: set[str]) -> None:
    """Refuse to write a checkpoint that `load_model` would refuse (Ovis2.5: built on the meta device)."""
    if layout.config.get("model_type") != "ovis2_5":
        return
    from ovis_batch.model.ovis2_5 import Ovis2_5Config, Ovis2_5ForConditionalGeneration

    try:
        config = Ovis2_5Config.from_dict(config_dict)
    except Exception as exc:
        raise CheckpointError(f"{layout.path / 'config.json'} is not a valid Ovis2.5 config ({exc})") from exc
    with torch.device("meta"):
        expected = set(Ovis2_5ForConditionalGeneration(config).state_dict())
    if config.llm_config.tie_word_embeddings:
        expected.discard("llm.lm_head.weight")
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"the weights of {layout.path} do not match its config.json: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def _shard_groups(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _write_atomically(
    layout: CheckpointLayout,
    config: dict,
    state: dict[str, torch.Tensor],
    destination: Path,
    provenance: dict,
    max_shard_bytes: int,
    output_layout: str,
) -> None:
    """Shards + index + inference files into a sibling temporary folder, then one rename.

    `config` is the source's config in the official layout; the native layout rewrites the config,
    tokenizer, chat template and preprocessor files afterwards (the shards are the same).
    """
    from safetensors.torch import save_file

    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        groups = _shard_groups(state, max_shard_bytes)
        weight_map: dict[str, str] = {}
        for k, group in enumerate(groups, start=1):
            filename = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
            # clone() gives every tensor its own storage (tied or memory-mapped slices cannot be saved).
            save_file(
                {n: state[n].detach().clone().contiguous() for n in group},
                str(staging / filename),
                metadata={"format": "pt"},
            )
            weight_map.update(dict.fromkeys(group, filename))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total, **provenance}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for f in layout.inference_files:
            shutil.copy2(f, staging / f.name)
        if config is not layout.config:  # a native-layout source: its tensors were renamed, its config too
            (staging / "config.json").write_text(json.dumps(config, indent=2))
        dtypes = {str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()}
        if len(dtypes) == 1:
            _set_config_dtype(staging / "config.json", dtypes.pop())
        if output_layout == NATIVE_LAYOUT:
            write_native_inference_files(
                staging, min_pixels=DEFAULT_MIN_PIXELS, max_pixels=DEFAULT_MAX_PIXELS
            )
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _set_config_dtype(config_file: Path, dtype: str) -> None:
    config = json.loads(config_file.read_text())
    for section in (config, config.get("llm_config"), config.get("vit_config")):
        if isinstance(section, dict):
            for key in ("dtype", "torch_dtype"):
                if key in section:
                    section[key] = dtype
    config_file.write_text(json.dumps(config, indent=2))
