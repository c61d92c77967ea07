"""Finding, checking and reading checkpoint folders (Ovis2.5 in either layout, see `layouts.py`; Ovis2).

Everything here fails early and by name: a missing `config.json`, a shard named by the index that is not
on disk, a truncated or corrupt safetensors file, an unknown `model_type`, a tokenizer without a chat
template. Weights are read with safetensors only; nothing shipped inside a checkpoint is ever executed.
Hub ids are resolved with `huggingface_hub.snapshot_download`, fetching data files only (never `*.py`).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from ovis_batch.errors import UsageError

SUPPORTED_MODEL_TYPES = ("ovis2_5", "ovis2")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Files a model source needs; never code.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint directory that cannot be used as it is; the message names the file and the fix."""


def resolve_source(source: str | os.PathLike) -> Path:
    """A local folder as it is; an `org/name` hub id through the ordinary Hugging Face download cache.

    Training checkpoints are resolved above the model layer: `ovis_batch.checkpoints.resolve_model_source`.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds config.json")
        # Training checkpoints whose weights live only in DeepSpeed ZeRO files are consolidated above this
        # layer (`ovis_batch.checkpoints.sources`); the model runtime reads plain checkpoint folders.
        return path
    text = str(source)
    if not _HUB_ID.match(text):
        raise CheckpointError(f"model source {text!r} is neither an existing folder nor a hub id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # network, auth, missing repo: all mean "cannot get it"
        raise CheckpointError(
            f"could not fetch {text!r} from the hub ({type(exc).__name__}: {exc}); download it on a machine "
            "with access (`hf download {text} --local-dir DIR`) and pass the folder instead"
        ) from exc


def read_config(folder: Path) -> dict:
    """The parsed config.json, with a known `model_type`."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: a checkpoint folder needs its config.json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON ({exc})") from exc
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} is not supported; ovis-batch runs "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
        )
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, checked against `model.safetensors.index.json` when present."""
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_file} is not a valid safetensors index ({exc!r})") from exc
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{index_file} names shard(s) that are not in {folder}: {', '.join(missing)}; "
                "the download or copy is incomplete, fetch the missing files"
            )
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
            hint = f" (found {', '.join(bins)}: convert them to safetensors first)" if bins else ""
            if (folder / "latest").is_file() or any(folder.glob("global_step*")):
                hint = (
                    " (it holds DeepSpeed ZeRO files: load it with ovis_batch.load_model or any --model, "
                    "which consolidate them once, or run `ovis-batch checkpoint consolidate`)"
                )
            raise CheckpointError(f"no *.safetensors weights in {folder}{hint}")
    for f in files:
        check_safetensors(f)
    return files


def check_safetensors(path: Path) -> dict:
    """Parse a safetensors header and check that every tensor lies inside the file (catches truncation)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, 100_000_000):
                raise ValueError(f"header length {header_len} exceeds the file")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); re-download it") from exc
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{path} is truncated: its header needs {8 + header_len + end} bytes, the file has {size}; "
            "re-download or re-copy it"
        )
    return header


def iter_tensors(files: list[Path], device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) over all shards, read lazily with safetensors."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(f, framework="pt", device=str(device)) as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, fh.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"{f} could not be read ({type(exc).__name__}: {exc}); re-download it"
            ) from exc


def chat_template(folder: Path) -> str:
    """The chat template: `chat_template.json`, `chat_template.jinja` or `tokenizer_config.json`."""
    for name in ("chat_template.jinja",):
        if (folder / name).is_file():
            return (folder / name).read_text()
    candidates = [folder / "chat_template.json", folder / "tokenizer_config.json"]
    for path in candidates:
        if path.is_file():
            try:
                template = json.loads(path.read_text()).get("chat_template")
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
            if template:
                return template
    raise CheckpointError(
        f"no chat template in {folder} (looked in chat_template.jinja, chat_template.json and "
        "tokenizer_config.json); copy chat_template.json from the released model"
    )


def weights_fingerprint(files: list[Path]) -> str:
    """A cheap identity for the weights: sha256 over each shard's name, size and safetensors header.

    Hashing the headers (names, shapes, offsets) plus file sizes is instant even for 20 GB of weights
    and changes whenever a training step rewrites a shard, which is what output metadata needs.
    """
    import hashlib

    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            digest.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + b"\0" + fh.read(n))
        # The header alone does not see retrained values of the same shapes: add the first and last MiB.
        with open(f, "rb") as fh:
            digest.update(fh.read(1 << 20))
            fh.seek(max(0, f.stat().st_size - (1 << 20)))
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()


def model_identity(source: str | os.PathLike) -> dict:
    """A model's identity from its files alone, no weights loaded: what output metadata records and what
    resume, indexes and fine-tuning runs compare (`weights_sha256` decides; names may differ)."""
    folder = resolve_source(source)
    config = read_config(folder)
    files = weight_files(folder)
    if config["model_type"] == "ovis2_5":
        from ovis_batch.model.layouts import official_config  # layouts.py imports this module

        chat_template(folder)  # a folder without one cannot prompt the model: fail before any work
        hidden = official_config(config, folder / "config.json")["llm_config"]["hidden_size"]
    else:
        hidden = config.get("text_config", {}).get("hidden_size") or config["hidden_size"]
    return {
        "name": str(source),
        "folder": str(folder),
        "revision": None,
        "weights_sha256": weights_fingerprint(files),
        "model_type": config["model_type"],
        "hidden_size": hidden,
        "random_weights": "RANDOM" in str(config.get("_comment", "")),
    }
