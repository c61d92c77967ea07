"""Image decoding: bytes or a local path -> an EXIF-oriented RGB PIL image, or an ImageInputError.

What lives here: reading the source, refusing what is not a usable image (missing or empty file, not an
image, truncated or corrupt data, decompression bombs, modes with no RGB meaning) with an error type
for the error row, EXIF orientation, JPEG draft decoding, and the conversion of every PIL mode to
8-bit RGB (`to_rgb`, also used by `preprocess.prepare_image`). What does not: the size rule, the resize
and the patches (`preprocess.py`). No torch here.

Two decoding modes:

- `fast=True` (the default, for the batch job). Nightly annotation runs over camera photos far above
  `max_pixels`; for a JPEG at least four times the model's input size on each side, `Image.draft`
  lets libjpeg downscale by 1/2, 1/4 or 1/8 inside the DCT, which skips much of the decoding work (a
  12 MP photo drafted at 1/2 reaches model inputs about 2x faster, see `benchmarks/README.md`). The
  draft always keeps at least twice the size `smart_resize` picks on each side (`DRAFT_MARGIN`), so the
  final bilinear resize still shrinks by 2x or more and the grid (the number of visual tokens) is the
  one of exact mode. The pixels then differ from upstream's by 0.2-0.4 of 255 levels on average (99th
  percentile 1-2) on detailed photo content, less than a quality-90 JPEG's own compression error after
  the same resize (0.4-0.6). A draft that keeps only 1x the target leaves the final resize too little
  shrinking to smooth like upstream's and differs 2-4x more (0.8-1.6 levels on average, 99th
  percentile up to 10), so it is not used. Images without room for a 2x-margin draft decode exactly as
  in exact mode: at the default `max_pixels` (1792x1792) that is every photo under about 50
  megapixels; smaller `max_pixels` settings draft much sooner.
- `fast=False` (parity tests, benchmark scoring): a full decode followed, in `prepare_image`, by one
  bilinear resize, identical to upstream.

The runtime's `generate(PIL images)` path receives already decoded images and never drafts.

PIL globals are left alone: the pixel ceiling is checked here from the header size before any pixel is
decoded (PIL's own open-time refusal above 2 * `Image.MAX_IMAGE_PIXELS`, about 179 megapixels by
default, still applies and is reported as the same error), and `ImageFile.LOAD_TRUNCATED_IMAGES` is
never set, so a truncated file is an error, not a grey bottom half. (A host process that sets that flag
itself disables the truncation check for everyone, this module included.)
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from ovis_batch.model.preprocess import (
    DEFAULT_MAX_PIXELS,
    FACTOR,
    ImageInputError,
    smart_resize,
    validate_pixel_limits,
)

DEFAULT_PIXEL_CEILING = 200_000_000
DRAFT_MARGIN = 2  # a JPEG draft keeps at least this many times the model's input size on each side
# The raster formats photo collections hold (those registered in this PIL build are tried; JPEG also
# opens MPO). Anything else PIL could open is "not_an_image": EPS, for one, would run Ghostscript on
# untrusted input.
ACCEPTED_FORMATS = (
    "JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF", "JPEG2000", "PPM", "TGA", "ICO",
)  # fmt: skip

# What PIL raises on bad data besides its own error classes (plugins parse headers in Python).
_PIL_DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
_DRAFT_FORMATS = ("JPEG", "MPO")  # MPO: the multi-picture JPEG some cameras write
# EXIF orientation -> the transpose that shows the image upright (the table ImageOps.exif_transpose uses;
# applied here without its metadata rewriting, which can trip over malformed EXIF blocks).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # orientations that exchange width and height
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
_PLAIN_MODES = ("1", "L", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image and the size the user knows it by."""

    image: Image.Image  # RGB, EXIF-oriented, possibly draft-downscaled
    width: int  # original oriented size, before any draft downscale
    height: int
    format: str | None  # PIL's format name ("JPEG", "PNG", ...)


def decode_image(
    source: bytes | str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fast: bool = True,
    pixel_ceiling: int = DEFAULT_PIXEL_CEILING,
) -> DecodedImage:
    """Decode image bytes or a local file into an oriented RGB image.

    Raises ImageInputError for a per-image problem ("file_not_found", "read_error", "empty_file",
    "not_an_image", "decompression_bomb", "truncated_image", "decode_error", "unsupported_mode").
    `max_pixels` must be the value later given to `prepare_image`: with `fast=True` it decides how far
    a large JPEG may be draft-downscaled. Images above `pixel_ceiling` pixels are refused from their
    header, before decoding. Pass `DecodedImage.width/height` to `prepare_image` as `source_size`.
    """
    if pixel_ceiling <= 0:
        raise ValueError(f"pixel_ceiling must be positive, got {pixel_ceiling}")
    validate_pixel_limits(FACTOR * FACTOR, max_pixels)
    data, label = _read_source(source)
    image = _open(data, label)
    image_format = image.format  # transposing makes a new image without it

    stored_width, stored_height = image.size
    if stored_width * stored_height > pixel_ceiling:
        raise ImageInputError(
            "decompression_bomb",
            f"{label}: {stored_width}x{stored_height} = {stored_width * stored_height} pixels exceeds the "
            f"pixel ceiling of {pixel_ceiling}; raise pixel_ceiling if the image is genuine, or downscale "
            "it before ingesting",
        )
    if fast and image.format in _DRAFT_FORMATS:
        _draft(image, max_pixels)

    try:
        image.load()
    except _PIL_DATA_ERRORS as error:
        raise _data_error(error, label, f"{image_format} data") from error

    # Read after loading: some formats (PNG) may carry their EXIF block after the pixel data.
    orientation = _orientation(image)
    width, height = (
        (stored_height, stored_width)
        if orientation in _SWAPPING_ORIENTATIONS
        else (stored_width, stored_height)
    )
    if orientation != 1:
        image = image.transpose(_ORIENTATION_TRANSPOSE[orientation])
    return DecodedImage(image=to_rgb(image), width=width, height=height, format=image_format)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    - RGB is returned as is; 1, L, CMYK, YCbCr, LAB, HSV and RGBX use PIL's conversion.
    - Transparency (RGBA, LA, PA, RGBa, and P, L or RGB with a transparency key) is composited over
      white, so transparent areas do not turn into whatever colour the hidden pixels happen to hold.
    - 16-bit integers (I;16*, and I when its values fit 0..65535) are scaled, 65535 -> 255, rounded.
      I beyond 16 bits, and F outside [0, 1], are stretched from their own minimum to maximum; F within
      [0, 1] is multiplied by 255. Never clipped.
    Other modes raise ImageInputError("unsupported_mode").
    """
    mode = image.mode
    if "transparency" in image.info and mode in ("1", "L", "RGB", "P"):
        return _over_white(image.convert("RGBA"))
    if mode == "RGB":
        return image
    if mode in _PLAIN_MODES or mode == "P":
        return image.convert("RGB")
    if mode in _ALPHA_MODES:
        return _over_white(image if mode == "RGBA" else image.convert("RGBA"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_8bit(np.asarray(image), mode)).convert("RGB")
    raise ImageInputError(
        "unsupported_mode",
        f"PIL mode {mode!r} has no conversion to RGB here; convert the image to RGB, RGBA or L first",
    )


def _read_source(source: bytes | str | os.PathLike) -> tuple[bytes, str]:
    """Return the encoded bytes and a label for error messages."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        label = f"<{len(data)} bytes>"
    else:
        path = Path(os.fspath(source))
        label = str(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError as error:
            raise ImageInputError(
                "file_not_found", f"{label}: no such file; check the path in the manifest"
            ) from error
        except IsADirectoryError as error:
            raise ImageInputError(
                "file_not_found", f"{label} is a directory, not an image file; check the path in the manifest"
            ) from error
        except OSError as error:
            raise ImageInputError(
                "read_error", f"{label}: cannot read the file ({error}); check its permissions"
            ) from error
    if not data:
        raise ImageInputError("empty_file", f"{label} is empty (0 bytes); re-fetch or re-export the image")
    return data, label


def _open(data: bytes, label: str) -> Image.Image:
    """Open the header only; no pixels are decoded yet."""
    Image.init()  # loads PIL's format plugins once; later calls return at once
    formats = [name for name in ACCEPTED_FORMATS if name in Image.OPEN]
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS (about 89 megapixels); our own ceiling decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError as error:
        raise ImageInputError(
            "not_an_image",
            f"{label}: not an image in an accepted format ({', '.join(formats)}; the data starts with "
            f"{data[:8]!r}); check that the source is an image and not, for example, an HTML error page",
        ) from error
    except Image.DecompressionBombError as error:
        raise ImageInputError(
            "decompression_bomb", f"{label}: {error} Downscale the image before ingesting it."
        ) from error
    except _PIL_DATA_ERRORS as error:
        raise _data_error(error, label, "image header") from error


def _data_error(error: Exception, label: str, what: str) -> ImageInputError:
    """Classify what PIL raised while reading encoded data."""
    if "truncated" in str(error).lower():
        return ImageInputError(
            "truncated_image", f"{label}: the {what} ends early ({error}); re-fetch or re-encode the file"
        )
    return ImageInputError(
        "decode_error", f"{label}: cannot decode the {what} ({error}); the file is corrupt"
    )


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8), 1 when absent or invalid."""
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _draft(image: Image.Image, max_pixels: int) -> None:
    """Ask libjpeg for a DCT-domain downscale that keeps at least DRAFT_MARGIN x the model's input size.

    A draft can only halve a side (or quarter, or eighth it), and PIL picks the largest such scale
    that keeps both sides at or above the requested size, so asking for DRAFT_MARGIN x smart_resize's
    target guarantees the final bilinear resize shrinks by at least that much (see the module docstring
    for why 2). Any image more than twice its target on both sides is in smart_resize's max_pixels
    branch (rounding a side to a multiple of 32 never halves it), where the target does not depend on
    min_pixels: the smallest valid min_pixels stands in for it here.
    """
    stored_width, stored_height = image.size
    # A JPEG's EXIF block is parsed at open, so this reads no pixels. The target is for the upright
    # image; the request is in stored orientation.
    swaps = _orientation(image) in _SWAPPING_ORIENTATIONS
    width, height = (stored_height, stored_width) if swaps else (stored_width, stored_height)
    try:
        target_height, target_width = smart_resize(
            height, width, min_pixels=FACTOR * FACTOR, max_pixels=max_pixels
        )
    except ImageInputError:
        return  # too small or too elongated: prepare_image reports it; no draft for it
    upright_request = (DRAFT_MARGIN * target_width, DRAFT_MARGIN * target_height)
    request = upright_request[::-1] if swaps else upright_request
    if stored_width >= 2 * request[0] and stored_height >= 2 * request[1]:  # else no draft scale fits
        image.draft("RGB", request)


def _over_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale a single-channel high-depth array to uint8 without clipping (see `to_rgb`)."""
    if mode != "F" and values.min() >= 0 and values.max() <= 65535:
        # 16-bit data: round(v * 255 / 65535) in exact integer arithmetic.
        return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = values[finite].min(), values[finite].max()
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    if mode == "F" and low >= 0.0 and high <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.rint((values - low) * scale).astype(np.uint8)
