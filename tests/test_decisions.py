"""Calibrated serving end to end: `flask calibrate` on an image folder, the three decisions on
the page, in the API, in the history and in `flask predict`, and an uncalibrated model."""

import io
import re

import numpy as np
import pytest
from helpers import CIFAR10, FORCED, force_calibration, image_bytes, random_image_bytes
from PIL import Image

import model_store


def _folder(root, per_class: int = 4):
    """A tiny image-folder data set: train/ and test/ with random images of every class."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _post_page(client, data=None):
    data = data or image_bytes(size=(64, 64))
    return client.post("/", data={"image": (io.BytesIO(data), "photo.jpg")}, content_type="multipart/form-data")


def test_flask_calibrate_on_an_image_folder_stores_a_calibration_the_api_and_card_show(app, runner, tmp_path):
    data = _folder(tmp_path / "data")
    result = runner.invoke(args=["calibrate", "1", "--data", str(data), "--val-fraction", "0.5"])
    assert result.exit_code == 0, result.output
    assert re.search(r"model 1 calibrated: temperature [\d.]+ .*ECE [\d.]+ -> [\d.]+", result.output)
    listed = app.test_client().get("/api/v1/models").get_json()["models"][0]["calibration"]
    assert listed["calibrated"] is True
    assert listed["temperature"] > 0 and 0 <= listed["confidence_threshold"] <= 1
    assert isinstance(listed["ood_threshold"], float) and listed["measured_on"] == "test"
    card = app.test_client().get("/models/1").get_data(as_text=True)
    assert "expected calibration error" in card and "Not calibrated" not in card
    for plot in ("reliability", "risk_coverage"):
        response = app.test_client().get(f"/models/1/{plot}.png")
        assert response.status_code == 200 and response.data.startswith(b"\x89PNG")


def test_flask_calibrate_refuses_a_missing_model_and_classes_the_model_lacks(app, runner, tmp_path):
    data = _folder(tmp_path / "data", per_class=2)
    assert "no model with id 9" in runner.invoke(args=["calibrate", "9", "--data", str(data)]).output
    (data / "train" / "teapot").mkdir()
    Image.new("RGB", (32, 32)).save(data / "train" / "teapot" / "0.png")
    result = runner.invoke(args=["calibrate", "1", "--data", str(data)])
    assert result.exit_code != 0 and "teapot" in result.output
    with app.app_context():
        assert model_store.get_calibration(1) is None


@pytest.mark.parametrize("decision", ["confident", "unsure", "unknown"])
def test_each_decision_in_the_api_and_on_the_page(app, client, decision):
    force_calibration(app, **FORCED[decision])
    response = client.post(
        "/api/v1/predict",
        data={"image": (io.BytesIO(random_image_bytes()), "x.png")},
        content_type="multipart/form-data",
    )
    answer = response.get_json()["predictions"][0]
    assert answer["decision"] == decision and isinstance(answer["ood_score"], float)
    assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    html = _post_page(client).get_data(as_text=True)
    assert f'data-decision="{decision}"' in html
    if decision == "unsure":
        assert re.search(r"Not sure: maybe .*\([\d.]+ %\)\s+or \w+ \([\d.]+ %\)", html)
    elif decision == "unknown":
        assert "This does not look like any of: airplane, automobile, bird" in html
        assert "<details" in html and "Show the probabilities anyway" in html
    else:
        assert "✓ confident" in html and "Not sure" not in html


def test_served_probabilities_are_the_calibrated_ones(app, client):
    plain = client.post("/api/v1/predict", data=random_image_bytes(), content_type="image/png").get_json()
    record = force_calibration(app, **FORCED["confident"])
    calibrated = client.post("/api/v1/predict", data=random_image_bytes(), content_type="image/png").get_json()
    logits = np.log([plain["predictions"][0]["probabilities"][name] for name in CIFAR10])
    if record["logit_norm"] == "l2":
        centred = logits - logits.mean()
        logits = centred / np.linalg.norm(centred)
    expected = np.exp(logits / record["temperature"])
    expected /= expected.sum()
    got = [calibrated["predictions"][0]["probabilities"][name] for name in CIFAR10]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_an_uncalibrated_model_serves_plain_softmax_and_always_confident(app, client):
    answer = client.post("/api/v1/predict", data=random_image_bytes(), content_type="image/png").get_json()
    assert answer["predictions"][0]["decision"] == "confident" and answer["predictions"][0]["ood_score"] is None
    assert client.get("/api/v1/models").get_json()["models"][0]["calibration"] == {"calibrated": False}
    assert "Not calibrated." in client.get("/models/1").get_data(as_text=True)
    assert "This model is not calibrated" in _post_page(client).get_data(as_text=True)
    assert client.get("/models/1/reliability.png").status_code == 404


def test_history_records_and_filters_decisions_and_counts_none_of_these(app, client):
    force_calibration(app, **FORCED["unknown"])
    _post_page(client)
    force_calibration(app, **FORCED["unsure"])
    _post_page(client)
    unknown = client.get("/history?decision=unknown").get_data(as_text=True)
    assert unknown.count('class="history-row"') == 1 and "decision-tag decision-unknown" in unknown
    assert client.get("/history?decision=confident").get_data(as_text=True).count('class="history-row"') == 0
    assert client.get("/history?decision=bogus").status_code == 404
    response = client.post("/predictions/1/feedback", data={"verdict": "none"}, follow_redirects=True)
    html = response.get_data(as_text=True)
    assert "marked as none of the classes" in html and "marked none of these classes" in html
    # The per-version table: 2 predictions, 1 marked, 0 right, 1 none of these.
    assert re.search(r"<td>2</td><td>1</td>\s*<td>0 % \(0/1\)</td>\s*<td>1</td>", html)


def test_flask_predict_prints_the_decision(app, runner, tmp_path):
    force_calibration(app, **FORCED["unsure"])
    photo = tmp_path / "a.png"
    photo.write_bytes(random_image_bytes())
    result = runner.invoke(args=["predict", str(photo)])
    assert result.exit_code == 0, result.output
    assert re.search(r"a\.png: unsure: \w+ [\d.]+%.*\(ood score -?[\d.]+\)", result.output)


def test_a_running_server_picks_up_a_new_calibration_of_its_model(app, client):
    first = client.post("/api/v1/predict", data=random_image_bytes(), content_type="image/png").get_json()
    assert first["predictions"][0]["decision"] == "confident"
    force_calibration(app, **FORCED["unknown"])
    again = client.post("/api/v1/predict", data=random_image_bytes(), content_type="image/png").get_json()
    assert again["predictions"][0]["decision"] == "unknown"


def test_a_model_imported_with_a_calibration_in_its_metrics_stores_it(app, seed_model_file):
    record = force_calibration(app, **FORCED["unsure"])
    with app.app_context():
        row = model_store.import_model(seed_model_file, name="trained", metrics={"calibration": record})
        assert model_store.get_calibration(row.id)["confidence_threshold"] == 1.0
        assert "calibration" not in row.metrics
        model_store.activate(row.id)
        model_store.delete(1)  # its calibration goes with it
        assert model_store.get_calibration(1) is None


def test_the_card_shows_the_per_group_ood_table_recorded_with_the_model(app, client):
    force_calibration(app, **FORCED["confident"])
    groups = [
        {"group": "noise", "images": 200, "auroc_ood": 0.999, "accepted_ood": 0.0, "auroc_top_probability": 0.921,
         "accepted_top_probability": 0.56, "unknown_share": 1.0},
    ]  # fmt: skip
    with app.app_context():
        row = model_store.get_model(1)
        row.metrics = {**row.metrics, "ood_evaluation": {"command": "python x", "test_images": 10000, "groups": groups}}
        model_store.db.session.commit()
    card = client.get("/models/1").get_data(as_text=True)
    assert "Images that are none of the classes" in card and "10,000 test images" in card
    assert re.search(r"<td>noise</td><td>200</td><td>0.999</td><td>0.0 %</td>\s*<td>0.921</td><td>56.0 %</td>", card)
