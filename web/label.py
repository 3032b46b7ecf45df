"""The Label page: one queued image at a time for a person's label, and the operators' queue
page with the feedback the check holds (labelling/store.py does the work).

Members label their own queued predictions, operators everyone's; someone else's item is "not
found", as in the history. Every form carries the CSRF token; the keys (1-9, 0, n, s) are
static/label.js's, and each is a plain submit button without it.
"""

from __future__ import annotations

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import current_user

from labelling import ood_store, store
from web.auth import current_viewer, require_operator
from web.errors import html_error
from web.extensions import login_manager
from web.pages import MAX_ID
from web.privacy import no_store

bp = Blueprint("label", __name__, url_prefix="/label")
# Keys for the first ten classes, in the model's class order.
CLASS_KEYS = "1234567890"
SKIP = "skip"
# Top guesses shown beside the image.
TOP_GUESSES = 3


@bp.before_request
def require_account():
    """Members and operators label: a log-in prompt for anyone else."""
    if not current_user.is_authenticated:
        return login_manager.unauthorized()
    return None


@bp.errorhandler(Exception)
def label_error(exc: Exception):
    return html_error(exc)


@bp.get("")
@no_store
def label_next():
    after = request.args.get("after", -1, type=int)
    viewer = current_viewer()
    pair = store.next_item(viewer, after)
    done, total = store.progress(viewer)
    if pair is None:
        return render_template("label.html", item=None, done=done, total=total, skipped=after >= 0)
    item, row = pair
    probabilities = store.probabilities_of(row) or {row.top_class: row.confidence}
    guesses = sorted(probabilities.items(), key=lambda pair: pair[1], reverse=True)[:TOP_GUESSES]
    keys = dict(zip(row.class_names or [], CLASS_KEYS, strict=False))
    return render_template("label.html", item=item, prediction=row, guesses=guesses, keys=keys, done=done, total=total)


@bp.post(f"/items/<int(max={MAX_ID}):item_id>")
def answer(item_id: int):
    given = request.form.get("answer", "")
    position = request.form.get("position", -1, type=int)
    if given != SKIP:
        row = store.answer(item_id, given, current_viewer())
        flash(f"Labelled #{row.id} ({row.filename}): {given}.")
    return redirect(url_for("label.label_next", after=position))


@bp.get("/queue")
@no_store
def queue_page():
    require_operator("The label queue")
    label_round = store.latest_round()
    return render_template(
        "label_queue.html",
        label_round=label_round,
        lanes=store.summary(label_round) if label_round else [],
        items=store.round_items(label_round) if label_round else [],
        held=store.held(),
        ood=ood_store.status(),
        ood_changes=ood_store.changes(),
    )


@bp.post(f"/held/<int(max={MAX_ID}):prediction_id>")
def decide(prediction_id: int):
    require_operator("Deciding on held feedback")
    stance = request.form.get("decision", "")
    row = store.decide(prediction_id, stance, current_viewer())
    flash(f"Feedback on #{row.id} ({row.filename}) {'confirmed' if stance == 'confirm' else 'rejected'}.")
    return redirect(url_for("label.queue_page"))
