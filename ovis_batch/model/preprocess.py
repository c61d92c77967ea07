"""Native-resolution preprocessing for Ovis2.5: from an RGB image to the model's uint8 patches.

What lives here: the size rule (`smart_resize`), the one bilinear resize, the patch layout the vision
tower expects (`prepare_image` -> `PreparedImage`), and the uint8 -> float normalisation that a GPU
worker applies on its own device (`normalize_patches`). `ImageInputError` is the per-image error that
becomes an error row. What does not live here: reading and decoding bytes, EXIF orientation and draft
decoding (`images.py`), and anything about the model's weights.

The rules reproduce upstream's image processor exactly (the parity fixture in
`tests/data/ovis25_upstream_tiny` pins them): sides rounded to multiples of 32 with Python's `round`,
one `PIL.Image.resize(..., BILINEAR)` of the whole 8-bit RGB image, rows ordered by 2x2 merge block.
We are stricter than upstream on purpose: an image with a side under 32 px, or an aspect ratio above
200, is an error (upstream silently stretches it).

torch is imported only inside `normalize_patches`, so the CPU decode stage of the pipeline, which
produces uint8 numpy patches, does not pay for importing it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ovis_batch.errors import UsageError

if TYPE_CHECKING:
    import torch

PATCH_SIZE = 16
HIDDEN_STRIDE = 2
FACTOR = PATCH_SIZE * HIDDEN_STRIDE  # every resized side is a multiple of this (32)
DEFAULT_MIN_PIXELS = 448 * 448
DEFAULT_MAX_PIXELS = 1792 * 1792
MIN_SIDE = 32
MAX_ASPECT_RATIO = 200

PATCH_DIM = 3 * PATCH_SIZE * PATCH_SIZE  # one patch row: channel, y, x


class ImageInputError(UsageError, ValueError):
    """A problem with one image, reported as an error row rather than a crash.

    `error_type` is a short, stable snake_case tag stored in the `error_type` column (for example
    "image_too_small", "aspect_ratio_too_large", "decompression_bomb", "decode_error", "empty_file",
    "file_not_found", "not_an_image", "unsupported_mode", "truncated_image"); the message says what was
    wrong, with the numbers, and what to do about it.
    """

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message

    def __reduce__(self):
        # Keep both fields when the error crosses a process boundary (Ray pickles exceptions).
        return (type(self), (self.error_type, self.message))


def validate_pixel_limits(min_pixels: int, max_pixels: int, factor: int = FACTOR) -> None:
    """Raise ValueError when the min/max pixel settings cannot be satisfied."""
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    if min_pixels <= 0 or max_pixels <= 0:
        raise ValueError(f"min_pixels and max_pixels must be positive, got {min_pixels} and {max_pixels}")
    if max_pixels < factor * factor:
        raise ValueError(
            f"max_pixels ({max_pixels}) is below one {factor}x{factor} block ({factor * factor}); "
            "raise it so that at least one visual token fits"
        )
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")


def smart_resize(
    height: int,
    width: int,
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    factor: int = FACTOR,
) -> tuple[int, int]:
    """Return (resized_height, resized_width): multiples of `factor`, aspect kept, area within limits.

    Upstream's rule: round each side to a multiple of `factor` with Python's `round` (halves go to the
    even multiple: 400 -> 384). If that area exceeds `max_pixels`, scale the original sides by
    1/sqrt(h*w/max_pixels) and floor them to multiples of `factor`; if it is below `min_pixels`, scale by
    sqrt(min_pixels/(h*w)) and ceil them. (Near min_pixels == max_pixels the ceil can overshoot
    max_pixels slightly, as upstream does.)

    Stricter than upstream: a side under MIN_SIDE raises ImageInputError("image_too_small") and an aspect
    ratio above MAX_ASPECT_RATIO raises ImageInputError("aspect_ratio_too_large"). Where upstream's floor
    would give a zero side (very elongated images with a small max_pixels), the short side is kept at
    `factor` and the long side shortened so that the area stays within max_pixels.
    """
    validate_pixel_limits(min_pixels, max_pixels, factor)
    height, width = int(height), int(width)
    if min(height, width) < MIN_SIDE:
        raise ImageInputError(
            "image_too_small",
            f"image is {width}x{height} (width x height); both sides must be at least {MIN_SIDE} px. "
            "Upscale or pad the image, or drop it from the manifest.",
        )
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageInputError(
            "aspect_ratio_too_large",
            f"image is {width}x{height} (width x height), aspect ratio "
            f"{max(height, width) / min(height, width):.1f} > {MAX_ASPECT_RATIO}. "
            "Crop or split the image into less elongated pieces.",
        )

    resized_height = round(height / factor) * factor
    resized_width = round(width / factor) * factor
    if resized_height * resized_width > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        resized_height = max(factor, math.floor(height / beta / factor) * factor)
        resized_width = max(factor, math.floor(width / beta / factor) * factor)
        if resized_height * resized_width > max_pixels:
            # Only reachable when a side was clamped to `factor`: shorten the other one.
            if resized_height > resized_width:
                resized_height = max_pixels // (resized_width * factor) * factor
            else:
                resized_width = max_pixels // (resized_height * factor) * factor
    elif resized_height * resized_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        resized_height = math.ceil(height * beta / factor) * factor
        resized_width = math.ceil(width * beta / factor) * factor
    return resized_height, resized_width


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy fields with == has no single truth value
class PreparedImage:
    """One image ready for the vision tower, still as uint8 (normalise on the GPU worker)."""

    patches: np.ndarray  # uint8 [grid_h * grid_w, 3 * 16 * 16], rows in 2x2 merge-block order
    grid_thw: tuple[int, int, int]  # (1, grid_h, grid_w) in 16-px patches
    width: int  # source size as the user sees it (EXIF-oriented, before any draft downscale)
    height: int
    input_width: int  # the size the model saw
    input_height: int

    @property
    def visual_tokens(self) -> int:
        """Number of visual tokens: one per 2x2 block of patches."""
        t, h, w = self.grid_thw
        return t * h * w // (HIDDEN_STRIDE * HIDDEN_STRIDE)


def prepare_image(
    image: Image.Image | np.ndarray,
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    source_size: tuple[int, int] | None = None,
) -> PreparedImage:
    """Resize and patchify one image as upstream does.

    `image` is a PIL image in any mode or a uint8 array shaped HxW, HxWx3 or HxWx4; it is converted to
    RGB (`images.to_rgb`), resized once to `smart_resize`'s size with PIL's bilinear filter and cut into
    16x16 patches. `source_size` is (width, height) of the original image when `image` is a
    draft-downscaled decode of it: the size rule then uses the original size, so the grid is the one the
    full-resolution image would get, and the draft only has to be at least that large.
    """
    # images.py builds on this module (errors, sizes); importing it here keeps imports one-way.
    from ovis_batch.model.images import to_rgb

    if isinstance(image, np.ndarray):
        image = _array_to_image(image)
    rgb = to_rgb(image)
    if source_size is None:
        width, height = rgb.size
    else:
        width, height = source_size
        _check_same_aspect(rgb.size, source_size)
    input_height, input_width = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    resized = rgb.resize((input_width, input_height), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized)
    grid_h, grid_w = input_height // PATCH_SIZE, input_width // PATCH_SIZE
    return PreparedImage(
        patches=patchify(pixels),
        grid_thw=(1, grid_h, grid_w),
        width=int(width),
        height=int(height),
        input_width=input_width,
        input_height=input_height,
    )


def prepare_images(
    images: Sequence[Image.Image | np.ndarray | PreparedImage], *, min_pixels: int, max_pixels: int
) -> list[PreparedImage | ImageInputError]:
    """Each image as model input (prepared ones as they are), or the per-image error that prevents it."""
    out: list[PreparedImage | ImageInputError] = []
    for image in images:
        if isinstance(image, PreparedImage):
            out.append(image)
            continue
        try:
            out.append(prepare_image(image, min_pixels=min_pixels, max_pixels=max_pixels))
        except ImageInputError as exc:
            out.append(exc)
    return out


def patchify(pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] (sides multiples of 32) -> uint8 [H/16 * W/16, 768] in 2x2 merge-block order.

    Rows run over the 2x2 blocks in raster order, within a block over its patches as (row, col); each
    row is one patch flattened as (channel, y, x). One reshape, one transpose, one copy.
    """
    height, width, channels = pixels.shape
    if channels != 3 or height % FACTOR or width % FACTOR:
        raise ValueError(f"expected [H, W, 3] with sides multiples of {FACTOR}, got {pixels.shape}")
    grid_h, grid_w = height // PATCH_SIZE, width // PATCH_SIZE
    s, p = HIDDEN_STRIDE, PATCH_SIZE
    blocks = pixels.reshape(grid_h // s, s, p, grid_w // s, s, p, 3)
    # (block_row, sub_row, y, block_col, sub_col, x, c) -> (block_row, block_col, sub_row, sub_col, c, y, x)
    ordered = blocks.transpose(0, 3, 1, 4, 6, 2, 5)
    return np.ascontiguousarray(ordered).reshape(grid_h * grid_w, PATCH_DIM)


def unpatchify(patches: np.ndarray, grid_thw: tuple[int, int, int]) -> np.ndarray:
    """The inverse of `patchify`: uint8 patches in 2x2 merge-block order -> uint8 [H, W, 3].

    Engines that take an image rather than patches (vLLM) get exactly the pixels the vision tower
    would see here: the resized image, rebuilt without another resize.
    """
    t, grid_h, grid_w = (int(v) for v in grid_thw)
    if (
        t != 1
        or grid_h % HIDDEN_STRIDE
        or grid_w % HIDDEN_STRIDE
        or patches.shape != (grid_h * grid_w, PATCH_DIM)
    ):
        raise ValueError(
            f"patches {patches.shape} do not match the grid {tuple(grid_thw)} of one image "
            f"(expected [{grid_h * grid_w}, {PATCH_DIM}] with even grid sides)"
        )
    s, p = HIDDEN_STRIDE, PATCH_SIZE
    ordered = patches.reshape(grid_h // s, grid_w // s, s, s, 3, p, p)
    # (block_row, block_col, sub_row, sub_col, c, y, x) -> (block_row, sub_row, y, block_col, sub_col, x, c)
    pixels = ordered.transpose(0, 2, 5, 1, 3, 6, 4)
    return np.ascontiguousarray(pixels).reshape(grid_h * p, grid_w * p, 3)


def normalize_patches(patches: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 patches -> pixel values (x/255 - 0.5)/0.5, bit-identical to upstream in float32.

    Runs on the tensor's own device, so the pipeline ships uint8 (4x fewer bytes) and the GPU worker
    expands it. Upstream rescales in float64 (x * 0.00392156862745098), casts to float32, then subtracts
    0.5 and divides by 0.5 in float32. A float32 division by 255 that is correctly rounded gives the same
    256 values, and CPU kernels divide exactly, so the CPU computes directly (a few ms per image). CUDA
    turns a division by a scalar into a multiplication by its reciprocal, which differs in the last bit
    for 111 of the 256 values, so other devices look the values up in a table computed upstream's way.
    `dtype` defaults to float32; other dtypes are cast from the float32 values, as upstream casts its
    pixel values to the model's dtype.
    """
    import torch

    if patches.dtype != torch.uint8:
        raise TypeError(f"normalize_patches expects uint8 patches, got {patches.dtype}")
    if patches.device.type == "cpu":
        pixels = patches.to(torch.float32).div_(255.0).sub_(0.5).div_(0.5)
    else:
        pixels = torch.take(_pixel_value_table(patches.device), patches.long())
    return pixels if dtype in (None, torch.float32) else pixels.to(dtype)


def _pixel_value_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 float32 pixel values, computed in upstream's order of operations."""
    import torch

    rescaled = (torch.arange(256, dtype=torch.float64) * 0.00392156862745098).to(torch.float32)
    return ((rescaled - 0.5) / 0.5).to(device)


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageInputError(
            "unsupported_mode", f"image arrays must be uint8, got {array.dtype}; convert to 8-bit first"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageInputError(
            "unsupported_mode", f"image arrays must be HxW, HxWx3 or HxWx4, got shape {array.shape}"
        )
    # For uint8, PIL infers L, RGB or RGBA from the shape.
    return Image.fromarray(np.ascontiguousarray(array))


def _check_same_aspect(image_size: tuple[int, int], source_size: tuple[int, int]) -> None:
    """A draft decode shrinks both sides by the same power of two (rounded up): catch swapped sizes."""
    (w, h), (sw, sh) = image_size, source_size
    if min(w, h, sw, sh) <= 0:
        raise ValueError(f"image size {image_size} and source_size {source_size} must be positive")
    scale_x, scale_y = sw / w, sh / h
    # Rounding the draft size up moves each scale by at most about one pixel's worth.
    if abs(scale_x - scale_y) > max(scale_x, scale_y) * (0.02 + 2 / min(w, h)):
        raise ValueError(
            f"source_size {source_size} (width, height) does not match the aspect of the image "
            f"{image_size}; pass the oriented size of the image this one was decoded from"
        )
