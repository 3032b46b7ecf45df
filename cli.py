"""`flask` commands for the operator: the database, the model registry (`flask models ...`),
predictions from files and the feedback export."""

from __future__ import annotations

from pathlib import Path

import click
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext

import cli_rollout
import model_store
from cli_accounts import COMMANDS as ACCOUNT_COMMANDS
from cli_drift import drift_group, store_reference_file
from cli_label_queue import COMMANDS as LABEL_QUEUE_COMMANDS
from database import db
from inference import heatmap
from inference.lite_engine import INT8_FORMAT, LiteEngine
from labelling import store as label_store
from model_sandbox import ImportLimits
from model_store import ModelStoreError
from monitoring import store as drift_store
from monitoring import windows as drift_windows
from monitoring.reference import REFERENCE_FILE
from predictor import INPUT_SCALES, OUTPUT_KINDS, ImageError
from registry import metrics_schema
from rollout import state as rollout_state
from serving import Upload, clean_filename, spec_of
from web.extensions import model_serving

models_group = AppGroup(
    "models",
    help="The model registry: import, list, activate, export, delete, check, upgrade-files; champion and "
    "challenger: shadow, canary, promote, rollback, compare, audit.",
)


def _fail(message: str) -> None:
    raise click.ClickException(message)


def _read_metrics(path: Path) -> dict:
    """A metrics JSON, normalised, with the calibration.safetensors beside it (registry/metrics_schema.py)."""
    try:
        return metrics_schema.read_metrics(path)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from exc


def _sidecar_metrics(model_path: Path) -> dict:
    """train.py's metrics.json beside a model file, when there is one."""
    sidecar = model_path.with_name("metrics.json")
    return _read_metrics(sidecar) if sidecar.is_file() else {}


@click.command("init-db")
@with_appcontext
def init_db_command() -> None:
    """Create the database tables (safe to run again)."""
    model_store.init_db()
    click.echo(f"database ready: {db.engine.url.render_as_string(hide_password=True)}")


@models_group.command("import")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", help="registry name (default: from metrics.json, else the file name)")
@click.option("--classes", help="comma-separated class names in output order (default: metrics.json, else CIFAR-10)")
@click.option("--input-scale", type=click.Choice(list(INPUT_SCALES)), help="pixel scaling the model expects")
@click.option("--output-kind", type=click.Choice(OUTPUT_KINDS), help="what the last layer gives")
@click.option(
    "--metrics",
    "metrics_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="metrics JSON to store (default: metrics.json beside the model)",
)
@click.option("--activate", is_flag=True, help="make it the active model")
@click.option("--if-empty", is_flag=True, help="only import when the registry has no model yet")
@click.option(
    "--engine",
    type=click.Choice(model_store.ENGINES),
    default="fp32",
    show_default=True,
    help="the serving engine's conversion: int8 (dynamic range) is faster and smaller but needs `flask calibrate`",
)
def import_model_command(
    path, name, classes, input_scale, output_kind, metrics_path, activate, if_empty, engine
) -> None:
    """Validate a Keras model file and store it as a new version."""
    if if_empty and model_store.list_models():
        click.echo("the registry already has models; nothing imported")
        return
    if not path.is_file():
        _fail(f"no such file: {path}")
    metrics = _read_metrics(metrics_path) if metrics_path else _sidecar_metrics(path)
    class_names = [c.strip() for c in classes.split(",")] if classes else None
    try:
        row = model_store.import_model(
            path,
            name=name,
            class_names=class_names,
            metrics=metrics,
            input_scale=input_scale,
            output_kind=output_kind,
            activate=activate,
            limits=ImportLimits.from_config(current_app.config),
            engine=engine,
        )
    except ModelStoreError as exc:
        _fail(f"import refused, nothing was stored: {exc}")
    if row.is_active:
        rollout_state.record_activation(row, cli_rollout.actor(), "imported as the active version")
    state = "active" if row.is_active else "inactive"
    click.echo(f"imported {path.name} as model {row.id}: {row.name} v{row.version} ({state}, sha256 {row.sha256[:12]})")
    if engine == "int8":
        click.echo(
            f"served through a dynamic-range int8 conversion, uncalibrated: a calibration and drift reference "
            f"fitted on the Keras model are not stored; fit them on its int8 outputs with "
            f"`flask calibrate {row.id} --data DIR`"
        )
    elif path.with_name(REFERENCE_FILE).is_file():
        click.echo(store_reference_file(row.id, path.with_name(REFERENCE_FILE)))


@models_group.command("list")
def list_command() -> None:
    """List the registry."""
    rows = model_store.list_models()
    if not rows:
        click.echo("no models; import one with `flask --app app models import PATH`")
        return
    header = (
        f"{'id':>4}  {'name':<20} {'ver':>4}  {'created':<16}  {'classes':>7}  {'accuracy':>8}  {'size':>8}  active"
    )
    click.echo(header)
    for row in rows:
        accuracy = row.metrics.get("test_accuracy")
        accuracy_text = f"{accuracy * 100:.2f}%" if isinstance(accuracy, int | float) else "-"
        click.echo(
            f"{row.id:>4}  {row.name[:20]:<20} {row.version:>4}  {row.created_at:%Y-%m-%d %H:%M}  "
            f"{len(row.class_names):>7}  {accuracy_text:>8}  {row.size / 1e6:>6.1f}MB  {'*' if row.is_active else ''}"
        )


@models_group.command("activate")
@click.argument("model_id", type=int)
def activate_command(model_id: int) -> None:
    """Make a version the champion at once (recorded; any challenger ends); servers follow without a restart."""
    try:
        row = rollout_state.activate(model_id, cli_rollout.actor())
    except ModelStoreError as exc:
        _fail(str(exc))
    click.echo(f"model {row.id} ({row.name} v{row.version}) is now active")


@models_group.command("export")
@click.argument("model_id", type=int)
@click.argument("path", type=click.Path(path_type=Path))
def export_command(model_id: int, path: Path) -> None:
    """Write a version out: PATH ending in .keras or .h5 gets a standard Keras file (made in the
    import sandbox, loads with plain keras.models.load_model); any other PATH the registry's own
    file (.safetensors), byte for byte."""
    try:
        written = model_store.export(model_id, path, ImportLimits.from_config(current_app.config))
    except ModelStoreError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror}")
    click.echo(f"wrote {written}")


@models_group.command("upgrade-files")
def upgrade_files_command() -> None:
    """Re-save, once, every version stored in an older format (the first .npz file, or .h5 and
    .keras from before imports were re-saved) as a registry file, and convert every version the
    serving engine (LiteRT) has no file of, in the import sandbox. Safe to run again: it then does nothing."""
    try:
        converted = model_store.upgrade_files(ImportLimits.from_config(current_app.config))
    except ModelStoreError as exc:
        _fail(f"upgrade stopped: {exc}")
    for row, before in converted:
        click.echo(
            f"model {row.id} ({row.name} v{row.version}): {before} -> {row.format} "
            f"and the serving engine's file, {row.sha256[:12]}"
        )
    click.echo(
        f"{len(converted)} model(s) upgraded; every version is stored as {model_store.STORED_FORMAT}, "
        "with its serving engine's file"
    )


@models_group.command("delete")
@click.argument("model_id", type=int)
def delete_command(model_id: int) -> None:
    """Delete an inactive version that is not the running challenger."""
    try:
        rollout_state.delete(model_id)
    except (ModelStoreError, rollout_state.RolloutError) as exc:
        _fail(str(exc))
    click.echo(f"deleted model {model_id}")


@models_group.command("check")
def check_command() -> None:
    """Verify every stored model's BLOB against its sha256; exit 1 if any is corrupt."""
    bad = 0
    for row in model_store.list_models():
        try:
            model_store.verify(row)
            click.echo(f"ok       model {row.id} ({row.name} v{row.version})")
        except ModelStoreError as exc:
            bad += 1
            click.echo(f"CORRUPT  {exc}")
    active = model_store.get_active()
    click.echo(f"active model: {active.id if active else 'none'}")
    if bad:
        _fail(f"{bad} corrupt model(s)")


@click.command("predict")
@with_appcontext
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--explain", is_flag=True, help="write where the model looked for the top class: IMAGE.saliency.png")
def predict_command(images: tuple[Path, ...], top_k: int, explain: bool) -> None:
    """Classify image files with the active model and print the top classes."""
    model_serving.refresh()  # a one-shot command: load here, no poller
    uploads = [Upload(clean_filename(str(path)), path.read_bytes()) for path in images]
    explain_side = heatmap.OVERLAY_MAX_SIDE if explain else 0
    loaded = model_serving.slots.slot()
    if loaded is None:
        _fail(model_serving.slots.error())
    try:
        result = model_serving.classify(uploads, loaded, explain_side=explain_side)
    except ImageError as exc:
        _fail(exc.message)
    click.echo(f"model {loaded.id}: {loaded.name} v{loaded.version} ({result.elapsed_ms:.1f} ms)")
    if result.no_explanation:
        click.echo(result.no_explanation)
    for path, image in zip(images, result.images, strict=True):
        ranked = ", ".join(f"{name} {p * 100:.1f}%" for name, p in image.prediction.ranked[:top_k])
        click.echo(f"{path}: {image.prediction.decision}: {ranked}{_ood_text(image.prediction.ood_score)}")
        if image.saliency:
            click.echo(f"  where it looked for {image.saliency.class_name}: {_write_overlay(path, image.saliency)}")


def _write_overlay(image_path: Path, saliency) -> Path:
    """The overlay PNG beside the image: photo.jpg gets photo.jpg.saliency.png."""
    target = image_path.with_name(image_path.name + ".saliency.png")
    try:
        target.write_bytes(saliency.overlay_png)
    except OSError as exc:
        _fail(f"cannot write {target}: {exc.strerror}")
    return target


def _ood_text(score: float | None) -> str:
    return "" if score is None else f" (ood score {score:.2f})"


@click.command("export-feedback")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@with_appcontext
def export_feedback_command(directory: Path) -> None:
    """Write confirmed marked predictions as an image-folder data set DIR/<class>/<id>.jpg (for
    train.py --data); feedback the check holds, or an operator rejected, is held back."""
    counts, held_back = label_store.export_confirmed(directory)
    if held_back:
        parts = ", ".join(f"{count} {state}" for state, count in sorted(held_back.items()))
        click.echo(f"held back {sum(held_back.values())} marked predictions ({parts}): see the label queue page")
    if not counts:
        click.echo("no confirmed marked predictions with kept images; nothing written")
        return
    total = sum(counts.values())
    summary = ", ".join(f"{label} {count}" for label, count in sorted(counts.items()))
    click.echo(f"wrote {total} images to {directory}: {summary}")


@click.command("calibrate")
@with_appcontext
@click.argument("model_id", type=int)
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="image-folder data set (folder or archive): train/<class>/ images, optional test/<class>/",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.1,
    show_default=True,
    help="share of each class of train/ held out for the temperature and thresholds (never trained on)",
)
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the held-out split")
@click.option(
    "--target-accuracy",
    type=click.FloatRange(0.5, 1, max_open=True),
    default=0.98,
    show_default=True,
    help="answers above the 'not sure' threshold are right this often on the held-out images",
)
def calibrate_command(model_id: int, data: Path, val_fraction: float, seed: int, target_accuracy: float) -> None:
    """Fit a model's temperature, "not sure" threshold and "none of these" score on held-out images.

    The held-out images must not have been trained on: for a model trained by train.py on
    CIFAR-10 with its defaults, `--val-fraction 0.1 --seed 0` is its own validation split.
    """
    from training.calibration_fit import calibrate_folder, fit_drift_reference, folder_splits

    try:
        row = model_store.get_model(model_id)
        model = model_store.load_keras_model(model_store.served_file(row, current_app.config["MODEL_CACHE_DIR"]))
        engine = _int8_engine(row)
        splits = folder_splits(spec_of(row), data, val_fraction, seed)
        record = calibrate_folder(model, spec_of(row), splits, target_accuracy=target_accuracy, engine=engine)
        reference = fit_drift_reference(model, spec_of(row), record, splits.heldout_images, splits.source, engine)
        drift_windows.close_period_windows(model_id)  # the days and weeks due, under the fit they were recorded with
        model_store.set_calibration(model_id, record)
        drift_store.set_reference(model_id, reference)
    except (ModelStoreError, ValueError) as exc:
        _fail(f"not calibrated: {exc}")
    before, after = record["before"], record["after"]
    click.echo(
        f"model {model_id} calibrated: temperature {record['temperature']:.3f} ({record['logit_norm']} logit norm), "
        f"'not sure' below {record['confidence_threshold'] * 100:.1f}%; ECE {before['ece']:.3f} -> {after['ece']:.3f}, "
        f"coverage at 98%/99% accuracy {after['coverage_at_98'] * 100:.1f}%/{after['coverage_at_99'] * 100:.1f}% "
        f"({record['measured_on']} split, {after['images']} images; fitted on {record['fitted_on']} outputs)"
    )


def _int8_engine(row) -> LiteEngine | None:
    """The version's served int8 conversion, whose outputs its calibration must be fitted on (an fp32
    conversion answers as Keras does: None, fitted on the Keras model)."""
    path, metadata = model_store.served_engine_file(row, current_app.config["MODEL_CACHE_DIR"])
    return LiteEngine(path.read_bytes(), metadata) if metadata["format"] == INT8_FORMAT else None


def register_commands(app: Flask) -> None:
    """Attach the commands to `flask --app app`."""
    for command in cli_rollout.COMMANDS:
        models_group.add_command(command)
    for command in (
        init_db_command,
        models_group,
        predict_command,
        calibrate_command,
        export_feedback_command,
        drift_group,
        *ACCOUNT_COMMANDS,
        *LABEL_QUEUE_COMMANDS,
    ):
        app.cli.add_command(command)
