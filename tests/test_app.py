"""The web page and the JSON API against the real app, database and a real Keras model."""

import io
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import CIFAR10, image_bytes, random_image_bytes, serve_registry

import engine_store
import model_store

# Tests of request handling (statuses, error bodies, headers, escaping, CSRF, the model's answer):
# an accepted image is recorded as every prediction is (test_predictions checks that on PostgreSQL).
REQUEST_HANDLING = pytest.mark.backend_independent("request handling; recording is test_predictions'")


def post_page(client, *files):
    data = {"image": [(io.BytesIO(content), name) for name, content in files]}
    return client.post("/", data=data, content_type="multipart/form-data")


def test_index_has_the_upload_form(client):
    response = client.get("/")
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert 'enctype="multipart/form-data"' in html
    assert re.search(r'<input[^>]*type="file"[^>]*name="image"[^>]*multiple', html)
    assert 'id="drop-zone"' in html and 'id="preview"' in html and "upload.js" in html
    assert "seed v1" in html


def test_page_shows_the_class_probability_and_all_ranked_bars(client):
    response = post_page(client, ("ship.jpg", image_bytes()), ("noise.png", random_image_bytes()))
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert html.count('class="result"') == 2
    assert html.count('class="bar-row"') == 20
    assert html.count("data:image/jpeg;base64,") == 2
    for name in CIFAR10:
        assert f'<span class="label">{name}</span>' in html
    percentages = [float(p) for p in re.findall(r'<span class="pct">([\d.]+) %</span>', html)]
    assert abs(sum(percentages[:10]) - 100) < 0.6  # rounded to one decimal each
    assert percentages[:10] == sorted(percentages[:10], reverse=True)
    assert re.search(r"Answered by .*seed v1.* in [\d.]+ ms", html, re.S)


@pytest.mark.parametrize(
    ("files", "status", "message"),
    [
        ([], 400, "No image was sent"),
        ([("notes.jpg", b"just some text")], 415, "not an image"),
        ([("empty.png", b"")], 400, "empty.png: The file is empty"),
        ([("", b"")], 400, "No image was sent"),
        ([("half.png", random_image_bytes(size=(64, 64))[:200])], 400, "corrupt or truncated"),
    ],
)
@REQUEST_HANDLING
def test_page_errors_come_back_on_the_form(client, files, status, message):
    response = post_page(client, *files)
    html = response.get_data(as_text=True)
    assert response.status_code == status
    assert message in html and 'class="error"' in html and 'type="file"' in html
    assert "Traceback" not in html


@REQUEST_HANDLING
def test_page_too_large_is_413(app, client):
    app.config["MAX_CONTENT_LENGTH"] = 10_000
    response = post_page(client, ("big.png", random_image_bytes(size=(200, 200))))
    assert response.status_code == 413
    assert "too large" in response.get_data(as_text=True)


@REQUEST_HANDLING
def test_user_file_names_are_escaped(client):
    response = post_page(client, ("<img src=x onerror=alert(1)>.png", image_bytes("PNG")))
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;.png" in html


def test_api_predict_multipart_batch(client):
    data = {"image": [(io.BytesIO(image_bytes()), "a.jpg"), (io.BytesIO(random_image_bytes()), "b.png")]}
    response = client.post("/api/v1/predict", data=data, content_type="multipart/form-data")
    body = response.get_json()
    assert response.status_code == 200
    assert body["model"]["name"] == "seed" and body["model"]["version"] == 1 and len(body["model"]["sha256"]) == 64
    assert [p["filename"] for p in body["predictions"]] == ["a.jpg", "b.png"]
    for prediction in body["predictions"]:
        assert set(prediction["probabilities"]) == set(CIFAR10)
        assert abs(sum(prediction["probabilities"].values()) - 1) < 1e-5
        assert prediction["top_class"] == max(prediction["probabilities"], key=prediction["probabilities"].get)
        assert prediction["probability"] == prediction["probabilities"][prediction["top_class"]]


@REQUEST_HANDLING
def test_api_batch_equals_one_by_one(client):
    contents = [random_image_bytes(seed) for seed in range(5)]
    data = {"image": [(io.BytesIO(c), f"{i}.png") for i, c in enumerate(contents)]}
    batch = client.post("/api/v1/predict", data=data, content_type="multipart/form-data").get_json()
    for content, together in zip(contents, batch["predictions"], strict=True):
        alone = client.post("/api/v1/predict", data=content, content_type="image/png").get_json()
        np.testing.assert_allclose(
            [alone["predictions"][0]["probabilities"][c] for c in CIFAR10],
            [together["probabilities"][c] for c in CIFAR10],
            atol=1e-5,
        )


@REQUEST_HANDLING
def test_api_raw_body_and_top_k(client):
    response = client.post("/api/v1/predict?top_k=3&filename=x.png", data=image_bytes("PNG"), content_type="image/png")
    prediction = response.get_json()["predictions"][0]
    assert response.status_code == 200 and prediction["filename"] == "x.png"
    assert len(prediction["probabilities"]) == 3
    assert list(prediction["probabilities"].values()) == sorted(prediction["probabilities"].values(), reverse=True)


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"data": b"", "content_type": "image/png"}, 400, "empty_file"),
        ({"data": b"abc", "content_type": "text/plain"}, 415, "unsupported_media_type"),
        ({"data": b"abc", "content_type": "image/png"}, 415, "unsupported_media_type"),
        ({"data": {}, "content_type": "multipart/form-data"}, 400, "no_file"),
        ({"data": image_bytes(), "content_type": "image/jpeg", "query_string": {"top_k": "0"}}, 400, "bad_top_k"),
    ],
)
@REQUEST_HANDLING
def test_api_errors_are_json(client, kwargs, status, code):
    response = client.post("/api/v1/predict", **kwargs)
    assert response.status_code == status
    assert response.get_json()["error"]["code"] == code
    assert response.get_json()["error"]["message"]


@REQUEST_HANDLING
def test_api_unknown_route_and_method_are_json(client):
    missing = client.get("/api/v1/nothing")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"
    wrong_method = client.get("/api/v1/predict")
    assert wrong_method.status_code == 405 and wrong_method.mimetype == "application/json"
    error = wrong_method.get_json()["error"]
    assert error["code"] == "method_not_allowed" and error["message"]
    assert set(wrong_method.headers["Allow"].split(", ")) == {"OPTIONS", "POST"}


@REQUEST_HANDLING
def test_page_unknown_route_and_method_are_html(client):
    for response, status in ((client.get("/nothing"), 404), (client.post("/history"), 405)):
        assert response.status_code == status and response.mimetype == "text/html"
        assert f"{status}" in response.get_data(as_text=True) and response.get_json(silent=True) is None
    assert set(client.post("/history").headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}


def test_models_api_has_no_blobs(client):
    body = client.get("/api/v1/models").get_json()
    assert len(body["models"]) == 1
    model = body["models"][0]
    assert "blob" not in model and model["class_names"] == CIFAR10 and model["is_active"] is True


def test_healthz_is_ready_with_a_model(client):
    response = client.get("/healthz")
    body = response.get_json()
    assert response.status_code == 200 and body["ready"] and body["model"]["name"] == "seed"


def test_healthz_is_not_ready_without_a_model(bare_app):
    with bare_app.app_context():
        model_store.init_db()
    response = bare_app.test_client().get("/healthz")
    assert response.status_code == 503 and response.get_json()["ready"] is False


def test_activation_is_picked_up_without_restart(app, client, other_model_file):
    first = client.post("/api/v1/predict", data=image_bytes(), content_type="image/jpeg").get_json()
    with app.app_context():
        other = model_store.import_model(other_model_file, name="other", activate=True).to_dict()
    serve_registry(app)
    second = client.post("/api/v1/predict", data=image_bytes(), content_type="image/jpeg").get_json()
    assert first["model"]["name"] == "seed"
    assert second["model"] == {"id": other["id"], "name": "other", "version": 1, "sha256": other["sha256"]}
    assert first["predictions"][0]["probabilities"] != second["predictions"][0]["probabilities"]


def test_class_names_come_from_the_database(app, client, three_class_model_file):
    with app.app_context():
        model_store.import_model(three_class_model_file, class_names=["cat", "dog", "cow"], activate=True)
    serve_registry(app)
    prediction = client.post("/api/v1/predict", data=image_bytes(), content_type="image/jpeg").get_json()
    assert set(prediction["predictions"][0]["probabilities"]) == {"cat", "dog", "cow"}
    html = post_page(client, ("x.jpg", image_bytes())).get_data(as_text=True)
    assert html.count('class="bar-row"') == 3


def test_rehydrated_engine_file_lands_in_the_instance_folder(app, client):
    """A worker writes the serving engine's conversion (named by its own sha256), not the Keras file."""
    client.get("/healthz")
    with app.app_context():
        row = model_store.get_active()
        expected = [f"{engine_store.get(row.sha256).sha256}.tflite"]
    cache = Path(app.config["MODEL_CACHE_DIR"])
    assert cache.is_relative_to(app.instance_path)
    assert [p.name for p in cache.iterdir()] == expected


@REQUEST_HANDLING
def test_security_headers(client):
    headers = client.get("/").headers
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "unsafe-inline" not in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "same-origin"


@REQUEST_HANDLING
def test_csrf_protects_the_form_but_not_the_api(app, client):
    app.config["WTF_CSRF_ENABLED"] = True
    response = post_page(client, ("x.jpg", image_bytes()))
    assert response.status_code == 400 and "Reload the page" in response.get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").get_data(as_text=True)).group(1)
    data = {"csrf_token": token, "image": [(io.BytesIO(image_bytes()), "x.jpg")]}
    assert client.post("/", data=data, content_type="multipart/form-data").status_code == 200
    api = client.post("/api/v1/predict", data=image_bytes(), content_type="image/jpeg")
    assert api.status_code == 200


def test_models_pages(app, client):
    with app.app_context():
        row = model_store.get_active()
    assert "seed" in client.get("/models").get_data(as_text=True)
    card = client.get(f"/models/{row.id}").get_data(as_text=True)
    assert row.sha256 in card and "airplane" in card
    assert client.get("/models/999").status_code == 404


def test_hand_written_metrics_do_not_break_the_model_pages(app, client, other_model_file):
    metrics = {"arch": "mine", "test_accuracy": "n/a", "confusion_matrix": [[1]], "history": {"loss": [1.0, 0.5]}}
    with app.app_context():
        row_id = model_store.import_model(other_model_file, name="odd", metrics=metrics).id
        with pytest.raises(model_store.ModelStoreError, match="JSON object"):
            model_store.import_model(other_model_file, metrics=["not", "a", "dict"])
    assert client.get(f"/models/{row_id}").status_code == 200
    assert client.get("/models").status_code == 200
    assert client.get(f"/models/{row_id}/curves.png").status_code == 200
