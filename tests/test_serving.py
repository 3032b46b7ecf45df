"""Serving by named slot: an upload decoded once and scored by more than one model, slots loaded
and emptied as the registry assigns them, loading only on the poller's thread (a request never
waits for it, a render never starts it), and the image statistics of a decoded upload."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import image_bytes, random_image_bytes
from PIL import Image
from sqlalchemy import inspect

import model_store
import serving
from inference.image_statistics import image_statistics
from monitoring import metrics
from predictor import decode_image
from serving import CHAMPION, DecodeBudget, ModelSlots, Upload, decode_uploads
from web.extensions import model_serving


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _checkerboard(side: int = 32) -> np.ndarray:
    """Black and white pixels alternating: the sharpest an 8-bit image gets."""
    cells = (np.indices((side, side)).sum(axis=0) % 2 * 255).astype(np.uint8)
    return np.repeat(cells[..., None], 3, axis=-1)


@pytest.fixture(scope="session")
def small_input_model_file(model_dir):
    """A 10-class model that takes 16 x 16 images, for a second input size."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input(shape=(16, 16, 3)), layers.Flatten(), layers.Dense(10)])
    path = model_dir / "small.keras"
    model.save(path)
    return path


def _key(row) -> tuple:
    return row.id, row.sha256, None


def _two_slots(app, other_file) -> tuple[ModelSlots, dict]:
    """Slots serving the seed as champion and `other_file` as challenger; the assignments can be
    changed as the registry would change them."""
    with app.app_context():
        champion = model_store.get_active()
        challenger = model_store.import_model(other_file, name="challenger")
        assignments = {CHAMPION: _key(champion), "challenger": _key(challenger)}
        slots = ModelSlots(Path(app.config["MODEL_CACHE_DIR"]), assignments=lambda: assignments)
        slots.refresh()
    return slots, assignments


def test_statistics_of_a_flat_grey_image_and_a_checkerboard():
    grey = image_statistics(np.full((32, 32, 3), 128, np.uint8))
    assert grey.brightness_mean == pytest.approx(128) and grey.brightness_std == 0
    assert grey.saturation_mean == 0 and grey.sharpness == 0
    board = image_statistics(_checkerboard())
    assert board.brightness_mean == pytest.approx(127.5) and board.brightness_std == pytest.approx(127.5)
    # Every inner Laplacian is +-4 x 255: the variance is (4 x 255)^2.
    assert board.sharpness == pytest.approx((4 * 255) ** 2)
    assert image_statistics(np.full((8, 8, 3), (255, 0, 0), np.uint8)).saturation_mean == 1
    blurred = np.asarray(Image.fromarray(_checkerboard()).resize((64, 64), Image.Resampling.BILINEAR))
    assert image_statistics(blurred).sharpness < board.sharpness / 4


def test_a_decoded_upload_carries_its_statistics_hash_and_input():
    flat = _png(np.full((40, 40, 3), 90, np.uint8))
    (decoded,) = decode_uploads([Upload("flat.png", flat)], [(32, 32)], DecodeBudget())
    assert decoded.sha256 == model_store.sha256_of(flat)
    statistics = decoded.statistics((32, 32))
    assert statistics.brightness_std == 0 and statistics.sharpness == 0
    np.testing.assert_array_equal(decoded.pixels((32, 32)), decode_image(flat, (32, 32)))
    (board,) = decode_uploads([Upload("board.png", _png(_checkerboard()))], [(32, 32)], DecodeBudget())
    assert board.statistics((32, 32)).sharpness > 100_000
    with pytest.raises(ValueError, match=r"flat.png was decoded for input sizes \[\(32, 32\)\], not \(16, 16\)"):
        decoded.pixels((16, 16))


def test_an_upload_is_decoded_once_and_scored_by_two_models_of_different_sizes(
    app, small_input_model_file, monkeypatch
):
    slots, _ = _two_slots(app, small_input_model_file)
    champion, challenger = slots.slot(CHAMPION), slots.slot("challenger")
    assert (champion.input_size, challenger.input_size) == ((32, 32), (16, 16))
    decodes = []
    real_decode = serving.decode_rgb

    def counted(*args, **kwargs):
        decodes.append(args)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(serving, "decode_rgb", counted)
    uploads = [Upload(f"{seed}.png", random_image_bytes(seed, size=(48, 40))) for seed in range(3)]
    decoded = decode_uploads(uploads, [champion.input_size, challenger.input_size], DecodeBudget())
    by_champion, by_challenger = champion.score(decoded), challenger.score(decoded)
    assert len(decodes) == len(uploads)  # one decode per upload, for both models
    assert [item.pixels((16, 16)).shape for item in decoded] == [(16, 16, 3)] * 3
    assert len(by_champion) == len(by_challenger) == 3
    assert [p.probabilities for p in by_champion] != [p.probabilities for p in by_challenger]
    # The champion's answers are the ones the API gives for the same images.
    with app.test_client() as client:
        for upload, prediction in zip(uploads, by_champion, strict=True):
            api = client.post("/api/v1/predict", data=upload.data, content_type="image/png").get_json()
            got = api["predictions"][0]["probabilities"]
            np.testing.assert_allclose(
                [got[c] for c in prediction.probabilities], list(prediction.probabilities.values()), atol=1e-5
            )
    slots.close()


def test_named_slots_load_once_and_a_slot_the_registry_drops_is_emptied(app, other_model_file, monkeypatch):
    slots, assignments = _two_slots(app, other_model_file)
    assert slots.slot(CHAMPION).name == "seed" and slots.slot("challenger").name == "challenger"
    assert set(slots.loaded()) == {CHAMPION, "challenger"} and slots.error("challenger") is None
    challenger_id = str(slots.slot("challenger").id)
    gauge = metrics.MODEL_LOADED.labels("challenger", challenger_id, "challenger", "1")
    assert gauge._value.get() == 1

    loads = []
    monkeypatch.setattr(serving, "load_version", lambda *args, **kwargs: loads.append(args))
    with app.app_context():
        slots.refresh()
        del assignments["challenger"]
        slots.refresh()
    assert loads == []  # an unchanged slot is not loaded again
    assert slots.slot("challenger") is None and slots.slot(CHAMPION).name == "seed"
    assert slots.error("challenger") == "no model is assigned to the challenger slot"
    assert gauge._value.get() == 0
    slots.close()


def test_a_refresh_leaves_the_callers_session_alone(app):
    """A poll used to roll back the view's session, expiring rows a template was still reading."""
    with app.test_request_context():
        row = model_store.get_active()
        model_serving.refresh()
        assert not inspect(row).expired_attributes


def test_rendering_pages_never_loads_a_model(app, client, other_model_file, monkeypatch):
    loads = []
    monkeypatch.setattr(serving, "load_version", lambda *args, **kwargs: loads.append(args))
    with app.app_context():
        model_store.import_model(other_model_file, name="other", activate=True)
    for path, status in (("/login", 200), ("/nothing", 404), ("/", 200), ("/healthz", 200)):
        response = client.get(path)
        assert response.status_code == status, path
        assert "other v1" not in response.get_data(as_text=True)
    assert loads == []
    assert "seed v1" in client.get("/").get_data(as_text=True)


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def polled_app(app, make_app):
    """A second app on `app`'s database with a real registry poller (every 50 ms), stopped after."""
    polled = make_app(instance="polled", MODEL_POLL_SECONDS=0.05)
    yield polled
    model_serving.stop(polled)


def test_requests_never_wait_for_a_load_on_the_poller_thread(polled_app, app, other_model_file, monkeypatch):
    real_load = serving.load_version
    loading, release = threading.Event(), threading.Event()
    loaded_on = []

    def gated(*args, **kwargs):
        loaded_on.append(threading.current_thread().name)
        loading.set()
        assert release.wait(60)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(serving, "load_version", gated)
    client = polled_app.test_client()
    predict = lambda: client.post("/api/v1/predict", data=image_bytes(), content_type="image/jpeg")  # noqa: E731
    pool = ThreadPoolExecutor(1)  # requests on another thread: one that waited shows as a timeout
    try:
        # Before the first load: answered at once, 503, while the poller is held in the load.
        first = pool.submit(client.get, "/healthz").result(timeout=10)
        assert first.status_code == 503 and first.get_json()["ready"] is False
        assert loading.wait(10)
        waiting = pool.submit(predict).result(timeout=10)
        assert waiting.status_code == 503 and "no model is loaded yet" in waiting.get_json()["error"]["message"]
        loading.clear()
        release.set()
        _wait_for(lambda: client.get("/healthz").status_code == 200)
        release.clear()
        with app.app_context():
            model_store.import_model(other_model_file, name="other", activate=True)
        assert loading.wait(10)
        # The new version is loading: requests keep answering at once with the old one.
        during = pool.submit(predict).result(timeout=10)
        assert during.status_code == 200 and during.get_json()["model"]["name"] == "seed"
        assert pool.submit(client.get, "/healthz").result(timeout=10).status_code == 200
        release.set()
        _wait_for(lambda: predict().get_json()["model"]["name"] == "other")
    finally:
        release.set()
        pool.shutdown()
    assert loaded_on == ["model-registry-poller"] * 2
