"""The stages of the caption job, each a pure batch -> batch function over pyarrow tables.

- `DecodeStage` (CPU tasks): fetch bytes -> decode (draft-scaled) -> EXIF orient -> RGB -> resize ->
  uint8 model inputs. A bad image becomes a row with `status = "error"`, never an exception.
- `CaptionPredictor` (an actor per model replica): loads the model once in `__init__`; `__call__`
  splits its rows into batches by visual-token budget (sizes sorted, so panoramas run few at a time and
  thumbnails many), generates, and on failure splits a batch in halves down to single rows; a row that
  still fails becomes an error row.
- `write_shard_batch` (CPU tasks): turns rows into the output contract and commits one shard atomically;
  returns one statistics row per shard for the run summary.

Every stage returns exactly the rows it received (`check_rows` names the stage that broke the rule).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from ovis_batch.model.preprocess import PATCH_DIM, ImageInputError, PreparedImage
from ovis_batch.storage import Location

# Columns between the stages (besides the id and pass-through columns).
INTERNAL_FIELDS = [
    pa.field("prompt", pa.string()),
    pa.field("pixels", pa.large_binary()),  # uint8 patches (Ovis2.5) or uint8 RGB (Ovis2)
    pa.field("pixels_shape", pa.list_(pa.int32())),
    pa.field("grid_thw", pa.list_(pa.int32())),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("input_width", pa.int32()),
    pa.field("input_height", pa.int32()),
    pa.field("visual_tokens", pa.int32()),
    pa.field("status", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("decode_s", pa.float64()),
]


class RowCountError(RuntimeError):
    """A stage returned a different number of rows, or other ids, than it received."""


def check_rows(stage: str, id_column: str, before: pa.Table, after: pa.Table) -> None:
    if (
        before.num_rows != after.num_rows
        or before.column(id_column).to_pylist() != after.column(id_column).to_pylist()
    ):
        raise RowCountError(
            f"stage {stage!r} received {before.num_rows} rows and returned {after.num_rows} "
            "(or other ids): every input row must come out exactly once"
        )


def _fetch(image: Location) -> bytes:
    try:
        return image.read_bytes()
    except FileNotFoundError as exc:
        raise ImageInputError("file_not_found", f"{image.uri} does not exist") from exc
    except Exception as exc:
        raise ImageInputError(
            "fetch_error", f"{image.uri} could not be read ({type(exc).__name__}: {exc})"
        ) from exc


class DecodeStage:
    """Manifest rows -> model inputs (uint8) or error rows."""

    def __init__(
        self,
        *,
        id_column: str,
        image_column: str,
        prompt: str,
        prompt_column: str | None,
        passthrough: list[pa.Field],
        manifest: Location | None,
        input_kind: str,
        min_pixels: int,
        max_pixels: int,
        pixel_ceiling: int,
        fast: bool,
        keep: Any = None,
        skip: Any = None,
    ) -> None:
        self.id_column, self.image_column = id_column, image_column
        self.prompt, self.prompt_column = prompt, prompt_column
        self.passthrough = passthrough
        self.manifest = manifest  # its filesystem holds the files named by the `path` column
        self.input_kind = input_kind
        self.min_pixels, self.max_pixels, self.pixel_ceiling, self.fast = (
            min_pixels,
            max_pixels,
            pixel_ceiling,
            fast,
        )
        # The id sets travel through Ray's object store once (ray.put) and are fetched once per actor.
        self.keep, self.skip = _resolve(keep), _resolve(skip)

    def select(self, batch: pa.Table) -> pa.Table:
        """Drop rows already committed (resume) and rows beyond `--limit` (an allow-list of ids)."""
        from ovis_batch.pipeline.output import id_hashes

        if self.keep is None and self.skip is None:
            return batch
        hashes = id_hashes(batch.column(self.id_column))
        mask = np.ones(batch.num_rows, dtype=bool)
        if self.keep is not None:
            mask &= self.keep.contains(hashes)
        if self.skip is not None:
            mask &= ~self.skip.contains(hashes)
        return batch.filter(pa.array(mask))

    def _source(self, value: Any, manifest_file: str) -> bytes | str:
        """The image's bytes, or its path when it is a local file (decoders read local files lazily)."""
        from ovis_batch.pipeline.manifest import resolve_image_ref
        from ovis_batch.storage import StorageError, location

        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        if not isinstance(value, str) or not value:
            raise ImageInputError("missing_image", f"the {self.image_column!r} value is empty")
        try:
            base = self.manifest.at(manifest_file) if self.manifest is not None else location(manifest_file)
            image = resolve_image_ref(value, base)
        except StorageError as exc:
            raise ImageInputError("bad_image_ref", f"{value!r}: {exc}") from exc
        return image.local_path() if image.is_local else _fetch(image)

    def prepare_one(self, value: Any, manifest_file: str) -> tuple[np.ndarray, list[int], list[int | None]]:
        from ovis_batch.model.images import decode_image
        from ovis_batch.model.preprocess import prepare_image, smart_resize

        source = self._source(value, manifest_file)
        decoded = decode_image(
            source, max_pixels=self.max_pixels, fast=self.fast, pixel_ceiling=self.pixel_ceiling
        )
        if self.input_kind == "patches":
            prepared = prepare_image(
                decoded.image,
                min_pixels=self.min_pixels,
                max_pixels=self.max_pixels,
                source_size=(decoded.width, decoded.height),
            )
            sizes = [prepared.width, prepared.height, prepared.input_width, prepared.input_height]
            return prepared.patches, list(prepared.grid_thw), [*sizes, prepared.visual_tokens]
        # Ovis2 tiles images itself: send RGB, already shrunk to the pixel budget to bound transfer size.
        smart_resize(decoded.height, decoded.width, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        image = decoded.image
        if image.width * image.height > self.max_pixels:
            scale = (self.max_pixels / (image.width * image.height)) ** 0.5
            image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
        rgb = np.asarray(image, dtype=np.uint8)
        return rgb, [], [decoded.width, decoded.height, image.width, image.height, None]

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = self.select(batch)
        n = batch.num_rows
        columns: dict[str, list] = {f.name: [] for f in INTERNAL_FIELDS}
        images = batch.column(self.image_column).to_pylist()
        files = batch.column("path").to_pylist() if "path" in batch.column_names else [""] * n
        prompts = batch.column(self.prompt_column).to_pylist() if self.prompt_column else [None] * n
        for value, manifest_file, row_prompt in zip(images, files, prompts, strict=True):
            started = time.perf_counter()
            pixels, grid, sizes, error = None, None, [None] * 5, None
            try:
                array, grid, sizes = self.prepare_one(value, manifest_file or "")
                pixels, shape = array.tobytes(), list(array.shape)
            except ImageInputError as exc:
                error, shape = exc, None
            except Exception as exc:  # an unforeseen decoder failure is still this row's problem only
                error, shape = ImageInputError("decode_error", f"{type(exc).__name__}: {exc}"), None
            columns["prompt"].append(row_prompt if row_prompt else self.prompt)
            columns["pixels"].append(pixels)
            columns["pixels_shape"].append(shape)
            columns["grid_thw"].append(grid if error is None and grid else None)
            for name, value_ in zip(
                ("width", "height", "input_width", "input_height", "visual_tokens"), sizes, strict=True
            ):
                columns[name].append(value_)
            columns["status"].append("error" if error else "ok")
            columns["error_type"].append(error.error_type if error else None)
            columns["error_message"].append(str(error) if error else None)
            columns["decode_s"].append(time.perf_counter() - started)
        arrays = {self.id_column: batch.column(self.id_column)}
        arrays.update({f.name: pa.array(columns[f.name], f.type) for f in INTERNAL_FIELDS})
        arrays.update({f.name: batch.column(f.name) for f in self.passthrough})
        return pa.table(arrays)


def _resolve(value: Any) -> Any:
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def token_budget_batches(tokens: list[int], budget: int, max_rows: int) -> list[list[int]]:
    """Row indices grouped so that each group's visual tokens stay within `budget` (sizes sorted).

    Sorting by size puts similar images together (little padding); an image larger than the budget
    runs alone rather than being refused.
    """
    order = sorted(range(len(tokens)), key=lambda i: tokens[i])
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        if current and (total + tokens[i] > budget or len(current) >= max_rows):
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += tokens[i]
    if current:
        groups.append(current)
    return groups


class CaptionPredictor:
    """One resident model per actor; rows with status ok get a caption (and an embedding)."""

    def __init__(
        self,
        *,
        model_source: str,
        id_column: str,
        passthrough: list[pa.Field],
        device: str,
        dtype: str,
        generation: dict[str, Any],
        attn_implementation: str = "sdpa",
        embedding: str | None,
        embedding_dim: int | None,
        batch_visual_tokens: int,
        batch_rows: int,
    ) -> None:
        import torch

        import ovis_batch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = ovis_batch.load_model(
            model_source,
            device=device,
            dtype=None if dtype == "auto" else dtype,
            attn_implementation=attn_implementation,
        )
        self.id_column, self.passthrough = id_column, passthrough
        self.generation, self.embedding, self.embedding_dim = generation, embedding, embedding_dim
        self.budget, self.max_rows = batch_visual_tokens, batch_rows

    def _run(self, items: list[Any], prompts: list[str]) -> list[Any]:
        """Generate for a batch; on failure split in halves down to single rows (OOM, odd inputs)."""
        try:
            return self.model.generate(items, prompts, embedding=self.embedding, **self.generation)
        except Exception as exc:
            if len(items) == 1:
                return [exc]
            _free_accelerator_memory()
            half = len(items) // 2
            return self._run(items[:half], prompts[:half]) + self._run(items[half:], prompts[half:])

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        rows = batch.to_pylist()
        results: list[Any] = [None] * len(rows)
        ok = [i for i, r in enumerate(rows) if r["status"] == "ok"]
        tokens = [rows[i]["visual_tokens"] or (len(rows[i]["pixels"]) // PATCH_DIM // 4) for i in ok]
        for group in token_budget_batches(tokens, self.budget, self.max_rows):
            indices = [ok[g] for g in group]
            items = [model_input(rows[i]) for i in indices]
            for i, result in zip(
                indices, self._run(items, [rows[i]["prompt"] for i in indices]), strict=True
            ):
                results[i] = result
        return predicted_table(
            batch, rows, results, self.id_column, self.passthrough, self.embedding_dim, started
        )


class VllmCaptionPredictor:
    """One vLLM engine per actor (plus the runtime model when embeddings are asked for), on the replica's
    GPU (vLLM's CUDA build) or on CPU (its CPU build).

    `__call__` is a coroutine: Ray Data keeps `vllm_batches_in_flight` batches on the actor at once, and
    every row is its own request, so the engine's running batch is refilled as rows finish, across
    batch boundaries. Output rows, error rows and the schema are the same as `CaptionPredictor`'s.
    The engine runs in processes of its own: it is stopped when Ray Data lets the actor go (`__del__`),
    so that they do not outlive it and report the lost actor as an engine failure.
    """

    def __init__(
        self,
        *,
        model_source: str,
        id_column: str,
        passthrough: list[pa.Field],
        device: str,
        dtype: str,
        generation: dict[str, Any],
        attn_implementation: str = "sdpa",
        embedding: str | None,
        embedding_dim: int | None,
        min_pixels: int,
        max_pixels: int,
        vllm: dict[str, Any],
    ) -> None:
        from ovis_batch.checkpoints import resolve_model_source
        from ovis_batch.model.checkpoint import resolve_source
        from ovis_batch.model.vllm_engine import load_vllm_model

        self.model = None
        if dtype == "auto":  # as the hf engine: bf16 on GPU, fp32 on CPU
            dtype = "bfloat16" if device == "cuda" else "float32"
        self.model = load_vllm_model(
            resolve_source(resolve_model_source(model_source)),
            name=model_source,
            device=device,
            dtype=dtype,
            max_new_tokens=generation["max_new_tokens"],
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            embedding=embedding,
            attn_implementation=attn_implementation,
            **vllm,
        )
        self.id_column, self.passthrough = id_column, passthrough
        self.generation, self.embedding, self.embedding_dim = generation, embedding, embedding_dim

    def close(self) -> None:
        """Stop the engine; safe to call twice."""
        model, self.model = getattr(self, "model", None), None
        if model is not None:
            model.close()

    def __del__(self) -> None:
        self.close()

    async def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        rows = batch.to_pylist()
        results: list[Any] = [None] * len(rows)
        ok = [i for i, r in enumerate(rows) if r["status"] == "ok"]
        if ok:
            try:
                outputs = await self.model.agenerate(
                    [model_input(rows[i]) for i in ok],
                    [rows[i]["prompt"] for i in ok],
                    embedding=self.embedding,
                    **self.generation,
                )
            except Exception as exc:  # settings the engine refuses: every row says why
                outputs = [exc] * len(ok)
            for i, result in zip(ok, outputs, strict=True):
                results[i] = result
        return predicted_table(
            batch, rows, results, self.id_column, self.passthrough, self.embedding_dim, started
        )


def model_input(row: dict[str, Any]) -> Any:
    """A decoded row's model input: a PreparedImage (Ovis2.5 patches) or an RGB array (Ovis2)."""
    array = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(row["pixels_shape"])
    if row["grid_thw"] is None:
        return array
    sizes = [row[k] for k in ("width", "height", "input_width", "input_height")]
    return PreparedImage(array, tuple(row["grid_thw"]), *sizes)


def predicted_table(
    batch: pa.Table,
    rows: list[dict],
    results: list[Any],
    id_column: str,
    passthrough: list[pa.Field],
    embedding_dim: int | None,
    started: float,
) -> pa.Table:
    """The model stage's output rows (results or errors) in the contract's schema, one per input row."""
    elapsed = time.perf_counter() - started
    out = _output_rows(rows, results, id_column, elapsed / max(1, len(rows)))
    table = pa.Table.from_pylist(
        out, schema=predicted_schema(batch.schema.field(id_column), passthrough, embedding_dim)
    )
    check_rows("inference", id_column, batch, table)
    return table


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def predicted_schema(id_field: pa.Field, passthrough: list[pa.Field], embedding_dim: int | None) -> pa.Schema:
    from ovis_batch.pipeline.output import output_schema

    contract = output_schema(id_field.name, id_field.type, embedding_dim, passthrough)
    return contract.append(pa.field("decode_s", pa.float64())).append(pa.field("infer_s", pa.float64()))


def _output_rows(rows: list[dict], results: list[Any], id_column: str, infer_s: float) -> list[dict]:
    out = []
    for row, result in zip(rows, results, strict=True):
        record = {k: v for k, v in row.items() if k not in ("prompt", "pixels", "pixels_shape", "grid_thw")}
        record.update(
            caption=None, reasoning=None, thinking_truncated=None, finish_reason=None, embedding=None
        )
        record.update(prompt_tokens=None, output_tokens=None, reasoning_tokens=None, infer_s=infer_s)
        if row["status"] != "ok":
            pass
        elif isinstance(result, Exception):
            oom = "out of memory" in str(result).lower()
            record.update(
                status="error",
                error_type="out_of_memory" if oom else "inference_error",
                error_message=f"{type(result).__name__}: {result}"[:2000],
            )
        elif not result.ok:
            record.update(status="error", error_type=result.error_type, error_message=result.error_message)
        else:
            record.update(
                caption=result.text,
                reasoning=result.reasoning,
                thinking_truncated=result.thinking_truncated,
                finish_reason=result.finish_reason,
                prompt_tokens=result.prompt_tokens,
                output_tokens=result.output_tokens,
                reasoning_tokens=result.reasoning_tokens,
                embedding=None if result.embedding is None else result.embedding.tolist(),
            )
        out.append(record)
    return out


def write_shard_batch(
    batch: pa.Table, *, output_uri: str, id_column: str, schema: pa.Schema, metadata: dict[str, Any]
) -> pa.Table:
    """Rows in the output contract -> one committed shard; returns that shard's statistics row.

    A plain function run as Ray tasks (no actor to start), so shards are committed as soon as their rows
    are done: what a crash can lose is bounded by the rows in flight, not by a writer's start-up.
    """
    from ovis_batch.pipeline.output import OutputFolder, write_shard

    folder = OutputFolder.open(output_uri)
    table = batch.select(schema.names).cast(schema)
    path = write_shard(folder, table, id_column, metadata)
    status = batch.column("status").to_pylist()
    errors = Counter(
        t for s, t in zip(status, batch.column("error_type").to_pylist(), strict=True) if s != "ok"
    )
    stats = {
        "shard": [path],
        "rows": [batch.num_rows],
        "ok": [status.count("ok")],
        "errors": [json.dumps(dict(errors))],
        "output_tokens": [int(sum(v or 0 for v in batch.column("output_tokens").to_pylist()))],
        "decode_s": [float(sum(v or 0 for v in batch.column("decode_s").to_pylist()))],
        "infer_s": [float(sum(v or 0 for v in batch.column("infer_s").to_pylist()))],
    }
    return pa.table(stats)
