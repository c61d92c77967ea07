"""Training checkpoints as model sources: Hugging Face Trainer `checkpoint-N` folders and DeepSpeed ZeRO.

    from ovis_batch.checkpoints import describe_checkpoint, consolidate_checkpoint, resolve_model_dir
    layout = describe_checkpoint(Path("runs/ft/checkpoint-1200"))   # kind, step, loss, weights, parts
    consolidate_checkpoint("runs/ft/checkpoint-1200", "models/ft-1200", dtype="bf16")
    folder = resolve_model_dir("runs/ft/checkpoint-1200")            # what load_model reads

`layout.py` sorts a directory's parts and reads `trainer_state.json`; `zero.py` reads DeepSpeed's
files safely (`torch.load(weights_only=True)` with DeepSpeed's few pickled classes mapped to inert
stand-ins) and rebuilds whole tensors from ZeRO partitions; `consolidate.py` writes clean inference
checkpoints and the cached folder `load_model` reads; `sources.py` is `ovis_batch.load_model` and
`model_identity` for every model source (the model runtime itself reads only plain checkpoint folders
and hub ids). Nothing shipped inside a checkpoint (such as
`zero_to_fp32.py`) is ever executed. Evaluating a whole run lives in `workflows/eval_checkpoints.py`.
"""

from ovis_batch.checkpoints.consolidate import (
    checkpoint_weights,
    consolidate_checkpoint,
    default_cache_dir,
    resolve_model_dir,
)
from ovis_batch.checkpoints.layout import (
    CheckpointLayout,
    TrainerState,
    describe_checkpoint,
    format_layout,
    layout_summary,
    read_trainer_state,
    training_run_checkpoints,
)
from ovis_batch.checkpoints.sources import load_model, model_identity, resolve_model_source

__all__ = [
    "CheckpointLayout",
    "TrainerState",
    "checkpoint_weights",
    "consolidate_checkpoint",
    "default_cache_dir",
    "describe_checkpoint",
    "format_layout",
    "layout_summary",
    "load_model",
    "model_identity",
    "read_trainer_state",
    "resolve_model_dir",
    "resolve_model_source",
    "training_run_checkpoints",
]
