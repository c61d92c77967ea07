"""Model sources as every `--model` accepts them: checkpoint folders, hub ids, and training checkpoints.

    import ovis_batch
    model = ovis_batch.load_model("runs/ft/checkpoint-1200")   # this module's load_model

The model runtime (`ovis_batch.model`) reads plain checkpoint folders and hub ids and knows nothing of
training runs: it imports nothing above itself. Here a local folder first goes through
`resolve_model_dir` (the folder itself when its safetensors are complete, else a consolidated cache copy
of its DeepSpeed ZeRO weights), then to the runtime; the name outputs record stays the one given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ovis_batch.checkpoints.consolidate import resolve_model_dir
from ovis_batch.storage import is_uri, local_path


def resolve_model_source(source: str | os.PathLike) -> str | Path:
    """A folder the model runtime reads for a local source (see the module docstring); others as given."""
    if is_uri(source):
        source = local_path(source, "model source", "checkpoints are read from local folders or hub ids")
    path = Path(source).expanduser()
    if path.is_dir():
        return resolve_model_dir(path)
    return source  # a hub id, or a path the runtime will refuse by name


def load_model(source: str | os.PathLike, *args: Any, **kwargs: Any):
    """`ovis_batch.model.runtime.load_model` for any model source, training checkpoints included."""
    from ovis_batch.model.runtime import load_model as load_checkpoint_folder

    kwargs.setdefault("name", str(source))
    return load_checkpoint_folder(resolve_model_source(source), *args, **kwargs)


def model_identity(source: str | os.PathLike) -> dict:
    """`ovis_batch.model.checkpoint.model_identity` for any model source, under the name given."""
    from ovis_batch.model.checkpoint import model_identity as folder_identity

    return folder_identity(resolve_model_source(source)) | {"name": str(source)}
