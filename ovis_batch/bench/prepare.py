"""Preparing a benchmark: a published benchmark file in, the caption job's manifest and the references out.

The prepared folder:

    OUT/
      manifest.parquet     one row per question: `index`, `image` (bytes), `prompt` (the caption job's input)
      references.parquet   one row per question: what scoring needs (`eval.benchmarks.REFERENCE_COLUMNS`)
      prepared.json        the source file (uri, size, sha256), task, scoring, the prompt style and
                           instruction, the multi-image policy, counts; written last: it marks a complete folder

The task (multiple choice, yes/no, short answer) and the scoring rule are read from the file and its
name the way VLMEvalKit decides them, unless set. Every question of the file is kept, except rows
without any image, which VLMEvalKit skips too (they are counted in prepared.json and the reports). A
row that cannot be used stops the preparation, naming the file, the row and the column. OUT is a local
folder or a URI (s3://, gs://, ...): every file is written whole through `ovis_batch.storage`.
"""

from __future__ import annotations

import ast
import datetime
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ovis_batch.bench.images import COMPOSE_POLICY, check_decodable, compose_side_by_side, row_images
from ovis_batch.bench.prompts import PROMPT_STYLE, build_prompt, default_instruction, default_yes_no_request
from ovis_batch.bench.source import BenchmarkFileError, BenchmarkTable, cell_text, read_benchmark_file
from ovis_batch.eval.answers import FINAL_ANSWER_INSTRUCTION
from ovis_batch.eval.benchmarks import SCORINGS, TASK_TYPES
from ovis_batch.storage import Location, location

PREPARED_FORMAT = "ovis-batch-bench-prepared/1"
PREPARED_FILE = "prepared.json"
MANIFEST_FILE = "manifest.parquet"
REFERENCES_FILE = "references.parquet"
ID_COLUMN, IMAGE_COLUMN, PROMPT_COLUMN = "index", "image", "prompt"
CIRCULAR_OFFSET = 1_000_000  # MMBench: a rotated copy of question q has index q + k * 1,000,000


@dataclass(frozen=True)
class PrepareOptions:
    """How to read and prompt one benchmark (plain values; `configs/bench.yaml` documents each)."""

    name: str
    task: str = "auto"
    scoring: str = "auto"
    instruction: str | None = None
    yes_no_request: bool | None = None
    columns: Mapping[str, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "scoring": self.scoring,
            "instruction": self.instruction,
            "yes_no_request": self.yes_no_request,
            "columns": dict(self.columns),
        }


def read_prepared(folder: str | os.PathLike | Location) -> dict[str, Any] | None:
    """The prepared.json of a complete prepared folder, or None."""
    try:
        document = json.loads(location(folder).join(PREPARED_FILE).read_bytes())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return document if document.get("format") == PREPARED_FORMAT else None


def prepare_benchmark(
    source: str, out: str | os.PathLike | Location, options: PrepareOptions
) -> dict[str, Any]:
    """Read `source`, check every row, write the prepared folder `out`; returns prepared.json's content."""
    table = read_benchmark_file(source, options.columns)
    return write_prepared(table, out, options)


def prepared_is_current(folder: str | os.PathLike | Location, source: str, options: PrepareOptions) -> bool:
    """The folder was prepared from this very file (same bytes) with these options."""
    document = read_prepared(folder)
    if document is None or document["options"] != options.record():
        return False
    table = read_benchmark_file(source, options.columns)
    return document["source"]["sha256"] == table.sha256


def write_prepared(
    table: BenchmarkTable, out: str | os.PathLike | Location, options: PrepareOptions
) -> dict[str, Any]:
    """The prepared folder of an already read benchmark file (see the module docstring)."""
    frame = table.frame
    _require_columns(table)
    _require_unique_index(table)
    task, task_reason = resolve_task(table, options.task)
    scoring, scoring_reason = resolve_scoring(options.name, task, options.scoring)
    instruction = options.instruction or default_instruction(task, options.name)
    yes_no_request = task == "yes_no" and (
        default_yes_no_request(options.name) if options.yes_no_request is None else options.yes_no_request
    )
    images_by_index = dict(zip(frame["index"], frame["image"], strict=True)) if "image" in frame else {}

    manifest, references, skipped, composed, most_images = [], [], [], 0, 1
    for row in frame["row"]:
        record = frame.iloc[row - 1]
        images = row_images(table, row, images_by_index)
        if not images:
            skipped.append(record["index"])
            continue
        if len(images) > 1:
            check_decodable(table, row, images, "image" if cell_text(record.get("image")) else "image_path")
            composed, most_images = composed + 1, max(most_images, len(images))
        image = images[0] if len(images) == 1 else compose_side_by_side(images)
        question = cell_text(record.get("question"))
        if question is None:
            raise table.error(row, "question", "empty: every row needs a question")
        reference = _reference(table, row, task, scoring)
        options_shown = dict(zip(reference["option_letters"], reference["options"], strict=True))
        prompt = build_prompt(
            question,
            instruction,
            hint=cell_text(record.get("hint")) if task == "mcq" else None,
            options=options_shown,
            yes_no_request=yes_no_request,
        )
        reference |= {
            "final_answer": FINAL_ANSWER_INSTRUCTION in prompt,
            "image_key": cell_text(record.get("image_path")) or hashlib.sha256(image).hexdigest()[:16],
            "images": len(images),
            "prompt": prompt,
        }
        manifest.append({ID_COLUMN: record["index"], IMAGE_COLUMN: image, PROMPT_COLUMN: prompt})
        references.append(reference)
    if not manifest:
        raise BenchmarkFileError(f"{table.uri}: no row has an image (columns `image` / `image_path`)")
    if scoring == "mmbench-circular":
        _require_main_rows(table, references)

    out = location(out)
    out.join(PREPARED_FILE).delete()  # the folder is incomplete until it is rewritten
    _write_parquet(out.join(MANIFEST_FILE), pa.Table.from_pylist(manifest, schema=_MANIFEST_SCHEMA))
    _write_parquet(out.join(REFERENCES_FILE), pa.Table.from_pylist(references, schema=_REFERENCES_SCHEMA))
    document = {
        "format": PREPARED_FORMAT,
        "name": options.name,
        "source": {"uri": table.uri, "bytes": table.size, "sha256": table.sha256},
        "options": options.record(),
        "task": task,
        "task_reason": task_reason,
        "scoring": scoring,
        "scoring_reason": scoring_reason,
        "prompt": {
            "style": PROMPT_STYLE,
            "instruction": instruction,
            "yes_no_request": yes_no_request,
            "answer_read_after_final_answer": FINAL_ANSWER_INSTRUCTION in instruction,
            "example": manifest[0][PROMPT_COLUMN],
        },
        "questions": len(manifest),
        "skipped_without_image": {"count": len(skipped), "examples": skipped[:10]},
        "images": {
            "questions_with_several": composed,
            "most_in_one_question": most_images if composed else 1,
            "policy": COMPOSE_POLICY if composed else None,
        },
        "circular_groups": len({r["group"] for r in references}) if scoring == "mmbench-circular" else None,
        "categories": sorted({r["category"] for r in references if r["category"]}),
        "files": {"manifest": MANIFEST_FILE, "references": REFERENCES_FILE},
        "prepared_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    out.join(PREPARED_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return document


def resolve_task(table: BenchmarkTable, requested: str) -> tuple[str, str]:
    """The task type and why: as requested, or from the columns (option columns: multiple choice; every
    answer yes or no: yes/no; else short answer)."""
    if requested != "auto":
        if requested not in TASK_TYPES:
            raise BenchmarkFileError(f"unknown task {requested!r}; choose one of {[*TASK_TYPES, 'auto']}")
        return requested, "requested"
    letters = table.option_letters()
    if "A" in letters and "B" in letters:
        return "mcq", f"auto: option columns {letters}"
    answers = {str(a).strip().lower() for a in table.frame["answer"] if cell_text(a) is not None}
    if answers and answers <= {"yes", "no"}:
        return "yes_no", "auto: every answer is yes or no"
    return "short_answer", "auto: no option columns, answers are not all yes/no"


def resolve_scoring(name: str, task: str, requested: str) -> tuple[str, str]:
    """The scoring rule and why: as requested, or from the benchmark's name as VLMEvalKit picks it."""
    if requested != "auto":
        if requested not in SCORINGS:
            raise BenchmarkFileError(f"unknown scoring {requested!r}; choose one of {[*SCORINGS, 'auto']}")
        return requested, "requested"
    lowered = name.lower()
    if task == "mcq":
        if any(word in lowered for word in ("mmbench", "ccbench", "circular")):
            return "mmbench-circular", "auto: the name says MMBench / CCBench / circular"
        return "accuracy", "auto: multiple choice"
    if task == "yes_no":
        for word, scoring in (("Hallusion", "hallusionbench"), ("POPE", "pope"), ("MME", "mme")):
            if word in name:
                return scoring, f"auto: the name contains {word}"
        return "accuracy", "auto: yes/no"
    return "vqa", "auto: short answers"


# --------------------------------------------------------------------------------------------------
# one row's references
# --------------------------------------------------------------------------------------------------


def _reference(table: BenchmarkTable, row: int, task: str, scoring: str) -> dict[str, Any]:
    record = table.frame.iloc[row - 1]
    index = record["index"]
    answer = cell_text(record["answer"])
    if answer is None:
        raise table.error(row, "answer", "empty: every question needs its answer")
    reference: dict[str, Any] = {
        "id": index,
        "task": task,
        "answer": answer.strip(),
        "answers": [],
        "option_letters": [],
        "options": [],
        "category": cell_text(record.get("category")),
        "l2_category": cell_text(record.get("l2-category")),
        "split": cell_text(record.get("split")),
        "group": index,
        "is_main": True,
        "set_id": None,
        "figure_id": None,
        "question_id": None,
    }
    if task == "mcq":
        options = {c: cell_text(record[c]) for c in table.option_letters()}
        options = {c: text for c, text in options.items() if text is not None}
        if len(options) < 2:
            raise table.error(
                row, "A", f"a multiple-choice question needs at least two options, found {list(options)}"
            )
        letter = answer.strip()
        if letter not in options:
            raise table.error(row, "answer", f"{letter!r} names no option (the options are {list(options)})")
        reference |= {"answer": letter, "option_letters": list(options), "options": list(options.values())}
    elif task == "yes_no":
        word = answer.strip().lower()
        if word not in ("yes", "no"):
            raise table.error(row, "answer", f"{answer!r} is not Yes or No (a yes/no benchmark)")
        reference["answer"] = word.capitalize()
    else:
        reference["answers"] = _short_answers(table, row, answer)
    if scoring == "mmbench-circular":
        reference |= _circular_group(table, row)
    if scoring == "hallusionbench":
        reference |= _hallusion_ids(table, row)
    return reference


def _short_answers(table: BenchmarkTable, row: int, answer: str) -> list[str]:
    """A short answer, or a list of acceptable answers written as a list ("['two', '2']")."""
    text = answer.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return [text]
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise table.error(row, "answer", f"looks like a list of answers but is not one ({exc})") from exc
    if not isinstance(parsed, list | tuple) or not parsed or not all(str(a).strip() for a in parsed):
        raise table.error(row, "answer", "a list of answers must hold at least one non-empty answer")
    return [str(a) for a in parsed]


def _circular_group(table: BenchmarkTable, row: int) -> dict[str, Any]:
    """VLMEvalKit's CircularEval groups: `g_index` when given, else the index modulo 1,000,000."""
    record = table.frame.iloc[row - 1]
    given = cell_text(record.get("g_index"))
    try:
        index = int(record["index"])
        group = int(float(given)) if given is not None else index % CIRCULAR_OFFSET
    except ValueError as exc:
        column = "g_index" if given is not None else "index"
        raise table.error(row, column, f"circular scoring needs integer indices ({exc})") from exc
    return {"group": str(group), "is_main": index == group}


def _hallusion_ids(table: BenchmarkTable, row: int) -> dict[str, Any]:
    """HallusionBench's set, figure and question ids: their columns, else parts 4-6 of the index
    ("VS_chart_0_1_0_1": set 1, figure 0, question 1), as VLMEvalKit reads them."""
    record = table.frame.iloc[row - 1]
    given = [cell_text(record.get(c)) for c in ("set_id", "figure_id", "question_id")]
    if all(v is not None for v in given):
        return dict(zip(("set_id", "figure_id", "question_id"), given, strict=True))
    parts = record["index"].split("_")
    if len(parts) < 6:
        raise table.error(
            row,
            "index",
            "HallusionBench scoring reads the set, figure and question ids from parts 4-6 of the index "
            "(like 'VS_chart_0_1_0_1'); give `set_id`, `figure_id` and `question_id` columns instead",
        )
    return {"set_id": parts[3], "figure_id": parts[4], "question_id": parts[5]}


def _require_columns(table: BenchmarkTable) -> None:
    columns = list(table.frame.columns.drop("row"))
    for needed in ("index", "question", "answer"):
        if needed not in table.frame:
            raise BenchmarkFileError(
                f"{table.uri} has no `{needed}` column (it has {columns}); map yours onto it "
                f"(bench prepare --column {needed}=YOURS, or `columns:` in configs/bench.yaml)"
            )
    if "image" not in table.frame and "image_path" not in table.frame:
        raise BenchmarkFileError(
            f"{table.uri} has neither an `image` nor an `image_path` column (it has {columns})"
        )


def _require_unique_index(table: BenchmarkTable) -> None:
    index = table.frame["index"]
    if index.isna().any():
        row = int(table.frame["row"][index.isna()].iloc[0])
        raise table.error(row, "index", "empty: every row needs a unique index")
    repeated = index[index.duplicated(keep=False)]
    if len(repeated):
        value = repeated.iloc[0]
        rows = table.frame["row"][index == value].tolist()
        raise BenchmarkFileError(
            f"{table.uri}: duplicate index {value!r} in rows {rows} (column `index`; {repeated.nunique()} "
            "values repeat): every question needs its own index"
        )


def _require_main_rows(table: BenchmarkTable, references: list[dict[str, Any]]) -> None:
    groups = {r["group"] for r in references}
    mains = {r["group"] for r in references if r["is_main"]}
    orphans = sorted(groups - mains)
    if orphans:
        raise BenchmarkFileError(
            f"{table.uri}: circular group(s) {orphans[:5]} have rotated questions but no unrotated one (index "
            "equal to the group); CircularEval needs it"
        )


_MANIFEST_SCHEMA = pa.schema(
    [(ID_COLUMN, pa.string()), (IMAGE_COLUMN, pa.binary()), (PROMPT_COLUMN, pa.string())]
)
_TEXT_LIST = pa.list_(pa.string())
_REFERENCES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("task", pa.string()),
        ("answer", pa.string()),
        ("answers", _TEXT_LIST),
        ("option_letters", _TEXT_LIST),
        ("options", _TEXT_LIST),
        ("final_answer", pa.bool_()),
        ("category", pa.string()),
        ("l2_category", pa.string()),
        ("split", pa.string()),
        ("group", pa.string()),
        ("is_main", pa.bool_()),
        ("image_key", pa.string()),
        ("images", pa.int32()),
        ("set_id", pa.string()),
        ("figure_id", pa.string()),
        ("question_id", pa.string()),
        ("prompt", pa.string()),
    ]
)


def _write_parquet(file: Location, table: pa.Table) -> None:
    """The table as one Parquet file, written whole (a reader never sees a part of it)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=64)
    file.write_bytes(sink.getvalue().to_pybytes())
