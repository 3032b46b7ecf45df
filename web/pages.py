"""The server-rendered pages: upload and results (with where the model looked), prediction history
with feedback, the models and their cards. Errors render as HTML; on the upload page they show
above the form.

Each person sees and changes only their own predictions (operators all): someone else's answers
404 like one that never existed."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from flask import Blueprint, Response, abort, current_app, flash, redirect, render_template, request, url_for

import model_store
import plot_cache
import prediction_history
from database import db
from inference.calibration import DECISIONS, ECE_BINS
from web.auth import current_viewer, is_operator, require_page_login
from web.classify import classify_request
from web.errors import describe, html_error
from web.extensions import model_serving
from web.limits import explain_limit, predict_limit
from web.privacy import no_store
from web.rollout_pages import rollout_view

bp = Blueprint("pages", __name__)
bp.before_request(require_page_login)

# Ids and page numbers beyond what the database's integer columns hold are answered 404 here,
# before they reach the database (SQLite raises OverflowError on them).
MAX_ID = 2**31 - 1
HISTORY_PAGE_SIZE = 20
# Heat maps on the pages are drawn at most this wide: twice the thumbnail, sharp on a phone.
PAGE_OVERLAY_SIDE = 256


@bp.errorhandler(Exception)
def page_error(exc: Exception):
    if request.path == url_for("pages.index"):
        message, _code, status = describe(exc)
        return render_template("index.html", error=message), status
    return html_error(exc)


@bp.get("/")
def index():
    return render_template("index.html")


@bp.post("/")
@predict_limit
@no_store
def classify():
    answered_by, result = classify_request("web", thumbnails=True, explain_side=PAGE_OVERLAY_SIDE)
    return render_template(
        "index.html",
        results=result.images,
        answered_by=answered_by,
        elapsed_ms=result.elapsed_ms,
        no_explanation=result.no_explanation,
    )


def _bounded_arg(name: str) -> int | None:
    """An integer query parameter, None when absent or not a number, 404 when out of range."""
    value = request.args.get(name, type=int)
    if value is not None and not 0 < value <= MAX_ID:
        abort(404)
    return value


@bp.get("/history")
@no_store
def history():
    top_class = request.args.get("class") or None
    decision = request.args.get("decision") or None
    if decision not in (None, *DECISIONS):
        abort(404)
    model_id = _bounded_arg("model")
    page_number = _bounded_arg("page") or 1
    if page_number * HISTORY_PAGE_SIZE > MAX_ID:
        abort(404)
    viewer = current_viewer()
    page = db.paginate(
        prediction_history.query(top_class, model_id, decision, viewer),
        page=page_number,
        per_page=HISTORY_PAGE_SIZE,
        error_out=False,
    )
    return render_template(
        "history.html",
        page=page,
        top_class=top_class,
        model_id=model_id,
        decision=decision,
        decisions=DECISIONS,
        models=model_store.list_models(),
        feedback=prediction_history.feedback_by_model(viewer),
        class_names=_known_classes(),
    )


@bp.get(f"/predictions/<int(max={MAX_ID}):prediction_id>/thumbnail.jpg")
@no_store
def prediction_thumbnail(prediction_id: int):
    thumbnail = prediction_history.get(prediction_id, current_viewer()).thumbnail
    if not thumbnail:
        abort(404)
    return Response(thumbnail, mimetype="image/jpeg")


@bp.get(f"/predictions/<int(max={MAX_ID}):prediction_id>/explain")
@no_store
@explain_limit
def prediction_explain(prediction_id: int):
    """Where the model looks in a recorded image for the class chosen (the top class by default),
    drawn from the kept thumbnail: the version that made the prediction while a slot serves it (a
    canary's challenger, say), else the champion."""
    row = prediction_history.get(prediction_id, current_viewer())
    if not row.thumbnail:
        abort(404, "This image was not kept (KEEP_IMAGES is off), so no map can be drawn for it.")
    served = {loaded.id: loaded for loaded in model_serving.slots.loaded().values()}
    loaded = served.get(row.model_id) or model_serving.slot()
    class_name = request.args.get("class") or row.top_class
    saliency = model_serving.explain_image(loaded, row.thumbnail, class_name, PAGE_OVERLAY_SIDE)
    return render_template("explain.html", prediction=row, saliency=saliency, answered_by=loaded)


@bp.post(f"/predictions/<int(max={MAX_ID}):prediction_id>/feedback")
def prediction_feedback(prediction_id: int):
    verdict = request.form.get("verdict", "")
    correct_class = request.form.get("correct_class") or None
    row = prediction_history.set_feedback(prediction_id, verdict, correct_class, current_viewer())
    note = {"right": "right", "none": "as none of the classes"}.get(row.feedback, f"wrong (it is {row.correct_class})")
    flash(f"Thank you: prediction #{row.id} of {row.filename} is marked {note}.")
    return redirect(url_for("pages.history", _anchor=f"p{row.id}"))


@bp.post(f"/predictions/<int(max={MAX_ID}):prediction_id>/delete")
def delete_prediction(prediction_id: int):
    prediction_history.delete_prediction(prediction_id, current_viewer())
    flash(f"Prediction #{prediction_id} and its thumbnail are deleted.")
    return redirect(url_for("pages.history"))


@bp.post("/history/forget")
def forget_history():
    removed = prediction_history.forget(current_viewer())
    flash(f"Forgotten: {removed} of your predictions and their thumbnails are deleted.")
    return redirect(url_for("pages.history"))


@bp.get("/models")
def models():
    return render_template("models.html", models=model_store.list_models(), rollout=rollout_view(is_operator()))


@bp.get(f"/models/<int(max={MAX_ID}):model_id>")
def model_card(model_id: int):
    model = model_store.get_model(model_id)
    return render_template(
        "model_card.html",
        model=model,
        metrics=model.metrics if is_operator() else model_store.public_metrics(model.metrics),
        calibration=model_store.get_calibration(model.id),
        ece_bins=ECE_BINS,
    )


@bp.get(f"/models/<int(max={MAX_ID}):model_id>/<any(curves, confusion, reliability, risk_coverage):plot>.png")
def model_plot(model_id: int, plot: str):
    row = model_store.get_model(model_id)
    inputs, draw = _plot_source(row, plot)
    # Drawn once per model and plot, then served from the instance folder.
    folder = Path(current_app.instance_path) / "plots"
    png = plot_cache.cached_png(folder, plot_cache.plot_key(row.sha256, plot, inputs), draw)
    return Response(png, mimetype="image/png", headers={"Cache-Control": "max-age=3600"})


def _plot_source(row, plot: str) -> tuple[object, Callable[[], bytes]]:
    """What a model-card plot is drawn from, and how; 404 when the model has no such data."""
    import reports  # matplotlib: imported by the first plot drawn, not by every worker at start-up

    metrics = row.metrics
    if plot in ("reliability", "risk_coverage"):
        record = model_store.get_calibration(row.id)
        if not record:
            abort(404)
        if plot == "reliability":
            inputs = [record["reliability_before"], record["reliability_after"], record["measured_on"]]
            return inputs, partial(reports.reliability_png, *inputs)
        inputs = [record["risk_coverage"], record["target_accuracy"], record["measured_on"]]
        return inputs, partial(reports.risk_coverage_png, *inputs)
    if plot == "curves" and metrics.get("history"):
        return metrics["history"], partial(reports.curves_png, metrics["history"])
    if plot == "confusion" and metrics.get("confusion_matrix"):
        names = metrics.get("class_names") or row.class_names
        inputs = [metrics["confusion_matrix"], names, metrics.get("test_accuracy", 0.0)]
        return inputs, partial(reports.confusion_png, *inputs)
    abort(404)


def _known_classes() -> list[str]:
    """Every class name of every stored model, for the history filter."""
    names: dict[str, None] = {}
    for row in model_store.list_models():
        names.update(dict.fromkeys(row.class_names))
    return list(names)
