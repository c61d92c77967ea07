"""smart_resize, the patch layout and the normalisation, against upstream's reference outputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from ovis_batch.model.preprocess import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    ImageInputError,
    PreparedImage,
    _pixel_value_table,
    normalize_patches,
    patchify,
    prepare_image,
    smart_resize,
    unpatchify,
)

FIXTURE_LIMITS = {"min_pixels": 4096, "max_pixels": 65536}


def patches_by_loops(pixels: np.ndarray) -> np.ndarray:
    """Naive oracle of the layout described in the fixture README (item 3), one patch at a time."""
    grid_h, grid_w = pixels.shape[0] // 16, pixels.shape[1] // 16
    rows = []
    for block_row, block_col in itertools.product(range(grid_h // 2), range(grid_w // 2)):
        for sub_row, sub_col in itertools.product(range(2), range(2)):
            y0, x0 = (2 * block_row + sub_row) * 16, (2 * block_col + sub_col) * 16
            patch = pixels[y0 : y0 + 16, x0 : x0 + 16, :]  # y, x, c
            rows.append(patch.transpose(2, 0, 1).reshape(-1))  # c, y, x
    return np.stack(rows)


def upstream_pixel_values(patches: np.ndarray) -> np.ndarray:
    """Upstream's arithmetic: rescale in float64, cast to float32, then (x - 0.5) / 0.5 in float32."""
    rescaled = (patches.astype(np.float64) * 0.00392156862745098).astype(np.float32)
    half = np.float32(0.5)
    return (rescaled - half) / half


# ------------------------------------------------------------------------------------------ smart_resize


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (96, 96, (96, 96)),  # img0: already a multiple of 32
        (96, 400, (96, 384)),  # img1: 400/32 = 12.5 rounds to the even 12
        (250, 150, (256, 160)),  # img2
    ],
)
def test_smart_resize_fixture_cases(height, width, expected):
    assert smart_resize(height, width, **FIXTURE_LIMITS) == expected


def test_smart_resize_fixture_agrees_with_reference_json(upstream_reference):
    for entry in upstream_reference["images"]:
        resized = smart_resize(entry["height"], entry["width"], **FIXTURE_LIMITS)
        assert list(resized) == entry["resized_hw"]


def test_smart_resize_halves_go_to_even():
    # 80/32 = 2.5 -> 2 and 336/32 = 10.5 -> 10 (Python's round), not 3 and 11.
    assert smart_resize(80, 336, min_pixels=4096) == (64, 320)


@pytest.mark.parametrize(
    ("height", "width", "patches", "tokens"),
    [(448, 448, 784, 196), (1024, 1792, 7168, 1792), (1792, 1792, 12544, 3136)],
)
def test_token_counts_at_default_limits(height, width, patches, tokens):
    prepared = prepare_image(np.zeros((height, width, 3), dtype=np.uint8))
    assert (prepared.input_height, prepared.input_width) == (height, width)
    assert prepared.patches.shape == (patches, 768)
    assert prepared.grid_thw == (1, height // 16, width // 16)
    assert prepared.visual_tokens == tokens


def test_smart_resize_max_branch_floors_from_the_original_area():
    # beta = sqrt(12e6 / 1792^2) = 1.933: 3000/beta = 1551.9 -> 1536, 4000/beta = 2069.2 -> 2048.
    assert smart_resize(3000, 4000) == (1536, 2048)


def test_smart_resize_max_branch_when_only_rounding_overshoots():
    # 240x240 = 57600 fits 60000, but 240/32 = 7.5 rounds to 8: 256x256 = 65536 does not.
    assert smart_resize(240, 240, min_pixels=4096, max_pixels=60000) == (224, 224)


def test_smart_resize_min_branch_ceils():
    # beta = sqrt(448^2 / 5000) = 6.336: 50*beta = 316.8 -> 320, 100*beta = 633.6 -> 640.
    assert smart_resize(50, 100) == (320, 640)


def test_smart_resize_keeps_a_side_where_upstream_floors_it_to_zero():
    # Upstream gives height 0 here; we keep 32 and shorten the width to stay within max_pixels.
    assert smart_resize(32, 6400, min_pixels=4096, max_pixels=65536) == (32, 2048)


def test_smart_resize_stays_within_limits_at_defaults():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        height, width = (int(v) for v in rng.integers(32, 12000, size=2))
        if max(height, width) / min(height, width) > 200:
            continue
        resized_height, resized_width = smart_resize(height, width)
        assert resized_height % 32 == 0 and resized_width % 32 == 0
        assert DEFAULT_MIN_PIXELS <= resized_height * resized_width <= DEFAULT_MAX_PIXELS, (height, width)


@pytest.mark.parametrize(
    ("height", "width", "error_type"),
    [
        (31, 500, "image_too_small"),
        (500, 31, "image_too_small"),
        (32, 6401, "aspect_ratio_too_large"),
        (6401, 32, "aspect_ratio_too_large"),
    ],
)
def test_smart_resize_rejects_what_upstream_would_stretch(height, width, error_type):
    with pytest.raises(ImageInputError) as caught:
        smart_resize(height, width)
    assert caught.value.error_type == error_type
    assert f"{width}x{height}" in str(caught.value)


def test_smart_resize_accepts_the_limits_themselves():
    assert smart_resize(32, 32, min_pixels=1024) == (32, 32)
    assert smart_resize(32, 6400) == (32, 6400)  # aspect ratio exactly 200


@pytest.mark.parametrize(
    ("min_pixels", "max_pixels"),
    [(0, 65536), (4096, -1), (65537, 65536), (512, 1000)],
)
def test_smart_resize_rejects_impossible_settings(min_pixels, max_pixels):
    with pytest.raises(ValueError) as caught:
        smart_resize(500, 500, min_pixels=min_pixels, max_pixels=max_pixels)
    assert not isinstance(caught.value, ImageInputError)  # a configuration bug, not an error row


# ----------------------------------------------------------------------------------- upstream parity


@pytest.mark.parametrize("index", [0, 1, 2])
def test_prepare_image_matches_upstream(index, upstream_dir, upstream_reference, upstream_tensors):
    entry = upstream_reference["images"][index]
    key = entry["key"]
    with Image.open(upstream_dir / entry["file"]) as image:
        prepared = prepare_image(image, **FIXTURE_LIMITS)

    resized = upstream_tensors[f"{key}.resized_rgb"].numpy()
    assert prepared.patches.dtype == np.uint8
    np.testing.assert_array_equal(prepared.patches, patches_by_loops(resized))
    assert list(prepared.grid_thw) == entry["grid_thw"]
    assert [prepared.input_height, prepared.input_width] == entry["resized_hw"]
    assert (prepared.width, prepared.height) == (entry["width"], entry["height"])
    assert prepared.visual_tokens == entry["visual_tokens"]

    pixel_values = normalize_patches(torch.from_numpy(prepared.patches)).double()
    assert list(pixel_values.shape) == entry["pixel_values_shape"]
    assert abs(float(pixel_values.sum()) - entry["pixel_values_sum"]) < 1e-3
    assert abs(float(pixel_values.abs().sum()) - entry["pixel_values_abs_sum"]) < 1e-3


def test_normalized_patches_equal_upstream_pixel_values_exactly(upstream_dir, upstream_tensors):
    with Image.open(upstream_dir / "img0_shapes_96x96.png") as image:
        prepared = prepare_image(image, **FIXTURE_LIMITS)
    pixel_values = normalize_patches(torch.from_numpy(prepared.patches))
    assert pixel_values.dtype == torch.float32
    assert torch.equal(pixel_values, upstream_tensors["img0.pixel_values"])


# --------------------------------------------------------------------------------------- patch layout


def test_patchify_follows_merge_block_order():
    pixels = np.random.default_rng(1).integers(0, 256, size=(96, 160, 3), dtype=np.uint8)
    np.testing.assert_array_equal(patchify(pixels), patches_by_loops(pixels))


def test_patchify_first_rows_are_the_top_left_block():
    pixels = np.random.default_rng(2).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    patches = patchify(pixels)
    # Row 1 is the block's top-right patch, row 2 its bottom-left one; channel 0 comes first.
    np.testing.assert_array_equal(patches[1, :256].reshape(16, 16), pixels[0:16, 16:32, 0])
    np.testing.assert_array_equal(patches[2, 256:512].reshape(16, 16), pixels[16:32, 0:16, 1])


def test_patchify_rejects_sides_off_the_grid():
    with pytest.raises(ValueError):
        patchify(np.zeros((48, 64, 3), dtype=np.uint8))


def test_unpatchify_rebuilds_the_resized_image():
    pixels = np.random.default_rng(3).integers(0, 256, size=(96, 160, 3), dtype=np.uint8)
    np.testing.assert_array_equal(unpatchify(patchify(pixels), (1, 6, 10)), pixels)


def test_unpatchified_image_is_a_fixed_point_of_preparation():
    """An engine given the rebuilt image and the same limits sees the same grid and the same pixels."""
    photo = Image.fromarray(np.random.default_rng(4).integers(0, 256, size=(250, 150, 3), dtype=np.uint8))
    first = prepare_image(photo, **FIXTURE_LIMITS)
    rebuilt = Image.fromarray(unpatchify(first.patches, first.grid_thw))
    assert rebuilt.size == (first.input_width, first.input_height)
    again = prepare_image(rebuilt, **FIXTURE_LIMITS)
    assert again.grid_thw == first.grid_thw
    np.testing.assert_array_equal(again.patches, first.patches)


def test_unpatchify_rejects_a_grid_that_does_not_match():
    with pytest.raises(ValueError, match="do not match the grid"):
        unpatchify(np.zeros((60, 768), dtype=np.uint8), (1, 6, 8))


# --------------------------------------------------------------------------------------- normalisation


def test_normalize_patches_reproduces_upstream_for_every_byte():
    every_byte = np.arange(256, dtype=np.uint8).reshape(1, 256)
    ours = normalize_patches(torch.from_numpy(every_byte))
    assert torch.equal(ours, torch.from_numpy(upstream_pixel_values(every_byte)))
    assert ours[0, 0] == -1.0 and ours[0, 255] == 1.0


def test_lookup_table_used_off_cpu_holds_the_same_values():
    every_byte = np.arange(256, dtype=np.uint8)
    assert torch.equal(_pixel_value_table(), torch.from_numpy(upstream_pixel_values(every_byte)))


def test_normalize_patches_other_dtypes_are_casts_of_the_float32_values():
    patches = torch.randint(0, 256, (8, 768), dtype=torch.uint8)
    as_float32 = normalize_patches(patches)
    assert torch.equal(normalize_patches(patches, torch.bfloat16), as_float32.to(torch.bfloat16))
    assert normalize_patches(patches, torch.float16).dtype == torch.float16


def test_normalize_patches_rejects_float_input():
    with pytest.raises(TypeError):
        normalize_patches(torch.zeros(4, 768))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_normalize_patches_on_cuda_is_bit_identical_to_cpu():
    every_byte = torch.arange(256, dtype=torch.uint8).repeat(768, 1)
    on_gpu = normalize_patches(every_byte.cuda())
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), normalize_patches(every_byte))


# ------------------------------------------------------------------------------------ prepare_image


def test_array_inputs_match_their_pil_images():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, size=(70, 90), dtype=np.uint8)
    limits = {"min_pixels": 1024, "max_pixels": 65536}
    from_array = prepare_image(rgb, **limits)
    from_pil = prepare_image(Image.fromarray(rgb), **limits)
    np.testing.assert_array_equal(from_array.patches, from_pil.patches)
    from_gray = prepare_image(gray, **limits)
    np.testing.assert_array_equal(
        from_gray.patches, prepare_image(np.repeat(gray[:, :, None], 3, axis=2), **limits).patches
    )


def test_transparent_array_pixels_become_white():
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)  # black, fully transparent
    rgba[:32, :, 3] = 255  # top half opaque black
    prepared = prepare_image(rgba, min_pixels=1024)
    top_left, bottom_left = prepared.patches[0], prepared.patches[8]  # blocks (0, 0) and (1, 0)
    assert (top_left == 0).all() and (bottom_left == 255).all()


@pytest.mark.parametrize(
    "array",
    [np.zeros((64, 64, 3), dtype=np.float32), np.zeros((64, 64, 2), dtype=np.uint8)],
    ids=["float", "two_channels"],
)
def test_unsupported_arrays_are_image_errors(array):
    with pytest.raises(ImageInputError) as caught:
        prepare_image(array)
    assert caught.value.error_type == "unsupported_mode"


def test_too_small_image_is_an_image_error():
    with pytest.raises(ImageInputError) as caught:
        prepare_image(Image.new("RGB", (20, 300)))
    assert caught.value.error_type == "image_too_small"


def test_source_size_sets_the_grid_of_a_downscaled_decode(photos):
    full = Image.fromarray(photos["chelsea"]).resize((1800, 1200), Image.Resampling.BICUBIC)
    half = full.resize((900, 600), Image.Resampling.BOX)
    limits = {"min_pixels": 4096, "max_pixels": 160_000}
    exact = prepare_image(full, **limits)
    drafted = prepare_image(half, source_size=(1800, 1200), **limits)
    assert drafted.grid_thw == exact.grid_thw == (1, 20, 30)
    assert (drafted.width, drafted.height) == (1800, 1200)
    assert (drafted.input_width, drafted.input_height) == (480, 320)
    difference = np.abs(drafted.patches.astype(int) - exact.patches.astype(int))
    assert difference.mean() < 1.0


def test_swapped_source_size_is_refused():
    with pytest.raises(ValueError, match="source_size"):
        prepare_image(Image.new("RGB", (400, 300)), source_size=(600, 800))


def test_prepared_image_is_frozen_and_reports_tokens():
    prepared = prepare_image(np.zeros((64, 96, 3), dtype=np.uint8), min_pixels=1024)
    assert isinstance(prepared, PreparedImage)
    assert prepared.visual_tokens == (64 // 16) * (96 // 16) // 4
    with pytest.raises(AttributeError):
        prepared.width = 1  # type: ignore[misc]


def test_image_input_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(ImageInputError("image_too_small", "too small")))
    assert (error.error_type, str(error)) == ("image_too_small", "too small")
