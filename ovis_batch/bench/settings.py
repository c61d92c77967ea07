"""Typed settings of `ovis-batch bench run`: the suite of benchmarks and the caption-job settings each
runs with (`configs/bench.yaml` documents a suite).

Read once with `ovis_batch.config.load_config(BenchConfig, path)`; unknown keys, impossible values and
caption settings that the caption job would refuse stop the run before any work, naming the key. The
workflow takes plain values from it (`prepare_options`, `caption_overrides`).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ovis_batch.bench.prepare import ID_COLUMN, IMAGE_COLUMN, PROMPT_COLUMN, PrepareOptions
from ovis_batch.bench.source import COLUMNS
from ovis_batch.config import CaptionConfig, validation_problems
from ovis_batch.eval.benchmarks import SCORINGS, TASK_TYPES

# The caption settings a suite must not set: bench fixes them to its prepared manifests.
FIXED_CAPTION_KEYS = ("id_column", "image_column", "prompt", "prompt_column", "passthrough_columns")
FIXED_CAPTION_SETTINGS = {
    "id_column": ID_COLUMN,
    "image_column": IMAGE_COLUMN,
    "prompt_column": PROMPT_COLUMN,
    "prompt": "(each question's own prompt: the `prompt` column of the benchmark manifest)",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BenchmarkConfig(_Strict):
    """One benchmark of the suite: its file, how its questions are asked and scored."""

    name: str = Field(
        description="The benchmark's name: its folder in the output, its rows in the report. Auto task "
        "and scoring read it as VLMEvalKit does (MMBench/CCBench/circular: CircularEval; HallusionBench, "
        "POPE, MME: their own scores; AI2D: answer with the letter)."
    )
    file: str = Field(
        min_length=1,
        description="The benchmark file: a .tsv in VLMEvalKit's layout or a .parquet/.tsv of one's own "
        "(with `columns`), a local path or a URI (s3://, gs://, ...). Nothing is downloaded.",
    )
    task: Literal["auto", *TASK_TYPES] = Field(
        "auto",
        description="mcq, yes_no or short_answer; auto: option columns make mcq, all-yes/no answers yes_no, "
        "anything else short_answer.",
    )
    scoring: Literal["auto", *SCORINGS] = Field(
        "auto",
        description="accuracy, mmbench-circular, hallusionbench, pope, mme or vqa; auto: from the task and "
        "the name.",
    )
    instruction: str | None = Field(
        None,
        min_length=1,
        description="The closing instruction of every prompt. null: Ovis2.5's upstream one (\"End your "
        "response with 'Final answer: '.\" for mcq and yes_no, AI2D's letter instruction, \"Answer the "
        'question using a single word or phrase." for short answers). With the Final-answer instruction '
        'the answer is read after "Final answer:".',
    )
    yes_no_request: bool | None = Field(
        None, description='Append " Please answer yes or no." to yes/no questions; null: HallusionBench only.'
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="A file of one's own: benchmark column name -> the file's column (index, image, "
        "image_path, question, hint, answer, options (a list column), category, l2-category, split, "
        "g_index, set_id, figure_id, question_id, A-Z).",
    )
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="Caption-job settings for this benchmark (the keys of configs/caption.yaml), over the "
        "suite's `settings`: e.g. thinking: true, thinking_budget: 6144.",
    )

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(f"{name!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
        return name

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(columns) - set(COLUMNS))
        if unknown:
            raise ValueError(f"columns maps {unknown}, which are not benchmark columns")
        return columns


class BenchConfig(_Strict):
    """A suite of benchmarks run with one model (`ovis-batch bench run`)."""

    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="Caption-job settings for every benchmark (the keys of configs/caption.yaml, except "
        "the manifest columns and the prompt, which bench sets).",
    )
    benchmarks: list[BenchmarkConfig] = Field(min_length=1, description="The benchmarks, run in this order.")

    @model_validator(mode="after")
    def _consistent(self) -> BenchConfig:
        names = [b.name for b in self.benchmarks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"benchmark names must be unique; repeated: {repeated}")
        for benchmark in self.benchmarks:
            caption_settings(self.settings, benchmark.settings, where=f"benchmark {benchmark.name!r}")
        return self

    def prepare_options(self, benchmark: BenchmarkConfig) -> PrepareOptions:
        """How to prepare one benchmark, as plain values."""
        return PrepareOptions(
            name=benchmark.name,
            task=benchmark.task,
            scoring=benchmark.scoring,
            instruction=benchmark.instruction,
            yes_no_request=benchmark.yes_no_request,
            columns=dict(benchmark.columns),
        )

    def caption_overrides(self, benchmark: BenchmarkConfig, extra: list[str] = ()) -> list[str]:
        """The caption job's `key=value` overrides for one benchmark: the suite's settings, the benchmark's,
        `extra` (the command line's), then the fixed manifest columns."""
        merged = {**self.settings, **benchmark.settings}
        pairs = [f"{k}={json.dumps(v)}" for k, v in merged.items()] + list(extra)
        return pairs + [f"{k}={json.dumps(v)}" for k, v in FIXED_CAPTION_SETTINGS.items()]


def caption_settings(suite: dict[str, Any], own: dict[str, Any], where: str) -> CaptionConfig:
    """The caption job's settings of one benchmark, validated as the caption job validates them."""
    for source, values in (("settings", suite), (f"{where} settings", own)):
        fixed = sorted(set(values) & set(FIXED_CAPTION_KEYS))
        if fixed:
            raise ValueError(f"{source}: {fixed} are set by bench itself (each question has its own prompt)")
    try:
        return CaptionConfig(**{**suite, **own, **FIXED_CAPTION_SETTINGS})
    except ValidationError as exc:
        raise ValueError(
            f"{where}: caption settings the caption job would refuse: {validation_problems(exc)}"
        ) from None
