"""What a prediction costs beside the model: recording it in the history is one INSERT per image
and a commit, with no SELECT to read its id back (benchmarks/request_cost.py measures the rest;
drift monitoring's own sample and window statements are its business, not the history's)."""

from __future__ import annotations

from helpers import random_image_bytes
from sqlalchemy import event

from database import db


def test_recording_a_prediction_reads_nothing_back(app, client):
    statements = []
    with app.app_context():
        engine = db.engine

    def seen(conn, cursor, statement, *args):
        statements.append(" ".join(statement.split()).lower())

    event.listen(engine, "before_cursor_execute", seen)
    try:
        response = client.post("/api/v1/predict", data=random_image_bytes(1), content_type="image/png")
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert response.status_code == 200 and response.get_json()["predictions"][0]["id"] == 1
    history_inserts = [s for s in statements if s.startswith("insert into predictions ")]
    history_reads = [s for s in statements if s.startswith("select") and " from predictions" in s]
    assert len(history_inserts) == 1 and not history_reads, statements
