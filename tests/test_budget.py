"""A budget per request: pixels counted from the headers before any decoding, integer conversion
of wide modes without full-size float copies, and a cap on decodes at once per process."""

import io
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import image_bytes, png_claiming, serve_registry
from PIL import Image

import serving
from predictor import decode_image

pytestmark = pytest.mark.backend_independent(
    "pixels are counted and decodes capped before any query; recording the accepted images is test_predictions'"
)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def post(client, *contents: bytes):
    files = [(io.BytesIO(data), f"{n}.png") for n, data in enumerate(contents)]
    return client.post("/api/v1/predict", data={"image": files}, content_type="multipart/form-data")


def test_a_request_over_the_pixel_budget_is_413_before_decoding(make_app, app):
    budgeted = make_app(MAX_REQUEST_PIXELS=1_000_000)
    serve_registry(budgeted)
    client = budgeted.test_client()
    one = image_bytes("PNG", size=(800, 800))  # 640,000 pixels: one fits, two do not
    assert post(client, one).status_code == 200
    answer = post(client, one, one)
    assert answer.status_code == 413
    error = answer.get_json()["error"]
    assert error["code"] == "request_too_large" and "1,280,000 pixels" in error["message"]
    # Only headers are read: a body cut in half would be a 400 if anything were decoded.
    assert post(client, one[:200], one[:200]).status_code == 413


def test_jpeg_counts_at_the_size_draft_decoding_produces(make_app, app):
    budgeted = make_app(MAX_REQUEST_PIXELS=1_000_000)
    serve_registry(budgeted)
    client = budgeted.test_client()
    photo = image_bytes("JPEG", size=(4000, 3000))  # 12 MP, decoded at 1/8 scale: 500 x 375
    assert post(client, photo, photo).status_code == 200
    assert post(client, image_bytes("PNG", size=(1200, 1000))).status_code == 413


def test_sixteen_bit_images_convert_in_integers_without_full_size_float_copies():
    side = 3000
    gradient = np.tile(np.linspace(0, 65535, side, dtype=np.uint16), (side, 1))
    data = encode(Image.fromarray(gradient))  # uint16 arrays become mode I;16
    tracemalloc.start()
    try:
        pixels = decode_image(data, (32, 32))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One uint16 view of the decoded image is 2 bytes a pixel (plus Pillow's bytes for it);
    # a single float64 copy alone would be 8.
    assert peak < 5 * side * side, f"peak {peak / 1e6:.0f} MB"
    row = pixels[16, :, 0].astype(int)
    assert row[0] < 20 and row[-1] > 235 and (np.diff(row) >= 0).all()  # dark to bright, in order


def test_thirty_two_bit_images_are_reduced_then_stretched():
    values = np.zeros((1000, 1000), np.int32)
    values[:, 500:] = 1_000_000
    pixels = decode_image(encode(Image.fromarray(values, "I"), "TIFF"), (32, 32)).astype(int)
    assert pixels[16, 2].tolist() == [0, 0, 0] and pixels[16, -3].tolist() == [255, 255, 255]


def test_decodes_at_once_are_capped_per_process(make_app, app, monkeypatch):
    budgeted = make_app(MAX_CONCURRENT_DECODES=2)
    serve_registry(budgeted)
    running, most = 0, 0
    lock = threading.Lock()
    real_decode = serving.decode_rgb

    def slow_decode(*args, **kwargs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.1)
        with lock:
            running -= 1
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(serving, "decode_rgb", slow_decode)
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: post(budgeted.test_client(), image_bytes("PNG")).status_code, range(6)))
    assert statuses == [200] * 6
    assert most == 2


def test_an_unconfigured_app_budgets_24_megapixels_a_request(client):
    # Two images of 12 MP (as their headers say) are within the default budget and served; one row
    # more each and the request is refused from the headers (413).
    within = post(client, png_claiming(4000, 3000), png_claiming(4000, 3000))
    assert within.status_code == 200, within.get_json()
    over = post(client, png_claiming(4000, 3001), png_claiming(4000, 3001))
    assert over.status_code == 413 and "the limit is 24,000,000 per request" in over.get_json()["error"]["message"]
