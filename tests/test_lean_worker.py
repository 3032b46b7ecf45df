"""A web worker serves with the lean engine and never imports TensorFlow: a fresh process (the test
process has TensorFlow loaded) builds the real app on the test's database, loads the model as a
worker's poller does (the champion, and a canary's challenger that answers every image), answers a
prediction with its heat map, a page, the chosen class's map, the model card, the history, the
health check and, as an operator, the Monitoring, Label, label queue and Models pages, then reports
what it imported (neither TensorFlow nor, since the heat maps' colours are the module's own,
matplotlib)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BASE_CONFIG
from helpers import make_user

import model_store

ROOT = Path(__file__).resolve().parent.parent

WORKER = """
import io, json, sys
import numpy as np
from PIL import Image
from app import create_app
from web.extensions import model_serving

app = create_app(json.loads(sys.argv[1]))
model_serving.start(app, wait_seconds=60)  # as gunicorn's post_worker_init: the poller's first load
client = app.test_client()
buffer = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(buffer, "PNG")
image = buffer.getvalue()
answers = {}
api = client.post("/api/v1/predict?explain=1", data={"image": (io.BytesIO(image), "a.png")},
                  content_type="multipart/form-data")
answers["api_model"] = api.get_json()["model"]["id"]
answers["api"] = [api.status_code, api.get_json()["predictions"][0]["saliency_grid"] is not None,
                  api.get_json()["explanation"]]
page = client.post("/", data={"image": (io.BytesIO(image), "a.png")}, content_type="multipart/form-data")
answers["page"] = [page.status_code, 'class="saliency-map"' in page.text]
for name, path in [("explain", "/predictions/2/explain?class=cat"), ("card", "/models/1"), ("history", "/history"),
                   ("healthz", "/healthz"), ("models", "/api/v1/models")]:
    answers[name] = client.get(path).status_code
answers["engine"] = type(app.extensions["model_serving"].slots.slot().explainer).__name__
challenger = app.extensions["model_serving"].slots.slot("challenger")
answers["challenger"] = type(challenger.explainer).__name__ if challenger else None
client.post("/login", data={"username": "op", "password": "correct horse"})
for name, path in [("monitoring", "/monitoring"), ("label", "/label"), ("queue", "/label/queue"),
                   ("models_page", "/models")]:
    answers[name] = client.get(path).status_code
model_serving.stop(app)
heavy = {"tensorflow", "keras", "tf_keras", "h5py", "matplotlib"}  # matplotlib: the model card's plots only
answers["imported"] = sorted({name.split(".")[0] for name in sys.modules} & heavy)
print(json.dumps(answers))
"""


@pytest.mark.slow
@pytest.mark.backend_independent("what a worker imports; its pages and queries on PostgreSQL are the other tests'")
def test_a_worker_answers_pages_api_card_history_and_maps_without_tensorflow(app, runner, other_model_file):
    make_user(runner, "op", role="operator")
    with app.app_context():
        challenger = model_store.import_model(other_model_file, name="challenger").id
    # Every image to the challenger: it answers (and explains) through the engine too.
    assert runner.invoke(args=["models", "canary", str(challenger), "--share", "100"]).exit_code == 0
    config = {**BASE_CONFIG, "MODEL_POLL_SECONDS": 60}
    config |= {key: app.config[key] for key in ("INSTANCE_PATH", "SQLALCHEMY_DATABASE_URI", "MODEL_CACHE_DIR")}
    result = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(config)], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert answers["api"] == [200, True, {"layer": answers["api"][2]["layer"]}]
    assert answers["page"] == [200, True]
    assert [answers[name] for name in ("explain", "card", "history", "healthz", "models")] == [200] * 5
    assert answers["api_model"] == challenger
    assert answers["engine"] == answers["challenger"] == "LiteExplainer"
    assert [answers[name] for name in ("monitoring", "label", "queue", "models_page")] == [200] * 4
    assert answers["imported"] == []
