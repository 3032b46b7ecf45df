"""The operators' Monitoring page: per model version, its drift windows (a plot drawn once per
window, and the recent windows with each test's statistic, p-value and verdict)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from flask import Blueprint, Response, current_app, render_template

import model_store
import plot_cache
from monitoring import store, windows
from web.auth import require_operator, require_page_login
from web.errors import WebError, html_error

bp = Blueprint("monitoring", __name__)
bp.before_request(require_page_login)
bp.register_error_handler(Exception, html_error)

RECENT_WINDOWS = 20
PLOTTED_WINDOWS = 200


@bp.before_request
def operators_only() -> None:
    require_operator("The Monitoring page")


@bp.get("/monitoring")
def monitoring():
    windows.close_all()
    found = windows.windows(limit=RECENT_WINDOWS * 3)
    model_ids = sorted({w.model_id for w in found if w.model_id is not None}, reverse=True)
    models = [model_store.get_model(model_id) for model_id in model_ids]
    active = model_store.get_active()
    if active is not None and active.id not in model_ids:
        models.insert(0, active)
    return render_template(
        "monitoring.html",
        models=[(row, store.reference_summary(row.id), [w for w in found if w.model_id == row.id]) for row in models],
        recent=RECENT_WINDOWS,
    )


@bp.get("/monitoring/<int(max=2147483647):model_id>/drift.png")
def drift_plot(model_id: int):
    row = model_store.get_model(model_id)
    found = [w for w in windows.windows(kind="count", limit=PLOTTED_WINDOWS) if w.model_id == model_id]
    if not found:
        raise WebError(f"model {model_id} has no drift windows yet", "not_found")
    data = [windows.to_json(w) for w in found]
    import reports  # matplotlib: imported by the first plot drawn, not by every worker at start-up

    # Keyed by the newest window: drawn once per window, then read from the instance folder.
    key = plot_cache.plot_key(row.sha256, "drift", [found[-1].id, len(found)])
    png = plot_cache.cached_png(Path(current_app.instance_path) / "plots", key, partial(reports.drift_png, data))
    return Response(png, mimetype="image/png", headers={"Cache-Control": "no-cache"})
