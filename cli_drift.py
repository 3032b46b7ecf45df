"""`flask drift ...`: the drift windows report and fitting a model's drift reference."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import click
from flask import current_app
from flask.cli import AppGroup

import model_store
from cli_types import ISO_TIME
from model_store import ModelStoreError
from monitoring import store, windows
from monitoring.reference import Reference
from serving import spec_of

drift_group = AppGroup("drift", help="Drift monitoring: the windows report and each model's reference.")


def store_reference_file(model_id: int, path: Path) -> str:
    """Store a drift reference file for a model; what was done, or why it was not stored (a
    file that cannot be read, or fitted for other classes)."""
    try:
        reference = Reference.from_bytes(path.read_bytes())
    except (OSError, ValueError) as exc:
        return f"drift reference not stored: cannot read {path}: {exc}"
    if tuple(reference.class_names) != tuple(model_store.get_model(model_id).class_names):
        return f"drift reference not stored: {path} was fitted for other classes than model {model_id}'s"
    store.set_reference(model_id, reference)
    return f"drift reference stored ({len(reference.sample)} held-out images)"


@drift_group.command("report")
@click.option("--since", type=ISO_TIME, help="only windows starting at or after this ISO time (UTC unless it says)")
@click.option("--json", "as_json", is_flag=True, help="print JSON: {'windows': [...]}")
def report_command(since: datetime | None, as_json: bool) -> None:
    """Every closed drift window: its count, estimated accuracy and alerts (input, prediction, model)."""
    windows.close_all()
    found = windows.windows(since)
    if as_json:
        click.echo(json.dumps({"windows": [windows.to_json(w) for w in found]}, indent=2))
        return
    if not found:
        click.echo(
            "no drift windows yet: a window closes every 500 predictions made since a model's reference was fitted"
        )
        return
    click.echo(f"{'model':<24} {'kind':<5} {'start':<16} {'count':>6} {'est. acc.':>12} {'min p':>9}  alerts")
    for w in found:
        model = f"{w.model_name[:18]} v{w.model_version}"
        accuracy = f"{w.estimated_accuracy * 100:.1f}±{w.accuracy_se * 100:.1f}%"
        click.echo(
            f"{model:<24} {w.kind:<5} {w.start:%Y-%m-%d %H:%M} {w.count:>6} {accuracy:>12} {w.min_p_value:>9.2g}  "
            f"{', '.join(w.alerts) or '-'}"
        )


@drift_group.command("fit-reference")
@click.argument("model_id", type=int)
@click.option("--data", required=True, type=click.Path(exists=True, path_type=Path), help="image-folder data set")
@click.option(
    "--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1, show_default=True
)
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the held-out split")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="also write the reference file here")
def fit_reference_command(model_id: int, data: Path, val_fraction: float, seed: int, out: Path | None) -> None:
    """Fit a calibrated model's drift reference on the held-out images its calibration used
    (`flask calibrate` does it too); the same --val-fraction and --seed as the calibration."""
    from training.calibration_fit import fit_drift_reference, folder_splits

    try:
        row = model_store.get_model(model_id)
        record = model_store.get_full_calibration(model_id)
        if record is None:
            raise ValueError("the model is not calibrated: run `flask calibrate` (it fits the reference too)")
        model = model_store.load_keras_model(model_store.served_file(row, current_app.config["MODEL_CACHE_DIR"]))
        splits = folder_splits(spec_of(row), data, val_fraction, seed)
        reference = fit_drift_reference(model, spec_of(row), record, splits.heldout_images, splits.source)
    except (ModelStoreError, ValueError) as exc:
        raise click.ClickException(f"no reference fitted: {exc}") from exc
    windows.close_period_windows(model_id)  # the days and weeks due, with the reference they were recorded under
    store.set_reference(model_id, reference)
    if out is not None:
        out.write_bytes(reference.to_bytes())
    summary = reference.summary()
    click.echo(
        f"drift reference of model {model_id}: {summary['images']} held-out images, estimated accuracy "
        f"{summary['estimated_accuracy'] * 100:.1f}%, unknown {summary['unknown_rate'] * 100:.1f}%, "
        f"{summary['pca_components']} PCA components ({(summary['pca_explained'] or 0) * 100:.0f}% of the variance)"
    )
