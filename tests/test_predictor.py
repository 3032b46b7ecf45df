"""Preprocessing of every image mode, EXIF orientation, draft decoding, errors and inference maths."""

import io

import numpy as np
import pytest
from helpers import build_seed_like_model, image_bytes
from PIL import Image

from predictor import (
    ImageError,
    ModelSpec,
    Predictor,
    _decode_rgb,
    decode_image,
    open_image,
    softmax,
)


def encode(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "color", "fmt", "expected"),
    [
        ("RGB", (10, 200, 30), "PNG", (10, 200, 30)),
        ("L", 128, "PNG", (128, 128, 128)),
        ("LA", (128, 255), "PNG", (128, 128, 128)),
        ("RGBA", (0, 0, 0, 0), "PNG", (255, 255, 255)),  # fully transparent: the white background
        ("RGBA", (0, 0, 255, 255), "PNG", (0, 0, 255)),
        ("CMYK", (0, 255, 255, 0), "JPEG", (255, 0, 0)),
        ("CMYK", (0, 255, 255, 0), "TIFF", (255, 0, 0)),
        ("I;16", 65535, "PNG", (255, 255, 255)),
        ("I;16", 32896, "PNG", (128, 128, 128)),
        ("1", 1, "PNG", (255, 255, 255)),
        ("F", 0.5, "TIFF", (0, 0, 0)),  # constant float image: no range to scale, black
    ],
)
def test_every_mode_becomes_rgb(mode, color, fmt, expected):
    data = encode(Image.new(mode, (40, 40), color), fmt)
    pixels = decode_image(data, (32, 32))
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - expected).max() <= 6


def test_palette_with_transparency_and_gif():
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([255, 0, 0] + [0, 255, 0] * 255)
    assert decode_image(encode(palette, "PNG", transparency=0), (8, 8))[0, 0].tolist() == [255, 255, 255]
    assert decode_image(encode(palette, "GIF"), (8, 8))[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied():
    # Stored landscape: left half red, right half blue. Orientation 6 means "rotate 90° clockwise
    # to display", so the displayed image is portrait with red on top.
    stored = Image.new("RGB", (64, 32), (255, 0, 0))
    stored.paste((0, 0, 255), (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", exif=exif.tobytes(), quality=95)
    upright = _decode_rgb(open_image(data), 64)
    assert upright.size == (32, 64)
    pixels = np.asarray(upright).astype(int)
    assert pixels[5, 16, 0] > 200 and pixels[5, 16, 2] < 60  # top: red
    assert pixels[58, 16, 2] > 200 and pixels[58, 16, 0] < 60  # bottom: blue


def test_centre_crop_to_the_model_aspect():
    wide = Image.new("RGB", (300, 100), (255, 0, 0))
    wide.paste((0, 255, 0), (100, 0, 200, 100))  # the centre square is green
    pixels = decode_image(encode(wide, "PNG"), (32, 32)).astype(int)
    # Resampling may blend a pixel of the cropped-off red into the outermost columns only.
    assert (pixels[:, 1:-1, 1] > 240).all() and (pixels[:, 1:-1, 0] < 15).all()
    assert (pixels[:, :, 1] > 200).all() and (pixels[:, :, 0] < 60).all()


def test_large_jpeg_is_decoded_in_draft_mode():
    data = encode(Image.new("RGB", (4000, 3000), (90, 90, 90)), "JPEG")
    decoded = _decode_rgb(open_image(data), 64)
    assert decoded.size == (100, 75)  # 1/8 scale in libjpeg, then reduced by 5: both sides stay >= 64
    assert decode_image(data, (32, 32)).shape == (32, 32, 3)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"\x00\x01 random bytes that are no image", "unsupported_media_type"),
        (b"hello, this is text named .jpg\n", "unsupported_media_type"),
        (b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", "unsupported_media_type"),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', "unsupported_media_type"),
        (b"<!doctype html><html><body>hi</body></html>", "unsupported_media_type"),
    ],
)
def test_non_images_are_refused(data, code):
    with pytest.raises(ImageError) as caught:
        decode_image(data, (32, 32))
    assert caught.value.code == code and caught.value.message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_refused(fmt):
    data = encode(Image.effect_noise((256, 256), 64).convert("RGB"), fmt)
    with pytest.raises(ImageError) as caught:
        decode_image(data[: len(data) // 2], (32, 32))
    assert caught.value.code == "corrupt_image"


def test_pixel_limit_is_checked_before_decoding():
    data = image_bytes("PNG", size=(400, 300))
    with pytest.raises(ImageError) as caught:
        decode_image(data, (32, 32), max_pixels=100_000)
    assert caught.value.code == "too_many_pixels"
    assert decode_image(data, (32, 32), max_pixels=120_000).shape == (32, 32, 3)


def test_softmax_sums_to_one_and_keeps_order():
    probabilities = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]]))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    assert probabilities[1].argmax() == 2


def test_predictor_matches_keras_and_flip_tta_averages_logits():
    model = build_seed_like_model()
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    spec = ModelSpec(tuple("abcdefghij"), (32, 32, 3))
    expected = softmax(np.asarray(model(images.astype("float32") / 255.0)))
    np.testing.assert_allclose(Predictor(model, spec).predict_arrays(images), expected, atol=1e-5)

    flip_spec = ModelSpec(tuple("abcdefghij"), (32, 32, 3), tta="flip")
    logits = np.asarray(model(images / 255.0)) + np.asarray(model(images[:, :, ::-1] / 255.0))
    np.testing.assert_allclose(Predictor(model, flip_spec).predict_arrays(images), softmax(logits / 2), atol=1e-5)


def test_probability_outputs_are_not_softmaxed_twice():
    import keras

    model = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")]
    )
    images = np.random.default_rng(1).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    spec = ModelSpec(("a", "b", "c"), (4, 4, 3), output_kind="probabilities")
    expected = np.asarray(model(images.astype("float32") / 255.0))
    np.testing.assert_allclose(Predictor(model, spec).predict_arrays(images), expected, atol=1e-5)
