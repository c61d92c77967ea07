"""The settings of one evaluation run, validated once (the CLI builds them; the workflow reads them)."""

from __future__ import annotations

from dataclasses import dataclass

from ovis_batch.eval.data import DEFAULT_ID_COLUMN, EvalInputError
from ovis_batch.eval.retrieval import DEFAULT_BLOCK_BYTES
from ovis_batch.eval.tasks import TASKS

TOKENIZERS = ("python", "java")


@dataclass(frozen=True)
class EvaluateOptions:
    """What to score, against what, and where the report goes."""

    predictions: str
    """Folder of Parquet shards (or one file) written by the batch job."""
    references: str
    """Parquet file or folder keyed by the id column; for retrieval, the text embeddings Parquet."""
    report_dir: str
    """Folder that receives metrics.json, report.md, scores.parquet and plots/ (created if needed)."""
    task: str = "auto"
    """captions, vqa, mcq, retrieval, or auto (chosen from the reference columns)."""
    compare: str | None = None
    """A previous report folder: every headline metric gets its delta against it."""
    allow_partial: bool = False
    """Score the ids both sides share when some ids are on one side only (else fail with the counts)."""
    id_column: str = DEFAULT_ID_COLUMN
    """Name of the id column on both sides."""
    tokenizer: str = "python"
    """PTB tokenizer for captions: python (no Java needed, same output) or java (the original jar)."""
    meteor: bool = True
    """Compute METEOR for captions when Java is available (it is skipped, and said so, otherwise)."""
    block_mib: int = DEFAULT_BLOCK_BYTES // 2**20
    """Retrieval: the similarity slab held in memory at once, in MiB (about three times this is used)."""

    def __post_init__(self) -> None:
        if self.task not in (*TASKS, "auto"):
            raise EvalInputError(f"--task must be one of {[*TASKS, 'auto']}, not {self.task!r}")
        if self.tokenizer not in TOKENIZERS:
            raise EvalInputError(f"--tokenizer must be one of {list(TOKENIZERS)}, not {self.tokenizer!r}")
        if self.block_mib < 1:
            raise EvalInputError(f"--block-mib must be at least 1, not {self.block_mib}")
        if not self.id_column:
            raise EvalInputError("--id-column must not be empty")
