"""A benchmark row's images as bytes, and several images composed into one.

A row names its images in `image` (base64, a list of base64 strings, raw bytes in Parquet, or the index
of another row whose image it shares) or in `image_path` (paths relative to the benchmark file, or
URIs). `row_images` returns the bytes of each, in order; a cell that cannot be read is an error naming
the row and the column.

Several images per row (a question comparing two pictures) become one image: they are scaled to the
height of the tallest (aspect ratio kept, bilinear), placed side by side left to right in the row's
order on a black canvas, and stored as PNG. This is how VLMEvalKit feeds multi-image questions to models
without multi-image input; the caption job then treats the row like any other, on both engines. The
policy is recorded in the prepared folder and in every report (`COMPOSE_POLICY`), since Ovis2.5's own
evaluation gives such rows the images separately.
"""

from __future__ import annotations

import ast
import base64
import binascii
import io
from collections.abc import Mapping

from PIL import Image, ImageOps, UnidentifiedImageError

from ovis_batch.bench.source import BenchmarkTable, cell_text
from ovis_batch.errors import UsageError
from ovis_batch.pipeline.manifest import resolve_image_ref

COMPOSE_POLICY = (
    "several images per question composed into one: scaled to the tallest one's height, side by side "
    "left to right, PNG"
)
# VLMEvalKit's convention: an `image` cell this short is the index of the row whose image it shares.
IMAGE_REFERENCE_MAX_CHARS = 64


def row_images(table: BenchmarkTable, row: int, images_by_index: Mapping[str, object]) -> list[bytes]:
    """The bytes of every image of data row `row` (1-based); [] when the row has none."""
    record = table.frame.iloc[row - 1]
    image = record["image"] if "image" in table.frame else None
    if _is_bytes(image) or cell_text(image) is not None:
        return [_image_bytes(table, row, item, images_by_index) for item in _items(table, row, "image")]
    if "image_path" in table.frame and cell_text(record["image_path"]) is not None:
        return [_read_path(table, row, path) for path in _items(table, row, "image_path")]
    return []


def compose_side_by_side(images: list[bytes]) -> bytes:
    """One PNG of `images` scaled to a common height and placed left to right (see the module doc)."""
    pictures = [ImageOps.exif_transpose(Image.open(io.BytesIO(b))).convert("RGB") for b in images]
    height = max(p.height for p in pictures)
    scaled = [
        p
        if p.height == height
        else p.resize((max(1, round(p.width * height / p.height)), height), Image.BILINEAR)
        for p in pictures
    ]
    canvas = Image.new("RGB", (sum(p.width for p in scaled), height))
    left = 0
    for picture in scaled:
        canvas.paste(picture, (left, 0))
        left += picture.width
    out = io.BytesIO()
    canvas.save(out, "PNG")
    return out.getvalue()


def check_decodable(table: BenchmarkTable, row: int, images: list[bytes], column: str) -> None:
    """Every image of a row that is going to be composed must open (a single image is left to the
    caption job, where a bad one becomes an error row)."""
    for i, data in enumerate(images, start=1):
        try:
            with Image.open(io.BytesIO(data)) as picture:
                picture.load()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise table.error(
                row, column, f"image {i} of {len(images)} is not a readable image ({exc})"
            ) from exc


def _is_bytes(value: object) -> bool:
    return isinstance(value, bytes | bytearray | memoryview)


def _items(table: BenchmarkTable, row: int, column: str) -> list[object]:
    """A cell's values: a list literal "['a', 'b']" or a list cell gives several, anything else one."""
    value = table.frame.iloc[row - 1][column]
    if _is_bytes(value):
        return [bytes(value)]
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 1 and text[0] == "[" and text[-1] == "]":
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError) as exc:
                raise table.error(row, column, f"looks like a list but is not one ({exc})") from exc
            if not isinstance(parsed, list | tuple) or not parsed:
                raise table.error(row, column, "expected a non-empty list of images")
            return list(parsed)
        return [text]
    if hasattr(value, "__iter__"):
        return list(value)
    raise table.error(row, column, f"expected text or bytes, not {type(value).__name__}")


def _image_bytes(
    table: BenchmarkTable, row: int, item: object, images_by_index: Mapping[str, object]
) -> bytes:
    if _is_bytes(item):
        return bytes(item)
    text = str(item).strip()
    if len(text) <= IMAGE_REFERENCE_MAX_CHARS:
        shared = images_by_index.get(text)
        if not isinstance(shared, str) or len(shared.strip()) <= IMAGE_REFERENCE_MAX_CHARS:
            raise table.error(
                row,
                "image",
                f"{text!r} is too short to be base64 and names no row with an image (a short value is the "
                "index of the row whose image this question shares)",
            )
        text = shared.strip()
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise table.error(row, "image", f"not valid base64 ({exc})") from exc


def _read_path(table: BenchmarkTable, row: int, item: object) -> bytes:
    try:
        return resolve_image_ref(str(item).strip(), table.file).read_bytes()
    except (FileNotFoundError, OSError, UsageError) as exc:
        raise table.error(row, "image_path", f"cannot read {item!r} ({exc})") from exc
