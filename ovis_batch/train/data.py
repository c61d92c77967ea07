"""Fine-tuning data: Parquet (id, image, caption) pairs -> checked pairs -> training examples -> batches.

- `read_pairs` opens the Parquet file, folder or glob as the caption job opens its manifest (any
  filesystem pyarrow or fsspec opens; relative image paths are relative to the Parquet file's folder)
  and keeps the three columns in memory (paths are small; embedded image bytes are not, see
  docs of the command).
- `scan_pairs` checks every pair once before training: a pair without a caption, or whose image does
  not decode or cannot be used (too small, too elongated, a decompression bomb), is skipped and
  counted by reason. The usable rows are fixed for the whole run (saved in the run folder), so that a
  resumed run sees the same data at the same positions.
- `PairDataset` decodes and preprocesses each image when it is drawn, with the caption job's own
  decode stage (`DecodeStage.prepare_one`: same fetch, decode, EXIF, resize and patches as
  inference), and `ExampleBuilder` turns it into token ids with the runtime's prompt builder.
- `PairCollator` right-pads every sequence and packs the images without a batch axis, as the vision
  tower takes them; pixels stay uint8 until the model's device normalises them.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ovis_batch.errors import UsageError
from ovis_batch.model.preprocess import HIDDEN_STRIDE, ImageInputError
from ovis_batch.model.prompts import IMAGE_SUMMARY_PROMPT, TEXT_SUMMARY_PROMPT, PromptBuilder
from ovis_batch.pipeline.manifest import ManifestError, open_manifest
from ovis_batch.pipeline.stages import DecodeStage
from ovis_batch.storage import Location

IGNORE = -100
FILE_COLUMN = "__file"  # the Parquet file a pair came from (relative image paths resolve against it)
MISSING_CAPTION = "missing_caption"
_SCAN_METADATA = b"ovis_batch.pair_scan"
_EXAMPLE_IDS = 5


class PairsError(UsageError, ValueError):
    """Pairs data that cannot be trained on; the message names the file, column or pair."""


@dataclass(frozen=True)
class Pairs:
    """The pairs in file order: `table` has the id, image and caption columns plus FILE_COLUMN."""

    uri: str
    table: pa.Table
    id_column: str
    image_column: str
    caption_column: str
    root: Location  # where the Parquet files are: its filesystem opens the FILE_COLUMN paths
    fingerprint: list[dict[str, Any]]  # name, size and modification time of each file


def read_pairs(uri: str, *, id_column: str, image_column: str, caption_column: str) -> Pairs:
    """Read the three columns of every Parquet file of `uri`; missing columns are an error naming them."""
    import pyarrow.fs as pafs

    columns = [id_column, image_column, caption_column]
    try:
        manifest = open_manifest(uri, columns)
    except ManifestError as exc:
        raise PairsError(str(exc).replace("manifest", "pairs data", 1)) from exc
    parts, fingerprint = [], []
    for path in manifest.files:
        part = pq.read_table(path, columns=columns, filesystem=manifest.fs)
        parts.append(part.append_column(FILE_COLUMN, pa.array([path] * part.num_rows, pa.string())))
        info = manifest.fs.get_file_info(path)
        mtime = info.mtime.timestamp() if info.type == pafs.FileType.File and info.mtime else None
        fingerprint.append({"file": path, "size": info.size, "mtime": mtime})
    table = pa.concat_tables(parts, promote_options="permissive")
    return Pairs(uri, table, id_column, image_column, caption_column, manifest.location, fingerprint)


class PairImages:
    """A pair's image as model input, exactly as the caption job prepares it (its decode stage)."""

    def __init__(
        self,
        *,
        image_column: str,
        root: Location | None,
        min_pixels: int,
        max_pixels: int,
        pixel_ceiling: int,
        fast: bool,
    ) -> None:
        self.stage = DecodeStage(
            id_column="",
            image_column=image_column,
            prompt="",
            prompt_column=None,
            passthrough=[],
            manifest=root,
            input_kind="patches",
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            pixel_ceiling=pixel_ceiling,
            fast=fast,
        )

    def load(self, value: Any, parquet_file: str) -> tuple[np.ndarray, tuple[int, int, int]]:
        """(uint8 patches, grid) or ImageInputError; an unforeseen decoder failure is a decode_error."""
        try:
            patches, grid, _ = self.stage.prepare_one(value, parquet_file)
        except ImageInputError:
            raise
        except Exception as exc:  # the caption job makes the same call an error row, not a crash
            raise ImageInputError("decode_error", f"{type(exc).__name__}: {exc}") from exc
        return patches, tuple(grid)


class ExampleBuilder:
    """Token ids of one training example, built with the runtime's prompts (thinking off)."""

    def __init__(
        self,
        tokenizer,
        chat_template: str,
        *,
        prompt: str,
        max_caption_tokens: int,
        generation: bool,
        contrastive: bool,
        embedding: str,
    ) -> None:
        self.prompts = PromptBuilder(tokenizer, chat_template)
        self.prompt, self.max_caption_tokens = prompt, max_caption_tokens
        self.generation, self.contrastive, self.embedding = generation, contrastive, embedding

    @property
    def pad_id(self) -> int:
        return self.prompts.special.pad

    def caption_ids(self, caption: str) -> tuple[list[int], bool]:
        """The caption's token ids, cut to `max_caption_tokens`, and whether they were cut."""
        ids = self.prompts.encode(caption.strip())
        return ids[: self.max_caption_tokens], len(ids) > self.max_caption_tokens

    def build(self, patches: np.ndarray, grid: tuple[int, int, int], caption: str) -> dict[str, Any]:
        t, h, w = grid
        visual_tokens = t * h * w // (HIDDEN_STRIDE * HIDDEN_STRIDE)
        ids, cut = self.caption_ids(caption)
        text = self.prompts.tokenizer.decode(ids) if cut else caption.strip()
        example: dict[str, Any] = {"patches": patches, "grid": grid}
        if self.generation:
            prompt = self.prompts.build(self.prompt, visual_tokens, thinking=False)
            answer = [*ids, self.prompts.special.im_end]
            example["input_ids"] = prompt + answer
            example["labels"] = [IGNORE] * len(prompt) + answer
        if self.contrastive and self.embedding == "last_token":
            example["image_query_ids"] = self.prompts.build(
                IMAGE_SUMMARY_PROMPT, visual_tokens, thinking=False
            )
            example["text_ids"] = self.prompts.build(
                TEXT_SUMMARY_PROMPT.format(text=text), None, thinking=False
            )
        elif self.contrastive:
            example["text_ids"] = ids
        return example


@dataclass
class PairScan:
    """Which pairs are usable (row numbers in `Pairs.table`), and why the others were skipped."""

    total: int
    rows: list[int]
    visual_tokens: list[int]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    skipped_ids: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few ids
    truncated_captions: int = 0

    def summary(self) -> dict[str, Any]:
        tokens = self.visual_tokens
        return {
            "pairs": self.total,
            "used": len(self.rows),
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "skipped_examples": {k: self.skipped_ids[k] for k in sorted(self.skipped_ids)},
            "truncated_captions": self.truncated_captions,
            "visual_tokens_mean": float(np.mean(tokens)) if tokens else 0.0,
            "visual_tokens_max": int(max(tokens)) if tokens else 0,
        }

    def save(self, path: Path) -> None:
        """Write the scan (rows plus the summary in the file's metadata) atomically."""
        meta = {"total": self.total, "skipped": self.skipped, "skipped_ids": self.skipped_ids}
        meta["truncated_captions"] = self.truncated_captions
        table = pa.table(
            {
                "row": pa.array(self.rows, pa.int64()),
                "visual_tokens": pa.array(self.visual_tokens, pa.int32()),
            }
        ).replace_schema_metadata({_SCAN_METADATA: json.dumps(meta).encode()})
        partial = path.with_name(f".{path.name}.partial")
        pq.write_table(table, partial)
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> PairScan:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {})[_SCAN_METADATA])
        return cls(
            total=meta["total"],
            rows=table.column("row").to_pylist(),
            visual_tokens=table.column("visual_tokens").to_pylist(),
            skipped=meta["skipped"],
            skipped_ids=meta["skipped_ids"],
            truncated_captions=meta["truncated_captions"],
        )


def scan_pairs(pairs: Pairs, images: PairImages, builder: ExampleBuilder, *, workers: int = 4) -> PairScan:
    """Check every pair (caption present, image usable); threads decode in parallel, order is kept."""
    ids = [str(v) for v in pairs.table.column(pairs.id_column).to_pylist()]
    captions = pairs.table.column(pairs.caption_column).to_pylist()
    values = pairs.table.column(pairs.image_column)
    files = pairs.table.column(FILE_COLUMN).to_pylist()

    def check(row: int) -> tuple[str | None, int, bool]:
        caption = captions[row]
        if not isinstance(caption, str) or not caption.strip():
            return MISSING_CAPTION, 0, False
        try:
            _, grid = images.load(values[row].as_py(), files[row])
        except ImageInputError as exc:
            return exc.error_type, 0, False
        t, h, w = grid
        return None, t * h * w // (HIDDEN_STRIDE * HIDDEN_STRIDE), builder.caption_ids(caption)[1]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(check, range(len(ids))))
    scan = PairScan(total=len(ids), rows=[], visual_tokens=[])
    reasons: Counter[str] = Counter()
    for row, (reason, tokens, cut) in enumerate(results):
        if reason is not None:
            reasons[reason] += 1
            examples = scan.skipped_ids.setdefault(reason, [])
            if len(examples) < _EXAMPLE_IDS:
                examples.append(ids[row])
            continue
        scan.rows.append(row)
        scan.visual_tokens.append(tokens)
        scan.truncated_captions += int(cut)
    scan.skipped = dict(reasons)
    return scan


class PairDataset(torch.utils.data.Dataset):
    """The usable pairs as training examples; images are decoded when drawn (in DataLoader workers)."""

    def __init__(self, pairs: Pairs, scan: PairScan, images: PairImages, builder: ExampleBuilder) -> None:
        self.pairs, self.rows = pairs, scan.rows
        self.images, self.builder = images, builder

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        table = self.pairs.table
        value = table.column(self.pairs.image_column)[row].as_py()
        try:
            patches, grid = self.images.load(value, table.column(FILE_COLUMN)[row].as_py())
        except ImageInputError as exc:
            pair_id = table.column(self.pairs.id_column)[row].as_py()
            raise PairsError(
                f"pair {pair_id!r}: its image read fine before training but now fails ({exc}); the data "
                "changed during the run. Restore it, or start a new run"
            ) from exc
        return self.builder.build(patches, grid, table.column(self.pairs.caption_column)[row].as_py())


class PairCollator:
    """Examples -> one batch: right-padded ids (pad token), labels (-100) and masks; packed uint8 pixels."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {
            "pixel_values": torch.from_numpy(np.concatenate([e["patches"] for e in examples])),
            "grid_thws": torch.tensor([e["grid"] for e in examples], dtype=torch.long),
        }
        first = examples[0]
        if "input_ids" in first:
            batch["input_ids"], batch["attention_mask"] = self._pad(examples, "input_ids", self.pad_id)
            batch["labels"], _ = self._pad(examples, "labels", IGNORE)
        if "image_query_ids" in first:
            batch["image_query_ids"], batch["image_query_mask"] = self._pad(
                examples, "image_query_ids", self.pad_id
            )
        if "text_ids" in first:
            batch["text_ids"], batch["text_mask"] = self._pad(examples, "text_ids", self.pad_id)
        return batch

    @staticmethod
    def _pad(examples: list[dict[str, Any]], key: str, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(e[key]) for e in examples)
        ids = torch.full((len(examples), width), fill, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, : len(e[key])] = torch.tensor(e[key], dtype=torch.long)
            mask[i, : len(e[key])] = 1
        return ids, mask
