"""Reading a benchmark file: VLMEvalKit's TSV layout, or a Parquet / TSV of one's own with a column mapping.

VLMEvalKit's layout, the one MMBench, MMStar, SEEDBench, AI2D, ScienceQA, HallusionBench, POPE, MME,
OCRBench and most image benchmarks are distributed in: one question per row, tab-separated, with
- `index`: unique per row (MMBench's rotated copies of a question have index + k * 1,000,000);
- `image`: the image as base64; several images as a Python list of base64 strings ("['...', '...']");
  or, to save space, the index of another row whose image it shares (a value of at most 64 characters);
- `image_path`: paths (or a list of them) relative to the file, for files without `image`; beside
  `image` it only names the image (MME's questions about one image share it);
- `question`, `hint`, the option columns `A`, `B`, ... (empty when a question has fewer), `answer`;
- `category`, `l2-category`, `split`; some benchmarks add `g_index` (a circular group), `set_id`,
  `figure_id`, `question_id` (HallusionBench).
A file of one's own (TSV or Parquet) maps its column names onto these (`columns`), and may give the
options as one list column (`options`) instead of lettered columns; a Parquet `image` may hold bytes.

Cells are read as the text written in the file: an option "None" or "NA" stays that text, and only an
empty cell is missing. Files are read from a local path or any URI pyarrow or fsspec opens.
"""

from __future__ import annotations

import hashlib
import io
import string
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ovis_batch.errors import UsageError
from ovis_batch.storage import Location, location

OPTION_LETTERS = tuple(string.ascii_uppercase)
# The column names the rest of the package reads (VLMEvalKit's), and what a mapping may target.
COLUMNS = (
    "index",
    "image",
    "image_path",
    "question",
    "hint",
    "answer",
    "options",
    "category",
    "l2-category",
    "split",
    "g_index",
    "set_id",
    "figure_id",
    "question_id",
    *OPTION_LETTERS,
)


class BenchmarkFileError(UsageError, ValueError):
    """A benchmark file that cannot be used; the message names the file, the row and the column."""


@dataclass(frozen=True)
class BenchmarkTable:
    """The rows of a benchmark file under the standard column names, and where the file is."""

    uri: str
    file: Location  # where the file is: `image_path` values are relative to its folder
    frame: pd.DataFrame  # standard column names, plus `row`: the 1-based data row in the file
    size: int
    sha256: str

    def error(self, row: int, column: str, what: str) -> BenchmarkFileError:
        """An error about one cell: file, row (and its index when known), column, what is wrong."""
        index = self.frame["index"].iloc[row - 1] if "index" in self.frame else None
        where = f"row {row}" + (f" (index {index!r})" if isinstance(index, str) else "")
        return BenchmarkFileError(f"{self.uri}: {where}, column `{column}`: {what}")

    def option_letters(self) -> list[str]:
        """The option columns present, in letter order."""
        return [c for c in OPTION_LETTERS if c in self.frame]


def read_benchmark_file(uri: str, columns: Mapping[str, str] | None = None) -> BenchmarkTable:
    """Read a `.tsv` (VLMEvalKit's layout) or `.parquet` benchmark file; `columns` maps a standard name
    (`COLUMNS`) to the file's own column name."""
    file = location(uri)
    if not file.exists():
        raise BenchmarkFileError(f"benchmark file {uri} does not exist")
    if not file.is_file():
        raise BenchmarkFileError(
            f"benchmark file {uri} is not a file (a folder?); give the .tsv or .parquet file"
        )
    data = file.read_bytes()
    name = file.name.lower()
    if name.endswith((".tsv", ".txt")):
        try:
            frame = pd.read_csv(io.BytesIO(data), sep="\t", dtype=str, keep_default_na=False, na_values=[""])
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise BenchmarkFileError(f"benchmark file {uri} is not a readable TSV file: {exc}") from exc
    elif name.endswith(".parquet"):
        try:
            frame = pq.read_table(pa.BufferReader(data)).to_pandas()
        except (OSError, pa.ArrowInvalid) as exc:
            raise BenchmarkFileError(f"benchmark file {uri} is not readable Parquet: {exc}") from exc
    else:
        raise BenchmarkFileError(
            f"benchmark file {uri}: expected a .tsv file (VLMEvalKit's layout) or a .parquet file"
        )
    frame = _standard_columns(frame, dict(columns or {}), uri)
    if frame.empty:
        raise BenchmarkFileError(f"benchmark file {uri} holds no rows")
    frame.insert(0, "row", range(1, len(frame) + 1))
    return BenchmarkTable(str(uri), file, frame, len(data), hashlib.sha256(data).hexdigest())


def _standard_columns(frame: pd.DataFrame, mapping: dict[str, str], uri: str) -> pd.DataFrame:
    unknown = sorted(set(mapping) - set(COLUMNS))
    if unknown:
        raise BenchmarkFileError(
            f"column mapping names {unknown}, which are not benchmark columns; map onto {list(COLUMNS[:14])} "
            "or option letters A-Z"
        )
    absent = sorted(v for v in mapping.values() if v not in frame.columns)
    if absent:
        raise BenchmarkFileError(
            f"{uri} has no column(s) {absent} (named in the column mapping); it has {list(frame.columns)}"
        )
    # A mapped column takes the standard name; a column already called so gives way.
    frame = frame.drop(columns=[k for k in mapping if k in frame.columns and k not in mapping.values()])
    frame = frame.rename(columns={v: k for k, v in mapping.items()})
    if "options" in frame and not any(c in frame for c in OPTION_LETTERS):
        frame = _lettered_options(frame, uri)
    if "index" in frame:
        frame["index"] = [None if _missing(v) else str(v) for v in frame["index"]]
    return frame.reset_index(drop=True)


def _lettered_options(frame: pd.DataFrame, uri: str) -> pd.DataFrame:
    """A list column of option texts as the columns A, B, ... (empty where a row has fewer)."""
    lists = []
    for row, value in enumerate(frame["options"], start=1):
        if _missing(value):
            lists.append([])
        elif isinstance(value, str) or not hasattr(value, "__iter__"):
            raise BenchmarkFileError(f"{uri}: row {row}, column `options`: expected a list of option texts")
        else:
            lists.append([str(v) for v in value])
    width = max((len(x) for x in lists), default=0)
    if width > len(OPTION_LETTERS):
        raise BenchmarkFileError(f"{uri}: a row has {width} options; at most 26 (A-Z) are supported")
    for i in range(width):
        frame[OPTION_LETTERS[i]] = [x[i] if i < len(x) else None for x in lists]
    return frame.drop(columns=["options"])


def _missing(value: object) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # an array or list cell
        return False


def cell_text(value: object) -> str | None:
    """A cell as text, None when it is missing or blank."""
    if _missing(value):
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None
