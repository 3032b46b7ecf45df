"""Grad-CAM: the map points where the model reads, the API's explain=1 fields, the page's map and
class chooser, `flask predict --explain`, and the clear message for a model without convolutions."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from helpers import random_image_bytes, serve_registry
from PIL import Image

import model_store
import serving
from inference import explain
from predictor import ModelSpec
from registry.model_spec import CIFAR10_CLASSES

# Tests of the maps in the API's answer: the model's arithmetic and the answer's shape. The rows
# behind them (a model's metrics, a recorded prediction) are test_model_store's and
# test_predictions' on PostgreSQL; the pages that read a recorded image back stay marked db.
MAPS_ONLY = pytest.mark.backend_independent("the maps in the API's answer; their rows are other tests'")

DATA_URI = re.compile(r"^data:image/png;base64,([A-Za-z0-9+/=]+)$")


def build_region_model(num_classes: int = 10):
    """A tiny CNN whose output depends only on the top-right quarter of a 32x32 image: that quarter is
    cropped out and padded back with zeros before the convolution, so nothing else reaches it. The
    quarter is not on a diagonal, so a mirrored or transposed map lands elsewhere."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(3)
    positive = keras.initializers.RandomUniform(0.1, 1.0)
    inputs = keras.Input(shape=(32, 32, 3))
    x = layers.Cropping2D(((0, 16), (16, 0)))(inputs)
    x = layers.ZeroPadding2D(((0, 16), (16, 0)))(x)
    x = layers.Conv2D(4, 3, padding="same", activation="relu", kernel_initializer=positive)(x)
    x = layers.MaxPooling2D(4)(x)  # an 8x8 feature map: its top-right 4x4 cells hold the quarter
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(num_classes, kernel_initializer=positive)(x))


def build_dense_model():
    """No convolution at all: flatten, then a dense layer."""
    import keras
    from keras import layers

    return keras.Sequential([keras.Input(shape=(32, 32, 3)), layers.Flatten(), layers.Dense(10)])


@pytest.fixture(scope="session")
def region_model_file(model_dir):
    path = model_dir / "region.keras"
    build_region_model().save(path)
    return path


@pytest.fixture(scope="session")
def dense_model_file(model_dir):
    path = model_dir / "dense.keras"
    build_dense_model().save(path)
    return path


def _app_with(make_app, model_file, **import_options):
    app = make_app()
    with app.app_context():
        model_store.init_db()
        model_store.import_model(model_file, name=model_file.stem, **import_options)
    serve_registry(app)
    return app


def _png(data_uri: str) -> Image.Image:
    match = DATA_URI.match(data_uri)
    assert match, data_uri[:60]
    return Image.open(io.BytesIO(base64.b64decode(match.group(1))))


def _post(client, path: str, *images: bytes):
    files = [(io.BytesIO(data), f"{i}.png") for i, data in enumerate(images)]
    return client.post(path, data={"image": files}, content_type="multipart/form-data")


def _peak_quadrant(grid) -> tuple[int, int]:
    grid = np.asarray(grid)
    row, col = np.unravel_index(np.argmax(grid), grid.shape)
    return int(row >= grid.shape[0] / 2), int(col >= grid.shape[1] / 2)


def test_the_map_is_highest_where_the_model_reads():
    model = build_region_model()
    spec = ModelSpec(tuple(CIFAR10_CLASSES), (32, 32, 3))
    explainer = explain.explainer_for(model, spec)
    assert explainer.layer_name.startswith("max_pooling2d") and explainer.grid_shape == (8, 8)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    grids = explainer.explain(images, [0, 3, 5, 9])
    assert grids.shape == (4, 8, 8)
    for grid in grids:
        assert grid.max() == pytest.approx(1.0)
        assert _peak_quadrant(grid) == (0, 1)
        assert grid[:4, 4:].mean() > 0.3 and grid[5:, :].max() == 0 and grid[:, :3].max() == 0


@MAPS_ONLY
def test_with_flip_tta_the_map_is_of_the_image_as_sent(make_app, region_model_file):
    # A map of the mirrored view, mirrored back, would be in the top-left quarter.
    client = _app_with(make_app, region_model_file, metrics={"tta": "flip"}).test_client()
    grid = np.asarray(
        _post(client, "/api/v1/predict?explain=1", random_image_bytes(1)).get_json()["predictions"][0]["saliency_grid"]
    )
    assert _peak_quadrant(grid) == (0, 1) and grid[:, :3].max() == 0


@MAPS_ONLY
def test_api_explain_adds_the_map_at_the_size_sent_and_the_grid(client):
    response = _post(client, "/api/v1/predict?explain=1", random_image_bytes(2, size=(300, 200)))
    assert response.status_code == 200
    answer = response.get_json()
    assert answer["explanation"]["layer"].startswith("max_pooling2d")  # the last 4-D layer
    prediction = answer["predictions"][0]
    assert _png(prediction["saliency"]).size == (300, 200)
    grid = np.asarray(prediction["saliency_grid"])
    assert grid.shape == (15, 15) and grid.min() >= 0 and grid.max() == pytest.approx(1.0)


@MAPS_ONLY
def test_api_bounds_the_overlay_of_a_large_photo(client):
    photo = io.BytesIO()
    Image.new("RGB", (2400, 1200), (90, 140, 60)).save(photo, "JPEG")
    prediction = _post(client, "/api/v1/predict?explain=true", photo.getvalue()).get_json()
    assert _png(prediction["predictions"][0]["saliency"]).size == (1024, 512)


@MAPS_ONLY
def test_api_without_explain_computes_and_adds_nothing(client, monkeypatch):
    def refuse(*args):
        raise AssertionError("a map was computed without explain")

    monkeypatch.setattr(serving.LoadedModel, "explain", refuse)
    for path in ("/api/v1/predict", "/api/v1/predict?explain=0"):
        answer = _post(client, path, random_image_bytes(4)).get_json()
        assert "explanation" not in answer
        assert set(answer["predictions"][0]) == {
            "id",
            "filename",
            "top_class",
            "probability",
            "probabilities",
            "decision",
            "ood_score",
        }


@MAPS_ONLY
def test_api_refuses_an_unclear_explain_value(client):
    response = _post(client, "/api/v1/predict?explain=maybe", random_image_bytes(5))
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "bad_explain"


def test_a_model_without_convolutions_is_served_with_a_clear_no_explanation(make_app, dense_model_file):
    client = _app_with(make_app, dense_model_file).test_client()
    answer = _post(client, "/api/v1/predict?explain=1", random_image_bytes(6)).get_json()
    assert answer["explanation"]["unavailable"].startswith("No explanation for this model")
    assert answer["predictions"][0]["saliency"] is None and answer["predictions"][0]["top_class"]
    page = _post(client, "/", random_image_bytes(6))
    assert page.status_code == 200 and "No explanation for this model" in page.text
    assert "saliency-map" not in page.text
    chosen = client.get("/predictions/2/explain?class=cat")
    assert chosen.status_code == 422 and "No explanation for this model" in chosen.text


def test_the_map_credits_the_cells_a_max_pooled_head_read():
    """Channel 0 reads the bright top-left pixel, channel 1 (weighed 1.5) the grey rest; a global
    max pool passes one cell of each. Each cell weighed by its own gradient credits the bright
    cell (1 x 1 against 1.5 x 0.5); Grad-CAM's channel means credit the grey everywhere."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(4, 4, 3))
    features = layers.Conv2D(2, 1, name="features")(inputs)
    logits = layers.Dense(2, use_bias=False)(layers.GlobalMaxPooling2D()(features))
    model = keras.Model(inputs, logits)
    kernel = np.zeros((1, 1, 3, 2), np.float32)
    kernel[0, 0, 0] = [1.0, -1.0]
    model.get_layer("features").set_weights([kernel, np.array([0.0, 1.0], np.float32)])
    model.layers[-1].set_weights([np.array([[1.0, 0.0], [1.5, 0.0]], np.float32)])
    image = np.full((1, 4, 4, 3), 128, np.uint8)
    image[0, 0, 0] = 255
    spec = ModelSpec(("bright", "other"), (4, 4, 3), "unit", "logits", "none")
    by_cell = explain.Explainer(model, spec).explain(image, [0])[0]
    by_channel = explain.Explainer(model, spec, weighting="channel").explain(image, [0])[0]
    assert np.unravel_index(by_cell.argmax(), by_cell.shape) == (0, 0)
    assert by_channel[0, 0] < by_channel.max()


@MAPS_ONLY
def test_a_layer_named_in_the_metadata_is_explained(make_app, seed_model_file):
    pool = model_store.load_keras_model(seed_model_file, allow_hdf5=True).layers[1].name
    client = _app_with(make_app, seed_model_file, metrics={"explain_layer": pool}).test_client()
    answer = _post(client, "/api/v1/predict?explain=1", random_image_bytes(7)).get_json()
    assert answer["explanation"] == {"layer": pool}
    assert np.asarray(answer["predictions"][0]["saliency_grid"]).shape == (15, 15)


def test_a_named_layer_the_head_does_not_read_has_no_explanation_in_the_worker(make_app, seed_model_file):
    """The worker's Grad-CAM is the head's closed form (inference/lite_engine.py): a layer before
    the max pooling that the head reads is not explained there, and says why."""
    conv = model_store.load_keras_model(seed_model_file, allow_hdf5=True).layers[0].name
    client = _app_with(make_app, seed_model_file, metrics={"explain_layer": conv}).test_client()
    answer = _post(client, "/api/v1/predict?explain=1", random_image_bytes(7)).get_json()
    assert (
        answer["explanation"]["unavailable"]
        == f"No explanation for this model here: its pooling does not read layer {conv!r}."
    )
    assert answer["predictions"][0]["saliency"] is None


@MAPS_ONLY
def test_a_missing_named_layer_says_so(make_app, seed_model_file):
    client = _app_with(make_app, seed_model_file, metrics={"explain_layer": "nope"}).test_client()
    answer = _post(client, "/api/v1/predict?explain=1", random_image_bytes(8)).get_json()
    assert "'nope'" in answer["explanation"]["unavailable"]


def test_the_result_page_shows_the_map_of_the_top_class_and_a_class_chooser(client):
    page = _post(client, "/", random_image_bytes(9, size=(90, 60)))
    assert page.status_code == 200
    top = re.search(r'class="top-class">([^<]+)<', page.text).group(1)
    source = re.search(r'<img class="saliency-map" src="([^"]+)"', page.text).group(1)
    assert _png(source).size == (90, 60)
    assert f'class="saliency-class">{top}<' in page.text
    assert 'action="/predictions/1/explain"' in page.text and f'<option value="{top}" selected>' in page.text


def test_the_chosen_class_page_shows_its_map(client):
    _post(client, "/", random_image_bytes(10, size=(300, 200)))
    page = client.get("/predictions/1/explain?class=frog")
    assert page.status_code == 200
    assert 'class="saliency-class">frog<' in page.text and '<option value="frog" selected>' in page.text
    source = re.search(r'<img class="saliency-map" src="([^"]+)"', page.text).group(1)
    assert _png(source).size == (128, 85)  # drawn from the kept 128-pixel thumbnail
    assert "<script" not in page.text and "style=" not in page.text  # within the CSP


def test_the_chosen_class_page_refuses_an_unknown_class_and_a_missing_image(make_app, seed_model_file):
    client = _app_with(make_app, seed_model_file).test_client()
    _post(client, "/", random_image_bytes(11))
    assert client.get("/predictions/1/explain?class=unicorn").status_code == 400
    assert client.get("/predictions/99/explain").status_code == 404
    client.application.config["KEEP_IMAGES"] = False
    _post(client, "/", random_image_bytes(12))
    missing = client.get("/predictions/2/explain")
    assert missing.status_code == 404 and "not kept" in missing.text


def test_cli_predict_explain_writes_an_overlay_beside_each_image(runner, tmp_path):
    photo = tmp_path / "photo.jpg"
    Image.open(io.BytesIO(random_image_bytes(13, size=(64, 48)))).save(photo, "JPEG")
    result = runner.invoke(args=["predict", "--explain", str(photo)])
    assert result.exit_code == 0, result.output
    overlay = tmp_path / "photo.jpg.saliency.png"
    assert "where it looked for" in result.output and str(overlay) in result.output
    with Image.open(overlay) as written:
        assert written.size == (64, 48)
