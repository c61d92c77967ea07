"""decode_image: every bad input gets its error type, EXIF orientation, mode conversion, draft decoding."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from ovis_batch.model.images import DecodedImage, decode_image, to_rgb
from ovis_batch.model.preprocess import DEFAULT_MAX_PIXELS, ImageInputError, prepare_image, smart_resize

DRAFTING_MAX_PIXELS = 640 * 640  # small enough that a 12 MP photo has room for a 1/2 draft


def encode(image: Image.Image, format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **params)
    return buffer.getvalue()


def exif_with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR (with a correct CRC) claims another size: the pixel data is missing."""
    data = bytearray(encode(Image.new("RGB", (8, 8), (10, 20, 30)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def error_type_of(source, **kwargs) -> str:
    with pytest.raises(ImageInputError) as caught:
        decode_image(source, **kwargs)
    return caught.value.error_type


@pytest.fixture(autouse=True)
def pil_globals_untouched():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    yield
    after = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    assert after == before


@pytest.fixture(scope="module")
def photo_jpeg() -> bytes:
    from skimage import data

    return encode(Image.fromarray(data.chelsea()), "JPEG", quality=90)


@pytest.fixture(scope="module")
def large_photo_jpeg() -> bytes:
    """A 12-megapixel (4000x3000) JPEG with the detail of a camera photo.

    Tiles of skimage's photos at their native resolution: an upscaled photo would be too smooth to show
    how the draft's pixels differ from a full decode.
    """
    from skimage import data

    tiles = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    tiles += [np.repeat(gray()[:, :, None], 3, axis=2) for gray in (data.camera, data.grass, data.gravel)]
    canvas = np.zeros((3000, 4000, 3), dtype=np.uint8)
    y, index = 0, 0
    while y < 3000:
        x, row_height = 0, 0
        while x < 4000:
            tile = tiles[index % len(tiles)][: 3000 - y, : 4000 - x]
            canvas[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
            x, row_height, index = x + tile.shape[1], max(row_height, tile.shape[0]), index + 1
        y += row_height
    return encode(Image.fromarray(canvas), "JPEG", quality=90)


# --------------------------------------------------------------------------------------------- sources


def test_bytes_and_path_give_identical_results(tmp_path, photo_jpeg):
    path = tmp_path / "photo.jpg"
    path.write_bytes(photo_jpeg)
    from_bytes, from_path = decode_image(photo_jpeg), decode_image(path)
    from_str = decode_image(str(path))
    assert isinstance(from_bytes, DecodedImage)
    assert (from_bytes.width, from_bytes.height, from_bytes.format) == (451, 300, "JPEG")
    for other in (from_path, from_str):
        assert (other.width, other.height, other.format) == (451, 300, "JPEG")
        np.testing.assert_array_equal(np.asarray(other.image), np.asarray(from_bytes.image))
    assert from_bytes.image.mode == "RGB"


def test_exact_decode_equals_a_plain_pil_decode(photo_jpeg):
    decoded = decode_image(photo_jpeg, fast=False)
    expected = Image.open(io.BytesIO(photo_jpeg)).convert("RGB")
    np.testing.assert_array_equal(np.asarray(decoded.image), np.asarray(expected))


# ---------------------------------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path):
    assert error_type_of(tmp_path / "missing.jpg") == "file_not_found"


def test_directory_is_not_a_file(tmp_path):
    assert error_type_of(tmp_path) == "file_not_found"


def test_empty_file_and_empty_bytes(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert error_type_of(path) == "empty_file"
    assert error_type_of(b"") == "empty_file"


def test_text_with_an_image_name_is_not_an_image(tmp_path):
    path = tmp_path / "page.jpg"
    path.write_text("<html><body>404 Not Found</body></html>")
    with pytest.raises(ImageInputError) as caught:
        decode_image(path)
    assert caught.value.error_type == "not_an_image"
    assert "page.jpg" in str(caught.value) and "<html>" in str(caught.value)


def test_formats_outside_the_accepted_list_are_refused():
    # PIL recognises EPS, but loading it would run Ghostscript on untrusted input.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n0 0 moveto 64 64 lineto stroke\n"
    assert Image.open(io.BytesIO(eps)).format == "EPS"
    assert error_type_of(eps) == "not_an_image"


@pytest.mark.parametrize("keep", [0.5, 0.9, 300], ids=["half", "most", "header_only"])
def test_truncated_jpeg(photo_jpeg, keep):
    cut = int(len(photo_jpeg) * keep) if isinstance(keep, float) else keep
    assert error_type_of(photo_jpeg[:cut], fast=False) == "truncated_image"
    assert error_type_of(photo_jpeg[:cut], fast=True) == "truncated_image"


def test_truncated_png():
    data = encode(Image.effect_noise((128, 128), 40).convert("RGB"), "PNG")
    assert error_type_of(data[: len(data) // 2]) == "truncated_image"


def test_corrupt_jpeg_data_is_a_decode_error(photo_jpeg):
    data = bytearray(photo_jpeg)
    middle = len(data) // 2
    data[middle : middle + 200] = b"\xff" * 200
    assert error_type_of(bytes(data)) == "decode_error"


def test_pixel_ceiling_is_checked_from_the_header_before_decoding():
    bomb = png_claiming_size(15_000, 10_000)  # 150 MP: PIL itself would only warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no DecompressionBombWarning escapes either
        with pytest.raises(ImageInputError) as caught:
            decode_image(bomb, pixel_ceiling=100_000_000)
    # Had the pixels been decoded, the missing data would have given "truncated_image".
    assert caught.value.error_type == "decompression_bomb"
    assert "15000x10000" in str(caught.value) and "100000000" in str(caught.value)


def test_pixel_ceiling_applies_to_small_images_too():
    small = encode(Image.new("RGB", (64, 64)), "PNG")
    assert error_type_of(small, pixel_ceiling=64 * 64 - 1) == "decompression_bomb"
    assert decode_image(small, pixel_ceiling=64 * 64).image.size == (64, 64)


def test_pil_refusal_above_its_own_limit_is_a_decompression_bomb():
    assert error_type_of(png_claiming_size(100_000, 100_000)) == "decompression_bomb"


def test_invalid_pixel_ceiling_is_a_configuration_error(photo_jpeg):
    with pytest.raises(ValueError) as caught:
        decode_image(photo_jpeg, pixel_ceiling=0)
    assert not isinstance(caught.value, ImageInputError)


# ------------------------------------------------------------------------------------ EXIF orientation


def two_colour_image() -> Image.Image:
    """64x32 (width x height): left half red, right half blue."""
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (255, 0, 0)
    pixels[:, 32:] = (0, 0, 255)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(
    ("orientation", "top", "bottom"),
    [(6, (255, 0, 0), (0, 0, 255)), (8, (0, 0, 255), (255, 0, 0))],
)
def test_orientation_swaps_sides_and_rotates_the_right_way(orientation, top, bottom):
    # 6: the camera was turned clockwise; showing it upright rotates the stored image 90 degrees
    # clockwise, so its left edge becomes the top. 8 is the opposite turn.
    data = encode(two_colour_image(), "PNG", exif=exif_with_orientation(orientation))
    decoded = decode_image(data)
    assert (decoded.width, decoded.height) == (32, 64)
    assert decoded.image.size == (32, 64)
    pixels = np.asarray(decoded.image)
    assert (pixels[:32] == top).all() and (pixels[32:] == bottom).all()


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pil_exif_transpose(format, orientation):
    rng = np.random.default_rng(orientation)
    image = Image.fromarray(rng.integers(0, 256, size=(40, 72, 3), dtype=np.uint8))
    data = encode(image, format, exif=exif_with_orientation(orientation))
    decoded = decode_image(data)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    np.testing.assert_array_equal(np.asarray(decoded.image), np.asarray(expected))
    assert (decoded.width, decoded.height) == expected.size


# ------------------------------------------------------------------------------------------------ modes


def decoded_pixels(image: Image.Image, format: str = "PNG", **params) -> np.ndarray:
    data = encode(image, format, **params)
    decoded = decode_image(data)
    assert decoded.image.mode == "RGB"
    return np.asarray(decoded.image)


def test_16_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    image = Image.fromarray(values)
    assert Image.open(io.BytesIO(encode(image, "PNG"))).mode == "I;16"  # what the decoder produces
    pixels = decoded_pixels(image)
    assert pixels[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_palette_transparency_is_composited_over_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    image.paste(1, (0, 0, 4, 8))  # left half: index 1 (blue); right half: index 0 (red, transparent)
    pixels = decoded_pixels(image, transparency=0)
    assert (pixels[:, :4] == (0, 0, 255)).all()
    assert (pixels[:, 4:] == 255).all()


def test_gray_with_alpha_is_composited_over_white():
    luminance = Image.new("L", (3, 1), 0)
    alpha = Image.frombytes("L", (3, 1), bytes([0, 128, 255]))
    pixels = decoded_pixels(Image.merge("LA", (luminance, alpha)))
    assert pixels[0, :, 0].tolist() == [255, 127, 0]


def test_rgba_is_composited_over_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)
    rgba[0, 1] = (200, 100, 50, 0)
    pixels = decoded_pixels(Image.fromarray(rgba))
    assert pixels[0, 0].tolist() == [200, 100, 50]
    assert pixels[0, 1].tolist() == [255, 255, 255]


def test_cmyk_uses_pil_conversion():
    cmyk = Image.new("CMYK", (4, 2), (0, 0, 0, 0))
    cmyk.paste((0, 255, 255, 0), (0, 0, 2, 2))
    pixels = decoded_pixels(cmyk, "TIFF")
    assert (pixels[:, :2] == (255, 0, 0)).all() and (pixels[:, 2:] == 255).all()


def test_cmyk_jpeg_decodes_to_rgb():
    pixels = decoded_pixels(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert np.abs(pixels.astype(int) - (255, 0, 0)).max() <= 3


def test_bilevel_and_gray():
    bilevel = Image.fromarray(np.array([[True, False]]))
    assert decoded_pixels(bilevel)[0].tolist() == [[255, 255, 255], [0, 0, 0]]
    gray = Image.fromarray(np.array([[7, 200]], dtype=np.uint8))
    assert decoded_pixels(gray)[0].tolist() == [[7, 7, 7], [200, 200, 200]]


def test_32_bit_integers_beyond_16_bits_are_stretched():
    values = np.array([[-1000, 99_000, 199_000]], dtype=np.int32)
    pixels = decoded_pixels(Image.fromarray(values), "TIFF")
    assert pixels[0, :, 0].tolist() == [0, 128, 255]


def test_float_images():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert decoded_pixels(unit, "TIFF")[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-2.0, np.nan, 2.0]], dtype=np.float32))
    assert to_rgb(wide).getpixel((0, 0)) == (0, 0, 0)
    assert to_rgb(wide).getpixel((1, 0)) == (0, 0, 0)  # not a number: shown as the minimum
    assert to_rgb(wide).getpixel((2, 0)) == (255, 255, 255)


def test_rgb_is_returned_as_is():
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_rgb(image) is image


def test_mode_without_conversion_is_unsupported():
    premultiplied_gray = Image.new("La", (4, 4))
    with pytest.raises(ImageInputError) as caught:
        to_rgb(premultiplied_gray)
    assert caught.value.error_type == "unsupported_mode"
    assert "'La'" in str(caught.value)


# ------------------------------------------------------------------------------------------ draft mode


def test_draft_keeps_twice_the_target_and_the_grid(large_photo_jpeg):
    limits = {"max_pixels": DRAFTING_MAX_PIXELS}
    target_height, target_width = smart_resize(3000, 4000, **limits)
    assert (target_width, target_height) == (736, 544)

    fast = decode_image(large_photo_jpeg, fast=True, **limits)
    exact = decode_image(large_photo_jpeg, fast=False, **limits)
    assert fast.image.size == (2000, 1500)  # DCT-domain 1/2; 1/4 would fall below 2x the target
    assert fast.image.width >= 2 * target_width and fast.image.height >= 2 * target_height
    assert exact.image.size == (4000, 3000)
    assert (fast.width, fast.height) == (exact.width, exact.height) == (4000, 3000)

    from_fast = prepare_image(fast.image, source_size=(fast.width, fast.height), **limits)
    from_exact = prepare_image(exact.image, source_size=(exact.width, exact.height), **limits)
    assert from_fast.grid_thw == from_exact.grid_thw == (1, 34, 46)
    assert (from_fast.width, from_fast.height) == (4000, 3000)
    difference = np.abs(from_fast.patches.astype(np.int16) - from_exact.patches.astype(np.int16))
    # Measured on this image: mean 0.36 levels of 255, 99th percentile 2.
    assert difference.mean() < 0.6
    assert np.percentile(difference, 99) <= 3


@pytest.mark.parametrize("max_pixels", [DEFAULT_MAX_PIXELS, 1344 * 1792])
def test_no_draft_without_room_for_twice_the_target(large_photo_jpeg, max_pixels):
    # Targets 2048x1536 and 1792x1344: a 1/2 draft of 4000x3000 would keep less than twice either.
    decoded = decode_image(large_photo_jpeg, max_pixels=max_pixels, fast=True)
    assert decoded.image.size == (4000, 3000)
    exact = decode_image(large_photo_jpeg, max_pixels=max_pixels, fast=False)
    np.testing.assert_array_equal(np.asarray(decoded.image), np.asarray(exact.image))


def test_draft_request_follows_exif_orientation(photos):
    stored = Image.fromarray(photos["coffee"]).resize((1600, 1200), Image.Resampling.BICUBIC)
    data = encode(stored, "JPEG", quality=90, exif=exif_with_orientation(6))
    limits = {"min_pixels": 4096, "max_pixels": 25_000}
    target_height, target_width = smart_resize(1600, 1200, **limits)  # upright: portrait
    assert (target_width, target_height) == (128, 160)

    fast = decode_image(data, max_pixels=limits["max_pixels"], fast=True)
    exact = decode_image(data, max_pixels=limits["max_pixels"], fast=False)
    assert (fast.width, fast.height) == (exact.width, exact.height) == (1200, 1600)
    assert exact.image.size == (1200, 1600)
    # 1/4, upright. A request left in upright coordinates (2 x 128 wide against the stored 1600 x 1200)
    # would have stopped at 1/2.
    assert fast.image.size == (300, 400)
    from_fast = prepare_image(fast.image, source_size=(fast.width, fast.height), **limits)
    from_exact = prepare_image(exact.image, source_size=(exact.width, exact.height), **limits)
    assert from_fast.grid_thw == from_exact.grid_thw == (1, 10, 8)
    difference = np.abs(from_fast.patches.astype(np.int16) - from_exact.patches.astype(np.int16))
    assert difference.mean() < 0.6


def test_multi_picture_jpeg_is_drafted_like_a_jpeg(photos):
    first = Image.fromarray(photos["astronaut"]).resize((2048, 2048), Image.Resampling.BICUBIC)
    data = encode(first, "MPO", save_all=True, append_images=[Image.fromarray(photos["coffee"])])
    decoded = decode_image(data, max_pixels=128 * 128, fast=True)
    assert decoded.format == "MPO"
    assert decoded.image.size == (256, 256)  # 1/8 keeps twice the 128x128 target
    assert (decoded.width, decoded.height) == (2048, 2048)


def test_png_is_never_drafted():
    image = Image.new("RGB", (2048, 256), (40, 80, 120))
    decoded = decode_image(encode(image, "PNG"), max_pixels=32 * 32 * 16, fast=True)
    assert decoded.image.size == (2048, 256)
