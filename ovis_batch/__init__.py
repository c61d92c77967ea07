"""ovis-batch: batch, offline captioning, reasoning traces and retrieval embeddings with Ovis.

The top-level package is kept light: `import ovis_batch` imports neither torch nor Ray, so that the
evaluation and index tools start fast. `load_model` and the tiny-checkpoint factory are resolved on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model", "make_tiny_model"]

if TYPE_CHECKING:
    from ovis_batch.checkpoints.sources import load_model
    from ovis_batch.model.tiny import make_tiny_model


def __getattr__(name: str) -> Any:
    if name == "load_model":
        # The runtime's load_model, with training checkpoints (Trainer, DeepSpeed ZeRO) resolved first.
        from ovis_batch.checkpoints.sources import load_model

        return load_model
    if name == "make_tiny_model":
        from ovis_batch.model.tiny import make_tiny_model

        return make_tiny_model
    raise AttributeError(f"module 'ovis_batch' has no attribute {name!r}")
