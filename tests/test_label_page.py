"""The Label page and the queue page, through the real app: privacy, answers, keys, CSRF."""

from __future__ import annotations

import re

from helpers import classify, login, make_user, random_image_bytes

import prediction_history
from database import db
from labelling import store


def member_predicts(app, name: str, *seeds: int) -> tuple:
    client = app.test_client()
    login(client, name)
    body = classify(client, *[random_image_bytes(seed) for seed in seeds]).get_json()
    return client, [p["id"] for p in body["predictions"]]


def build_round(app, size: int = 20) -> None:
    with app.app_context():
        store.build(size, lambda ids: [[float(i == j) for j in range(100)] for i in ids], None, 0)


def shown_item(html: str) -> int:
    return int(re.search(r"<strong>#(\d+)</strong>", html).group(1))


def item_id(html: str) -> int:
    return int(re.search(r'action="/label/items/(\d+)"', html).group(1))


def test_a_member_labels_only_their_own_predictions_one_at_a_time(app, runner):
    make_user(runner, "max")
    make_user(runner, "olga")
    max_client, max_ids = member_predicts(app, "max", 1, 2, 3)
    olga_client, olga_ids = member_predicts(app, "olga", 4, 5)
    build_round(app)
    html = max_client.get("/label").get_data(as_text=True)
    assert "0 of 3 labelled" in html and shown_item(html) in max_ids
    # One button per class with its key, "none of these" and skip; the page's script only adds keys.
    assert html.count('name="answer"') == 12 and 'data-key="1"' in html and 'data-key="0"' in html
    assert 'data-key="n"' in html and 'data-key="s"' in html and "label.js" in html
    first = shown_item(html)
    response = max_client.post(f"/label/items/{item_id(html)}", data={"answer": "cat", "position": 0})
    assert response.status_code == 302
    with app.app_context():
        row = prediction_history.get(first)
        assert row.feedback_author == "max" and row.labelled_class == "cat"
    html = max_client.get(response.headers["Location"]).get_data(as_text=True)
    assert "1 of 3 labelled" in html and shown_item(html) in max_ids and shown_item(html) != first
    # Olga's item is not found for max, and nothing is written.
    olga_html = olga_client.get("/label").get_data(as_text=True)
    assert shown_item(olga_html) in olga_ids and "0 of 2 labelled" in olga_html
    assert max_client.post(f"/label/items/{item_id(olga_html)}", data={"answer": "cat"}).status_code == 404
    with app.app_context():
        assert prediction_history.get(shown_item(olga_html)).feedback is None


def test_skip_moves_on_without_writing_and_none_is_feedback(app, runner):
    make_user(runner, "max")
    client, _ids = member_predicts(app, "max", 1, 2)
    build_round(app)
    html = client.get("/label").get_data(as_text=True)
    skipped = shown_item(html)
    response = client.post(f"/label/items/{item_id(html)}", data={"answer": "skip", "position": 0})
    html = client.get(response.headers["Location"]).get_data(as_text=True)
    other = shown_item(html)
    assert other != skipped and "0 of 2 labelled" in html
    response = client.post(f"/label/items/{item_id(html)}", data={"answer": "none", "position": 1})
    html = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "start again from the first" in html
    with app.app_context():
        assert prediction_history.get(skipped).feedback is None
        assert prediction_history.get(other).feedback == "none"
    assert (
        client.post(
            f"/label/items/{item_id(client.get('/label').get_data(as_text=True))}", data={"answer": "bogus"}
        ).status_code
        == 400
    )


def test_the_label_page_needs_an_account_and_its_forms_the_csrf_token(app, runner):
    assert app.test_client().get("/label").status_code == 302
    make_user(runner, "max")
    app.config["WTF_CSRF_ENABLED"] = True
    client = app.test_client()
    client.post("/login", data={"username": "max", "password": "correct horse", "csrf_token": _token(client)})
    html = client.get("/label").get_data(as_text=True)
    assert "Nothing is queued" in html
    assert client.post("/label/items/1", data={"answer": "cat"}).status_code == 400


def _token(client) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").get_data(as_text=True)).group(1)


def test_operators_label_everyones_items_and_decide_on_held_feedback(app, runner):
    make_user(runner, "max")
    make_user(runner, "root", role="operator")
    max_client, max_ids = member_predicts(app, "max", 1, 2)
    operator = app.test_client()
    login(operator, "root")
    with app.app_context():
        row = prediction_history.get(max_ids[0])
        other = next(c for c in row.class_names if c != row.top_class)
    # Against a "confident" answer (the seed-like model is uncalibrated): held.
    max_client.post(f"/predictions/{max_ids[0]}/feedback", data={"verdict": "wrong", "correct_class": other})
    assert max_client.get("/label/queue").status_code == 403
    assert max_client.post(f"/label/held/{max_ids[0]}", data={"decision": "confirm"}).status_code == 403
    build_round(app)
    html = operator.get("/label").get_data(as_text=True)
    assert shown_item(html) in max_ids and "0 of 2 labelled" in html
    queue_html = operator.get("/label/queue").get_data(as_text=True)
    assert f'id="held{max_ids[0]}"' in queue_html and "contradicts a confident" in queue_html
    assert "conflict" in queue_html and "random" in queue_html
    assert operator.post(f"/label/held/{max_ids[0]}", data={"decision": "maybe"}).status_code == 400
    assert operator.post(f"/label/held/{max_ids[0]}", data={"decision": "confirm"}).status_code == 302
    assert f'id="held{max_ids[0]}"' not in operator.get("/label/queue").get_data(as_text=True)
    with app.app_context():
        assert store.held() == [] and db.session.get(store.LabelVote, 1).author == "root"
