"""Model-card plots are drawn once per model and plot, then served from the instance folder."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import model_store
import reports

METRICS = {
    "history": {"loss": [2.0, 1.0], "val_loss": [2.1, 1.2], "accuracy": [0.3, 0.6]},
    "confusion_matrix": [[5 if row == col else 1 for col in range(10)] for row in range(10)],
    "test_accuracy": 0.875,
}


def count_draws(monkeypatch) -> dict[str, int]:
    counts = {"curves": 0, "confusion": 0}
    for plot, name in (("curves", "curves_png"), ("confusion", "confusion_png")):
        real = getattr(reports, name)

        def counted(*args, _real=real, _plot=plot, **kwargs):
            counts[_plot] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(reports, name, counted)
    return counts


def test_each_plot_is_drawn_once_then_read_from_the_cache(app, client, other_model_file, monkeypatch):
    with app.app_context():
        model_id = model_store.import_model(other_model_file, name="plotted", metrics=METRICS).id
    counts = count_draws(monkeypatch)
    for plot in ("curves", "confusion"):
        first = client.get(f"/models/{model_id}/{plot}.png")
        assert first.status_code == 200 and first.data.startswith(b"\x89PNG")
        with ThreadPoolExecutor(8) as pool:  # a flood of views, first of them concurrent
            answers = list(pool.map(lambda _, p=plot: app.test_client().get(f"/models/{model_id}/{p}.png"), range(8)))
        assert all(answer.data == first.data for answer in answers)
    assert counts == {"curves": 1, "confusion": 1}
    cached = sorted(path.name for path in (Path(app.instance_path) / "plots").iterdir())
    assert len(cached) == 2 and all(name.endswith(".png") for name in cached)


def test_first_views_at_once_draw_the_plot_once(app, other_model_file, monkeypatch):
    with app.app_context():
        model_id = model_store.import_model(other_model_file, name="plotted", metrics=METRICS).id
    counts = count_draws(monkeypatch)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: app.test_client().get(f"/models/{model_id}/curves.png"), range(6)))
    statuses = [answer.status_code for answer in answers]
    assert statuses == [200] * 6 and counts["curves"] == 1


def test_the_same_file_with_other_metrics_gets_its_own_plot(app, client, other_model_file):
    with app.app_context():
        first = model_store.import_model(other_model_file, name="one", metrics=METRICS).id
        changed = {**METRICS, "confusion_matrix": [[1] * 10] * 10}
        second = model_store.import_model(other_model_file, name="two", metrics=changed).id
    assert client.get(f"/models/{first}/confusion.png").data != client.get(f"/models/{second}/confusion.png").data
