"""Reading what evaluation scores: the batch job's prediction shards, references, text embeddings.

Predictions follow the output contract (docs: ARCHITECTURE.md): one row per manifest row, an id column
(`image_id` unless told otherwise), `status` (`ok` / `error`), `error_type`, `error_message`, `caption`
(the answer, reasoning stripped), `reasoning`, `thinking_truncated`, `embedding`, token counts and
pass-through columns. They are a folder of Parquet shards or one file, on any filesystem pyarrow opens
(local paths, `s3://`, `gs://`, ...). Files and folders whose names start with `_` or `.` are not data
(`_run.json`, temporary files of a write in progress) and are skipped.

References are a Parquet file or folder keyed by the same id (the manifest itself works): `references`
(list of strings) for captions; `answers` (list) or `answer` for VQA; `choices` (list) and `answer` for
multiple choice; optional `category`. Text embeddings for retrieval have their own format, described in
`retrieval`.

Everything that is wrong with the inputs raises `EvalInputError` with the file or the ids at fault and
what to do; nothing here scores.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ovis_batch.errors import UsageError
from ovis_batch.storage import StorageError, location

DEFAULT_ID_COLUMN = "image_id"
PREDICTION_TEXT_COLUMNS = ("caption", "reasoning", "error_type", "error_message")
PREDICTION_COLUMNS = (
    "status",
    *PREDICTION_TEXT_COLUMNS,
    "thinking_truncated",
    "output_tokens",
    "reasoning_tokens",
    "prompt_tokens",
)
STATUSES = ("ok", "error")


class EvalInputError(UsageError, ValueError):
    """The evaluation inputs are wrong; the message names the file or ids and says what to do."""


@dataclass(frozen=True)
class ParquetSource:
    """The rows of a Parquet file or folder, with where they came from."""

    table: pa.Table
    files: list[str]
    metadata: dict[str, object]


@dataclass(frozen=True)
class Predictions:
    """Prediction rows as a frame (id column renamed to `id`), their embeddings, and their provenance."""

    frame: pd.DataFrame  # columns: id, and those of PREDICTION_COLUMNS present, plus `category` if present
    embeddings: np.ndarray | None  # (rows, dim) float32, NaN rows where the embedding is null
    files: list[str]
    metadata: dict[str, object]


@dataclass(frozen=True)
class IdMatch:
    """How two id sets overlap."""

    shared: np.ndarray  # sorted ids present on both sides
    only_predictions: np.ndarray
    only_references: np.ndarray


def read_parquet(path: str, columns: Sequence[str] | None = None, what: str = "input") -> ParquetSource:
    """All rows of a Parquet file, or of every data file under a folder (in path order).

    `columns` are read when present (absent ones are simply missing from the table). Raises
    EvalInputError when the path does not exist or holds no Parquet data.
    """
    try:
        found = location(path).parquet_files()
    except StorageError as err:
        raise EvalInputError(f"{what}: {err}") from err
    fs, files = found[0].fs, [f.path for f in found]

    tables, metadata = [], {}
    for file in files:
        try:
            schema = pq.read_schema(file, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as err:
            raise EvalInputError(f"{what} file {file!r} is not readable Parquet: {err}") from err
        wanted = [c for c in columns if c in schema.names] if columns is not None else None
        tables.append(pq.read_table(file, columns=wanted, filesystem=fs))
        if not metadata and schema.metadata:
            metadata = _decode_metadata(schema.metadata)
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    return ParquetSource(table, files, metadata)


def load_predictions(
    path: str, id_column: str = DEFAULT_ID_COLUMN, with_embeddings: bool = False
) -> Predictions:
    """Read and validate the batch job's output (ids present and unique, statuses known)."""
    columns = [id_column, *PREDICTION_COLUMNS, "category"] + (["embedding"] if with_embeddings else [])
    source = read_parquet(path, columns, what="predictions")
    table = source.table
    _require_columns(table, [id_column, "status"], "predictions", path, hint=_id_hint(id_column))
    embeddings = None
    if with_embeddings:
        if "embedding" not in table.column_names:
            raise EvalInputError(
                f"predictions {path!r} have no `embedding` column: run the batch job with embeddings enabled"
            )
        embeddings = embedding_matrix(table.column("embedding"), what=f"predictions {path!r}")
        table = table.drop_columns(["embedding"])
    frame = table.to_pandas()
    frame = frame.rename(columns={id_column: "id"})
    frame["id"] = _string_ids(frame["id"], "predictions", path)
    _require_unique(frame["id"], "predictions", path)
    bad_status = ~frame["status"].isin(STATUSES)
    if bad_status.any():
        raise EvalInputError(
            f"predictions {path!r}: `status` must be 'ok' or 'error'; rows {_examples(frame['id'][bad_status])} have "
            f"{sorted(set(map(str, frame['status'][bad_status])))[:5]}"
        )
    return Predictions(frame, embeddings, source.files, source.metadata)


def load_references(path: str, id_column: str = DEFAULT_ID_COLUMN) -> ParquetSource:
    """Read references keyed by `id_column` (renamed to `id`, as strings)."""
    source = read_parquet(path, what="references")
    _require_columns(source.table, [id_column], "references", path, hint=_id_hint(id_column))
    table = source.table.rename_columns(["id" if c == id_column else c for c in source.table.column_names])
    ids = _string_ids(table.column("id").to_pandas(), "references", path)
    table = table.set_column(table.column_names.index("id"), "id", pa.array(ids.to_numpy(), pa.string()))
    return ParquetSource(table, source.files, source.metadata)


def require_unique_ids(references: ParquetSource, path: str) -> None:
    """One reference row per id (all tasks but retrieval, whose texts repeat their image id)."""
    _require_unique(pd.Series(references.table.column("id").to_pylist()), "references", path)


def match_ids(prediction_ids: Sequence[str], reference_ids: Sequence[str], allow_partial: bool) -> IdMatch:
    """The ids both sides share; raises EvalInputError with the counts if any id is on one side only.

    With `allow_partial` the mismatch is returned (and reported) instead of raised.
    """
    predicted = np.unique(np.asarray(prediction_ids, dtype=object).astype(str))
    referenced = np.unique(np.asarray(reference_ids, dtype=object).astype(str))
    match = IdMatch(
        shared=np.intersect1d(predicted, referenced),
        only_predictions=np.setdiff1d(predicted, referenced),
        only_references=np.setdiff1d(referenced, predicted),
    )
    if (len(match.only_predictions) or len(match.only_references)) and not allow_partial:
        raise EvalInputError(
            f"predictions and references do not cover the same ids: {len(match.only_predictions)} prediction "
            f"ids have no reference (e.g. {_examples(match.only_predictions)}) and {len(match.only_references)} "
            f"reference ids have no prediction (e.g. {_examples(match.only_references)}); "
            f"{len(match.shared)} ids are shared. Pass --allow-partial to score the shared ids only."
        )
    if len(match.shared) == 0:
        raise EvalInputError("predictions and references share no id: check --id-column and the inputs")
    return match


def embedding_matrix(column: pa.ChunkedArray | pa.Array, what: str) -> np.ndarray:
    """(rows, dim) float32 from a fixed-size-list or list column; null embeddings become NaN rows."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(array)
    if pa.types.is_fixed_size_list(array.type):
        dim = array.type.list_size
        values = array.values.slice(array.offset * dim, n * dim)
        matrix = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, dim)
        matrix = matrix.copy()
        matrix[~array.is_valid().to_numpy(zero_copy_only=False)] = np.nan
        return matrix
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        valid = array.is_valid().to_numpy(zero_copy_only=False)
        dims = np.unique(lengths[valid])
        if len(dims) > 1:
            raise EvalInputError(f"{what}: embeddings have different lengths {dims[:5].tolist()}")
        dim = int(dims[0]) if len(dims) else 0
        matrix = np.full((n, dim), np.nan, dtype=np.float32)
        matrix[valid] = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
        return matrix
    raise EvalInputError(f"{what}: `embedding` must be a list of floats, not {array.type}")


def list_column(table: pa.Table, name: str) -> list[list | None]:
    """A list column as Python lists (None for nulls)."""
    return table.column(name).to_pylist()


def _decode_metadata(raw: dict[bytes, bytes]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in raw.items():
        name = key.decode("utf-8", "replace")
        if name in ("ARROW:schema", "pandas"):
            continue
        text = value.decode("utf-8", "replace")
        try:
            out[name] = json.loads(text)
        except ValueError:
            out[name] = text
    return out


def _require_columns(table: pa.Table, names: Sequence[str], what: str, path: str, hint: str = "") -> None:
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise EvalInputError(
            f"{what} {path!r} lack column(s) {missing}; they have {table.column_names}.{(' ' + hint) if hint else ''}"
        )


def _id_hint(id_column: str) -> str:
    return f"The id column is {id_column!r}; pass --id-column if yours has another name."


def _string_ids(ids: pd.Series, what: str, path: str) -> pd.Series:
    if ids.isna().any():
        raise EvalInputError(f"{what} {path!r}: {int(ids.isna().sum())} rows have a null id")
    return ids.astype(str)


def _require_unique(ids: pd.Series, what: str, path: str) -> None:
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise EvalInputError(
            f"{what} {path!r}: ids must be unique; {duplicated.nunique()} ids repeat, e.g. "
            f"{_examples(duplicated.unique())}"
        )


def _examples(ids: Sequence[object] | np.ndarray | pd.Series, limit: int = 5) -> str:
    values = [str(v) for v in list(ids)[:limit]]
    more = len(ids) - len(values)
    return ", ".join(repr(v) for v in values) + (f" and {more} more" if more > 0 else "")
