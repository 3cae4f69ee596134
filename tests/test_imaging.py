"""clipcore.imaging: parity with transformers' image processors, mode conversion, decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipcore.imaging import ImageDecodeError, ImageTransform, decode_image, to_rgb


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth image with some noise: resampling differences show up, unlike on flat colours."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], -1)
    noisy = base + rng.normal(0, 20, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def _gradient16(width: int = 64, height: int = 4) -> np.ndarray:
    return np.tile(np.linspace(0, 65535, width), (height, 1)).astype(np.uint16)


# ------------------------------------------------------------------ parity with transformers


@pytest.mark.parametrize("width,height", [(50, 37), (37, 50), (32, 32), (20, 90)])
def test_clip_processor_parity(width, height):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transform = ImageTransform.from_processor_config(proc.to_dict())
    img = _photo(width, height)
    expected = proc(images=img, return_tensors="np")["pixel_values"][0]
    got = transform(img)
    assert got.shape == expected.shape == (3, 32, 32)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_clip_processor_parity_non_square_crop():
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 24, "width": 36})
    transform = ImageTransform.from_processor_config(proc.to_dict())
    img = _photo(50, 37, seed=1)
    expected = proc(images=img, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(transform(img), expected, atol=1e-5)
    assert transform.output_size == (24, 36)


@pytest.mark.parametrize("width,height", [(50, 37), (37, 50)])
def test_siglip_style_processor_parity(width, height):
    from transformers import SiglipImageProcessor

    proc = SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=0.5, image_std=0.5)
    cfg = proc.to_dict()
    transform = ImageTransform.from_processor_config(cfg)
    assert transform.crop_size == (32, 32) and transform.mean == (0.5, 0.5, 0.5)
    img = _photo(width, height, seed=2)
    expected = proc(images=img, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(transform(img), expected, atol=1e-5)


def test_from_processor_config_scalar_mean_and_no_crop():
    cfg = {"size": {"height": 20, "width": 30}, "image_mean": 0.5, "image_std": 0.25, "resample": 2}
    t = ImageTransform.from_processor_config({**cfg, "do_center_crop": False})
    assert t.size == (20, 30) and t.output_size == (20, 30)
    assert t.std == (0.25, 0.25, 0.25) and t.resample == "bilinear"
    assert t(_photo(50, 37)).shape == (3, 20, 30)


def test_with_size_keeps_normalisation():
    t = ImageTransform(size=32, crop_size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3).with_size(16)
    assert t.output_size == (16, 16) and t.mean == (0.5,) * 3
    assert t(_photo(50, 37)).shape == (3, 16, 16)


def test_small_image_is_padded_to_crop():
    t = ImageTransform(size=(8, 8), crop_size=(16, 16))
    assert t(_photo(8, 8)).shape == (3, 16, 16)


# ------------------------------------------------------------------ serialisation


def test_to_dict_from_dict_round_trip():
    for t in (
        ImageTransform(),
        ImageTransform(size=(20, 30), crop_size=None, mean=(0.5,) * 3, std=(0.5,) * 3, resample="bilinear"),
        ImageTransform(size=40, crop_size=(24, 36), rescale_factor=1.0),
    ):
        assert ImageTransform.from_dict(t.to_dict()) == t
        import json

        assert ImageTransform.from_dict(json.loads(t.to_json())) == t


def test_unknown_keys_and_bad_values_rejected():
    with pytest.raises(ValueError, match="unknown image transform keys.*interpolation"):
        ImageTransform.from_dict({"size": 32, "interpolation": "bicubic"})
    with pytest.raises(ValueError, match="resample"):
        ImageTransform(resample="cubic")
    with pytest.raises(ValueError, match="3 channels"):
        ImageTransform(mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="no fixed output size"):
        ImageTransform(size=32, crop_size=None).output_size


# ------------------------------------------------------------------ to_rgb


def _rgb(img: Image.Image) -> np.ndarray:
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out)


def test_to_rgb_grayscale():
    arr = _rgb(Image.fromarray(np.array([[0, 100, 255]], np.uint8), "L"))
    assert arr.tolist() == [[[0, 0, 0], [100, 100, 100], [255, 255, 255]]]


def test_to_rgb_rgba_transparent_becomes_white():
    arr = np.zeros((1, 3, 4), np.uint8)
    arr[0, 0] = (10, 20, 30, 0)  # fully transparent (dark colour underneath): white, not black
    arr[0, 1] = (10, 20, 30, 255)  # opaque: unchanged
    arr[0, 2] = (0, 0, 0, 128)  # half-transparent black over white: mid grey
    out = _rgb(Image.fromarray(arr, "RGBA"))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    assert 120 <= out[0, 2, 0] <= 130


def test_to_rgb_custom_background():
    img = Image.fromarray(np.zeros((1, 1, 4), np.uint8), "RGBA")
    assert np.asarray(to_rgb(img, background=(0, 255, 0)))[0, 0].tolist() == [0, 255, 0]


def test_to_rgb_palette_with_transparency():
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0  # palette entry 0 (black) is transparent
    # Round-trip through PNG so the transparency is the file's, as it is for real images.
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    reopened = Image.open(io.BytesIO(buf.getvalue()))
    assert reopened.mode == "P" and "transparency" in reopened.info
    out = _rgb(reopened)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [200, 10, 10]


def test_to_rgb_palette_without_transparency():
    img = Image.new("P", (1, 1))
    img.putpalette([5, 6, 7] + [0] * 765)
    assert _rgb(img)[0, 0].tolist() == [5, 6, 7]


def test_to_rgb_la():
    arr = np.array([[[100, 0], [100, 255]]], np.uint8)
    out = _rgb(Image.fromarray(arr, "LA"))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [100, 100, 100]


def _assert_gradient(out: np.ndarray) -> None:
    row = out[0, :, 0].astype(int)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert row[0] <= 1 and row[-1] >= 254, row  # full range, not clipped to white
    assert (np.diff(row) >= 0).all() and len(np.unique(row)) > 50  # the gradient survives


def test_to_rgb_16bit_gradient_is_scaled_not_clipped():
    img = Image.fromarray(_gradient16())  # uint16 -> mode I;16
    assert img.mode == "I;16"
    _assert_gradient(_rgb(img))


def test_to_rgb_16bit_png_reopened():
    buf = io.BytesIO()
    Image.fromarray(_gradient16()).save(buf, format="PNG")
    reopened = Image.open(io.BytesIO(buf.getvalue()))
    assert reopened.mode in ("I", "I;16")  # Pillow < 10.? opens 16-bit PNG as "I", newer as "I;16"
    _assert_gradient(_rgb(reopened))
    _assert_gradient(_rgb(reopened.convert("I")))


def test_to_rgb_mode_i_8bit_range_kept():
    img = Image.fromarray(np.array([[0, 128, 255]], np.int32), "I")
    assert _rgb(img)[0, :, 0].tolist() == [0, 128, 255]


def test_to_rgb_float():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert _rgb(unit)[0, :, 0].tolist() == [0, 128, 255]
    byte_range = Image.fromarray(np.array([[0.0, 100.0, 255.0]], np.float32), "F")
    assert _rgb(byte_range)[0, :, 0].tolist() == [0, 100, 255]


def test_to_rgb_cmyk_and_bilevel():
    cmyk = Image.new("CMYK", (1, 2))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))  # no ink: white
    cmyk.putpixel((0, 1), (0, 255, 255, 0))  # magenta + yellow: red
    out = _rgb(cmyk)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 0].tolist() == [255, 0, 0]
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert _rgb(bilevel)[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_to_rgb_returns_rgb_unchanged():
    img = _photo(5, 4)
    assert to_rgb(img) is img


# ------------------------------------------------------------------ decode_image


def _jpeg_bytes(width: int = 64, height: int = 48) -> bytes:
    buf = io.BytesIO()
    _photo(width, height).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_decode_image_sources(tmp_path):
    data = _jpeg_bytes()
    path = tmp_path / "ok.jpg"
    path.write_bytes(data)
    for value in (data, bytearray(data), {"bytes": data, "path": None}, {"bytes": None, "path": str(path)}, str(path)):
        img = decode_image(value)
        assert img.mode == "RGB" and img.size == (64, 48)
    grey = io.BytesIO()
    Image.new("L", (3, 3), 7).save(grey, format="PNG")
    assert decode_image(grey.getvalue()).mode == "RGB"


def test_decode_image_truncated_jpeg_names_source():
    data = _jpeg_bytes()
    with pytest.raises(ImageDecodeError, match="cifar row 7"):
        decode_image(data[: len(data) // 2], source="cifar row 7")


def test_decode_image_corrupt_bytes_names_path_from_value():
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        decode_image({"bytes": b"\xff\xd8not really a jpeg", "path": "broken.jpg"}, source="row 1")


def test_decode_image_corrupt_inputs_name_source(tmp_path):
    with pytest.raises(ImageDecodeError, match="row 1|broken.jpg"):
        decode_image({"bytes": b"\xff\xd8not really a jpeg", "path": "broken.jpg"}, source="row 1")
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageDecodeError, match="missing.png"):
        decode_image({"bytes": None, "path": str(missing)})
    with pytest.raises(ImageDecodeError, match="neither bytes nor path"):
        decode_image({"bytes": None, "path": None}, source="row 3")
    with pytest.raises(ImageDecodeError, match="unsupported image value of type int"):
        decode_image(42)


def test_do_normalize_false_and_dark_16bit():
    t = ImageTransform.from_processor_config({"do_normalize": False, "size": {"shortest_edge": 8}})
    assert t.mean == (0.0, 0.0, 0.0) and t.std == (1.0, 1.0, 1.0)
    dark = Image.fromarray(np.full((4, 4), 200, dtype=np.uint16))  # I;16, 200/65535: nearly black
    assert dark.mode == "I;16"
    assert np.asarray(to_rgb(dark)).max() <= 1
