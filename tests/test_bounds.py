"""Bounded parameters: every integer in a route or query is bounded (404 or 400, never a 500),
feedback classes come from the prediction row itself, and the metrics' method label is a fixed set.

Each request below was a 500 with a traceback (OverflowError into SQLite, int("²")); CI runs these
again on PostgreSQL."""

import pytest
from flask_migrate import upgrade
from helpers import image_bytes, login, make_user, serve_registry
from sqlalchemy import text

import engine_store
import model_store
import prediction_history
from database import db
from registry.model_spec import CIFAR10_CLASSES

HUGE = "99999999999999999999"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/history?page=999999999999999999", 404),
        (f"/history?model={HUGE}", 404),
        ("/history?page=0", 404),
        (f"/predictions/{HUGE}/thumbnail.jpg", 404),
        (f"/models/{HUGE}", 404),
        (f"/models/{HUGE}/curves.png", 404),
        ("/models/2147483648", 404),
    ],
)
def test_huge_integers_in_routes_and_queries_are_404(client, path, status):
    response = client.get(path)
    assert response.status_code == status
    assert "Traceback" not in response.get_data(as_text=True)


def test_huge_prediction_id_in_feedback_is_404(client):
    assert client.post(f"/predictions/{HUGE}/feedback", data={"verdict": "right"}).status_code == 404


@pytest.mark.parametrize("top_k", ["%C2%B2", "%D9%A3", "0", "1001", "-1", "1e3", HUGE])
def test_top_k_must_be_an_ascii_decimal_within_bounds(client, top_k):
    response = client.post(f"/api/v1/predict?top_k={top_k}", data=image_bytes(), content_type="image/jpeg")
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "bad_top_k"


def _predict_then_delete_the_model(app, client, other_model_file) -> int:
    with app.app_context():
        other_id = model_store.import_model(other_model_file, name="other", activate=True).id
    serve_registry(app)
    prediction_id = client.post("/api/v1/predict", data=image_bytes(), content_type="image/jpeg").get_json()[
        "predictions"
    ][0]["id"]
    with app.app_context():
        model_store.activate(next(r.id for r in model_store.list_models() if r.name == "seed"))
        model_store.delete(other_id)
    return prediction_id


def test_feedback_after_the_model_is_deleted_is_checked_against_the_row(app, client, other_model_file):
    prediction_id = _predict_then_delete_the_model(app, client, other_model_file)
    with app.app_context():
        row = prediction_history.get(prediction_id)
        other_class = next(name for name in row.class_names if name != row.top_class)
    for bad in ("unicorn", "x" * 5000):
        data = {"verdict": "wrong", "correct_class": bad}
        response = client.post(f"/predictions/{prediction_id}/feedback", data=data)
        assert response.status_code == 400
    response = client.post(
        f"/predictions/{prediction_id}/feedback", data={"verdict": "wrong", "correct_class": other_class}
    )
    assert response.status_code == 302
    with app.app_context():
        assert prediction_history.get(prediction_id).correct_class == other_class


def test_upgrade_fills_class_names_from_the_model_and_refuses_unknown_ones(bare_app, seed_model_file, monkeypatch):
    # Schema 0002's format column is 10 characters (0007 widens it for "safetensors"): the row is
    # labelled as the registry of that time labelled its files; its model is never loaded here.
    monkeypatch.setattr(model_store, "STORED_FORMAT", "npz")
    # Nor had it conversions: none to store, none to look up.
    monkeypatch.setattr(engine_store, "put", lambda *args: None)
    monkeypatch.setattr(engine_store, "get", lambda *args: None)
    with bare_app.app_context():
        upgrade(revision="0002")  # the schema before predictions stored their classes
        model_id = model_store.import_model(seed_model_file, name="old").id
        for linked in (model_id, None):
            db.session.execute(
                text(
                    "INSERT INTO predictions (created_at, model_id, model_name, model_version, source, filename,"
                    " top_class, confidence, image_sha256) VALUES (CURRENT_TIMESTAMP, :model, 'old', 1, 'api',"
                    " 'a.png', 'cat', 0.5, :sha)"
                ),
                {"model": linked, "sha": "0" * 64},
            )
        db.session.commit()
        model_store.init_db()
        linked_row, orphan_row = db.session.scalars(prediction_history.query()).all()[::-1]
        assert linked_row.class_names == list(CIFAR10_CLASSES)
        assert orphan_row.class_names is None
        linked_id, orphan_id = linked_row.id, orphan_row.id
    client = bare_app.test_client()
    # Rows from before accounts belong to nobody: only an operator may mark them.
    make_user(bare_app.test_cli_runner(), "olga", role="operator")
    login(client, "olga")
    answer = client.post(f"/predictions/{linked_id}/feedback", data={"verdict": "wrong", "correct_class": "dog"})
    assert answer.status_code == 302
    answer = client.post(f"/predictions/{orphan_id}/feedback", data={"verdict": "wrong", "correct_class": "dog"})
    assert answer.status_code == 400 and "not known" in answer.get_data(as_text=True)
    assert client.post(f"/predictions/{orphan_id}/feedback", data={"verdict": "right"}).status_code == 302


def test_made_up_methods_share_one_metrics_label(client):
    for method in ("FOO", "BREW", "X" * 50):
        client.open("/healthz", method=method)
    exposition = client.get("/metrics").get_data(as_text=True)
    assert 'method="other"' in exposition
    assert "FOO" not in exposition and "BREW" not in exposition
