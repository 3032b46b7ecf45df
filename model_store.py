"""The model registry: trained Keras models stored as versioned BLOBs in the SQL database.

Import validates a file before anything is committed and stores the model as the sandbox
re-saved it, without HDF5 (registry/model_files.py, model_sandbox.py, docs/decisions/0001 say why);
rehydration writes the active model's BLOB to the instance folder under its sha256 so each
process can load it. The sandbox also converts each model for the serving engine, stored beside
it (engine_store.py); a web worker serves that conversion (`served_engine_file`). Versions stored
in an older format, or without a conversion, are re-saved and converted once by
`flask models upgrade-files` (`upgrade_files`), never while serving.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    func,
    inspect,
    select,
)
from sqlalchemy.orm import Mapped, deferred, mapped_column

import engine_store
from database import db
from inference import calibration
from inference.lite_engine import INT8_FORMAT
from model_sandbox import (
    EXPORT_SUFFIXES,
    ImportLimits,
    SandboxError,
    check_size,
    describe_in_child,
    describe_model_file,
    engine_file_of,
    export_in_child,
    export_model_file,
)
from predictor import INPUT_SCALES, OUTPUT_KINDS, TTA_MODES
from registry import metrics_schema
from registry.model_formats import STORED_FORMAT, ModelStoreError
from registry.model_formats import load_keras_model as load_keras_model  # the loader callers know as model_store's
from registry.model_spec import SETTING_DEFAULTS, ModelSpec

FIRST_REVISION = "0001"
# The serving engine's conversions an import may store (`flask models import --engine`).
ENGINES = ("fp32", "int8")
# The metrics anyone may see (the API, the model card): an allow-list, so a key a new script adds
# stays for operators until it is listed here. True: the whole value; a dict: those of its keys.
# Left out: where and how the model was trained (paths, commands, the data's hash, report files),
# which operators see. (An imported model's "calibration" goes to its own table, not the metrics.)
PUBLIC_METRICS: dict[str, object] = {
    **dict.fromkeys(
        (
            "arch",
            "class_names",
            "input_shape",
            "input_scale",
            "output_kind",
            "tta",
            "explain_layer",
            "imported_from",
            "test_accuracy",
            "per_class_accuracy",
            "confusion_matrix",
            "best_val_accuracy",
            "final_val_accuracy",
            "history",
            "epochs",
            "recipe",
            "random_seed",
            "distribute",
            "replicas",
            "train_images",
            "val_images",
            "test_images",
            "parameters",
            "train_time_s",
            "wall_time_s",
            "inference",
            "cpu_count",
        ),
        True,
    ),
    "ood_evaluation": {"test_images": True, "groups": True},
}


def public_metrics(metrics: dict, allowed: dict | None = None) -> dict:
    """The part of a model's metrics in the PUBLIC_METRICS allow-list, nested keys included."""
    allowed = PUBLIC_METRICS if allowed is None else allowed
    public = {}
    for key, value in metrics.items():
        rule = allowed.get(key)
        if rule is True:
            public[key] = value
        elif isinstance(rule, dict) and isinstance(value, dict):
            public[key] = public_metrics(value, rule)
    return public


class ModelNotFound(ModelStoreError):
    """No model with that id."""

    code = "not_found"


class ModelVersion(db.Model):
    """One stored model file with its metadata; exactly one row is active at a time."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_model_name_version"),
        # A partial unique index: the database itself refuses a second active row.
        Index(
            "ix_one_active_model",
            "is_active",
            unique=True,
            sqlite_where=db.text("is_active"),
            postgresql_where=db.text("is_active"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    filename: Mapped[str] = mapped_column(String(255), nullable=False)
    format: Mapped[str] = mapped_column(String(20), nullable=False)
    blob: Mapped[bytes] = deferred(mapped_column(LargeBinary, nullable=False))
    size: Mapped[int] = mapped_column(Integer, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    class_names: Mapped[list] = mapped_column(JSON, nullable=False)
    input_shape: Mapped[list] = mapped_column(JSON, nullable=False)
    input_scale: Mapped[str] = mapped_column(String(20), nullable=False, default=SETTING_DEFAULTS["input_scale"])
    output_kind: Mapped[str] = mapped_column(String(20), nullable=False, default=SETTING_DEFAULTS["output_kind"])
    tta: Mapped[str] = mapped_column(String(20), nullable=False, default=SETTING_DEFAULTS["tta"])
    metrics: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)

    def to_dict(self) -> dict:
        """Metadata for the API and templates, without the BLOB."""
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "filename": self.filename,
            "format": self.format,
            "size": self.size,
            "sha256": self.sha256,
            "class_names": list(self.class_names),
            "input_shape": list(self.input_shape),
            "input_scale": self.input_scale,
            "output_kind": self.output_kind,
            "tta": self.tta,
            "metrics": self.metrics,
            "created_at": self.created_at.isoformat(),
            "is_active": self.is_active,
        }


class ModelCalibration(db.Model):
    """A model's calibration (see inference/calibration.py and inference/ood.py): a small public summary, the record
    without its OOD arrays (what the model card reads: a few kB of JSON) and those arrays as a
    safetensors BLOB (megabytes), loaded only when the model is served."""

    __tablename__ = "model_calibrations"

    model_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    summary: Mapped[dict] = mapped_column(JSON, nullable=False)
    record: Mapped[dict] = deferred(mapped_column(JSON, nullable=False))
    stats: Mapped[bytes | None] = deferred(mapped_column(LargeBinary, nullable=True))


def init_db() -> None:
    """Create or upgrade the schema with the Alembic migrations (`flask db upgrade`).

    A database made before migrations existed (the registry table, no alembic_version) is first
    stamped at the first revision, so upgrading keeps its models.
    """
    from flask_migrate import stamp, upgrade

    # A migration may alter a table this session has read: PostgreSQL would wait on its lock.
    db.session.close()
    tables = set(inspect(db.engine).get_table_names())
    if "model_versions" in tables and "alembic_version" not in tables:
        stamp(revision=FIRST_REVISION)
    upgrade()


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inspect_model_bytes(
    data: bytes, filename: str, limits: ImportLimits | None = None, engine_options: dict | None = None
) -> tuple[dict, bytes, bytes]:
    """Validate model bytes within `limits`; their description (format, input shape, output
    width and kind, the engine conversion's metadata), the model re-saved without HDF5 and its
    conversion for the serving engine (`engine_options`: model_sandbox.convert_for_engine's).
    Without limits the default caps apply and the file is loaded in this process."""
    limits = limits or ImportLimits(isolated=False)
    try:
        check_size(len(data), filename, limits)
        with tempfile.TemporaryDirectory() as scratch:
            # Not even the format is read here: the child recognises the file (a zip's directory
            # is parsed to tell a registry file from a .keras one).
            path, served = Path(scratch) / "upload", Path(scratch) / f"served.{STORED_FORMAT}"
            path.write_bytes(data)
            if limits.isolated:
                described = describe_in_child(path, filename, limits, served, engine_options)
            else:
                described = describe_model_file(path, filename, limits.max_params, served, engine_options)
            return described, served.read_bytes(), engine_file_of(served).read_bytes()
    except SandboxError as exc:
        raise ModelStoreError(str(exc)) from exc


def _check_choice(value: str, allowed, what: str) -> str:
    if value not in allowed:
        raise ModelStoreError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
    return value


def import_model(
    path: str | Path,
    *,
    name: str | None = None,
    class_names: list[str] | tuple[str, ...] | None = None,
    metrics: dict | None = None,
    input_scale: str | None = None,
    output_kind: str | None = None,
    tta: str | None = None,
    activate: bool = False,
    limits: ImportLimits | None = None,
    engine: str = "fp32",
) -> ModelVersion:
    """Validate a model file and store it as the next version of `name`, in one transaction.

    Settings not given come from `metrics` (as train.py writes them), then from the file itself,
    then from the seed's defaults. The first model stored is activated whatever `activate` says.
    `limits` caps the file (the CLI passes the app's, with the validation load in a child process).
    `engine` "int8" stores a dynamic-range int8 conversion for serving instead of fp32; the
    metrics' calibration (fitted on the Keras model) is then not stored: `flask calibrate` refits
    it on the int8 outputs (lite_engine.check_calibration_fits refuses the mix).
    """
    path = Path(path)
    limits = limits or ImportLimits(isolated=False)
    try:
        check_size(path.stat().st_size, path.name, limits)
        data = path.read_bytes()
    except OSError as exc:
        raise ModelStoreError(f"cannot read {path}: {exc.strerror}") from exc
    except SandboxError as exc:
        raise ModelStoreError(str(exc)) from exc
    if metrics is not None and not isinstance(metrics, dict):
        raise ModelStoreError("metrics must be a JSON object")
    metrics = metrics_schema.normalise(metrics or {})
    # train.py puts the calibration fitted on its held-out split here; it is stored on its own.
    calibration_record = metrics.pop("calibration", None)
    quantize = _check_choice(engine, ENGINES, "engine") == "int8"
    options = {**_engine_options(metrics.get("explain_layer"), calibration_record), "quantize": quantize}
    described, served, conversion = inspect_model_bytes(data, path.name, limits, options)
    # What the file says of its output comes after what the caller and the metrics say.
    spec = ModelSpec.from_metrics(
        {"output_kind": described["output_kind"], **metrics},
        described["input_shape"],
        class_names=class_names,
        input_scale=input_scale,
        output_kind=output_kind,
        tta=tta,
    )
    names = list(spec.class_names)
    if len(set(names)) != len(names) or not all(n.strip() for n in names):
        raise ModelStoreError("class names must be unique and non-empty")
    if described["output_width"] != len(names):
        raise ModelStoreError(
            f"{path.name}: the model has {described['output_width']} outputs but {len(names)} class names were given"
        )
    row = ModelVersion(
        name=name or metrics.get("name") or path.stem,
        filename=f"{path.stem[:240]}.{STORED_FORMAT}",
        format=STORED_FORMAT,
        blob=served,
        size=len(served),
        sha256=sha256_of(served),
        class_names=names,
        input_shape=described["input_shape"],
        input_scale=_check_choice(spec.input_scale, INPUT_SCALES, "input scale"),
        output_kind=_check_choice(spec.output_kind, OUTPUT_KINDS, "output kind"),
        tta=_check_choice(spec.tta, TTA_MODES, "test-time augmentation"),
        metrics={**metrics, "imported_from": _provenance(path.name, data, described["format"])},
        created_at=datetime.now(UTC),
    )
    with _transaction():
        latest = db.session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == row.name))
        row.version = (latest or 0) + 1
        _check_one_conversion(row.sha256, described["engine"]["format"])
        db.session.add(row)
        db.session.flush()
        engine_store.put(row.sha256, conversion, described["engine"], sha256_of(conversion))
        if calibration_record and not quantize:
            put_calibration(row.id, calibration_record)
        if activate or get_active() is None:
            set_active(row)
    return row


def _check_one_conversion(sha256: str, fmt: str) -> None:
    """A model file has one conversion, which every version of that file serves: refuse to store a
    file already stored with a conversion of another format."""
    found = engine_store.get(sha256)
    if found is not None and found.format != fmt:
        holders = db.session.scalars(select(ModelVersion.id).where(ModelVersion.sha256 == sha256)).all()
        if holders:
            raise ModelStoreError(
                f"this model file is already stored (model {', '.join(map(str, holders))}) and served through a "
                f"{found.format} conversion; one file has one conversion: import it with that engine, or delete those"
            )


def _engine_options(explain_layer: str | None, calibration_record: dict | None) -> dict:
    """What the engine's conversion must answer beyond its defaults: the calibration's OOD layers."""
    layers = ((calibration_record or {}).get("ood") or {}).get("layers") or []
    return {"feature_layers": list(layers), "explain_layer": explain_layer}


def _provenance(filename: str, data: bytes, fmt: str) -> dict:
    """What the operator imported, since the registry stores the model re-saved."""
    return {"filename": filename, "format": fmt, "size": len(data), "sha256": sha256_of(data)}


@contextmanager
def _transaction() -> Iterator[None]:
    """Commit what the block did, or roll all of it back."""
    try:
        yield
        db.session.commit()
    except Exception:
        db.session.rollback()
        raise


def list_models() -> list[ModelVersion]:
    """All versions, newest first, without loading BLOBs."""
    return list(db.session.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())))


def get_model(model_id: int) -> ModelVersion:
    row = db.session.get(ModelVersion, model_id)
    if row is None:
        raise ModelNotFound(f"no model with id {model_id}")
    return row


def get_active() -> ModelVersion | None:
    return db.session.scalar(select(ModelVersion).where(ModelVersion.is_active.is_(True)))


def get_calibration(model_id: int) -> dict | None:
    """A model's calibration record without its OOD arrays (what the model card shows), or None
    when it is not calibrated."""
    return db.session.scalar(select(ModelCalibration.record).where(ModelCalibration.model_id == model_id))


def get_full_calibration(model_id: int) -> dict | None:
    """The whole calibration record, OOD arrays included (what serving applies), or None."""
    found = db.session.execute(
        select(ModelCalibration.record, ModelCalibration.stats).where(ModelCalibration.model_id == model_id)
    ).first()
    return calibration.join_record(found.record, found.stats) if found else None


def calibration_summaries() -> dict[int, dict]:
    """The public summary of every calibrated model, by model id."""
    rows = db.session.execute(select(ModelCalibration.model_id, ModelCalibration.summary))
    return {model_id: summary for model_id, summary in rows}


def set_calibration(model_id: int, record: dict) -> None:
    """Store (or replace) a model's calibration; a serving process reloads it on activation."""
    get_model(model_id)
    with _transaction():
        put_calibration(model_id, record)


def put_calibration(model_id: int, record: dict) -> datetime:
    """Store (or replace) a model's calibration in the caller's transaction; its new time, which
    makes serving workers reload the model (serving.registry_assignments)."""
    row = db.session.get(ModelCalibration, model_id) or ModelCalibration(model_id=model_id)
    row.created_at = datetime.now(UTC)
    row.summary = calibration.summary(record)
    row.record, row.stats = calibration.split_record(record)
    db.session.add(row)
    return row.created_at


def set_active(row: ModelVersion) -> None:
    """Flag `row` active and clear the previous one, in the caller's transaction (the rollout
    state changes champions this way, with its event in the same commit)."""
    current = get_active()
    if current is not None and current.id != row.id:
        current.is_active = False
        db.session.flush()  # the partial unique index needs the old flag cleared first
    row.is_active = True


def activate(model_id: int) -> ModelVersion:
    """Make one version the active one, after checking its BLOB is intact."""
    row = get_model(model_id)
    verify(row)
    with _transaction():
        set_active(row)
    return row


def delete(model_id: int) -> None:
    """Delete an inactive version."""
    row = get_model(model_id)
    if row.is_active:
        raise ModelStoreError(f"model {model_id} is the active model; activate another one first")
    with _transaction():
        db.session.delete(row)
        shared = db.session.scalar(select(func.count()).where(ModelVersion.sha256 == row.sha256))
        if not shared and (conversion := engine_store.get(row.sha256)) is not None:
            db.session.delete(conversion)  # no other version is that file


def verify(row: ModelVersion) -> None:
    """Raise if the stored BLOB no longer matches its recorded sha256 or size."""
    blob = row.blob
    if len(blob) != row.size or sha256_of(blob) != row.sha256:
        raise ModelStoreError(f"model {row.id} is corrupt: its BLOB does not match the recorded sha256")


def export(model_id: int, destination: str | Path, limits: ImportLimits | None = None) -> Path:
    """Write a version out: a standard Keras file when `destination` ends in .keras or .h5
    (written and checked in the sandbox under `limits`), else the stored file byte for byte.
    The BLOB's hash is checked first either way."""
    row = get_model(model_id)
    verify(row)
    destination = Path(destination)
    if destination.is_dir():
        destination = destination / row.filename
    if destination.suffix not in EXPORT_SUFFIXES:
        atomic_write(destination, row.blob)
        return destination
    if row.format != STORED_FORMAT:
        raise ModelStoreError(_upgrade_needed(row))
    limits = limits or ImportLimits(isolated=False)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".tmp-") as scratch:
        source, written = Path(scratch) / f"model.{STORED_FORMAT}", Path(scratch) / f"export{destination.suffix}"
        source.write_bytes(row.blob)
        try:
            if limits.isolated:
                export_in_child(source, written, limits)
            else:
                export_model_file(source, written)
        except SandboxError as exc:
            raise ModelStoreError(str(exc)) from exc
        os.replace(written, destination)
    return destination


def atomic_write(destination: Path, data: bytes) -> None:
    """Write to a temporary file beside the destination, then rename: readers never see half a file."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=destination.parent, prefix=".tmp-", suffix=destination.suffix)
    try:
        with os.fdopen(handle, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, destination)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def served_file(row: ModelVersion, directory: str | Path) -> Path:
    """The file a worker loads: the rehydrated BLOB, refused for a version still stored in an
    older format (`flask models upgrade-files` converts those once, in the sandbox)."""
    if row.format != STORED_FORMAT:
        raise ModelStoreError(_upgrade_needed(row))
    return rehydrate(row, directory)


def served_engine_file(row: ModelVersion, directory: str | Path) -> tuple[Path, dict]:
    """The serving engine's file of a version in `directory`, named by its own sha256 (written
    only when missing or wrong, after checking its BLOB), and its metadata; a ModelStoreError
    when the version has no conversion (`flask models upgrade-files` makes them once)."""
    found = engine_store.get(row.sha256)
    if found is None:
        raise ModelStoreError(
            f"model {row.id} has no conversion for the serving engine: run `flask models upgrade-files` once "
            "to convert it (in the import sandbox)"
        )
    path = Path(directory) / f"{found.sha256}.tflite"
    if path.exists() and sha256_of(path.read_bytes()) == found.sha256:
        return path, found.details
    blob = found.blob
    if len(blob) != found.size or sha256_of(blob) != found.sha256:
        raise ModelStoreError(f"model {row.id}'s engine file is corrupt: its BLOB does not match the recorded sha256")
    atomic_write(path, blob)
    return path, found.details


def _upgrade_needed(row: ModelVersion) -> str:
    return (
        f"model {row.id} is stored as {row.format}, not as a registry .{STORED_FORMAT} file: "
        "run `flask models upgrade-files` once to convert it"
    )


def upgrade_files(limits: ImportLimits | None = None) -> list[tuple[ModelVersion, str]]:
    """Re-save every version stored in an older format (.h5, .keras or the first .npz file) as a
    registry file, and convert every version the serving engine has no conversion of (or one
    without its calibration's OOD layers), through the import sandbox under `limits`, one
    transaction per version; the versions changed, each with what it was (its old format, or
    "no engine file"). A version that fails stops the run, unchanged."""
    changed = []
    for row in list(db.session.scalars(select(ModelVersion).order_by(ModelVersion.id))):
        record, conversion = get_calibration(row.id), engine_store.get(row.sha256)
        options = _engine_options((row.metrics or {}).get("explain_layer"), record)
        # An int8 version stays int8: its calibration was fitted on int8 outputs.
        options["quantize"] = conversion is not None and conversion.format == INT8_FORMAT
        if row.format == STORED_FORMAT and engine_store.covers(row.sha256, tuple(options["feature_layers"])):
            continue
        verify(row)
        if row.format != STORED_FORMAT:
            before = row.format
        else:
            before = "no engine file" if conversion is None else "no features of its OOD layers"
        described, served, engine = inspect_model_bytes(row.blob, row.filename, limits, options)
        if described["output_width"] != len(row.class_names) or described["input_shape"] != list(row.input_shape):
            raise ModelStoreError(f"model {row.id}: the converted file no longer matches its registry row")
        with _transaction():
            row.blob, row.size, row.sha256, row.format = served, len(served), sha256_of(served), STORED_FORMAT
            row.filename = f"{Path(row.filename).stem[:240]}.{STORED_FORMAT}"
            engine_store.put(row.sha256, engine, described["engine"], sha256_of(engine))
        changed.append((row, before))
    return changed


def rehydrate(row: ModelVersion, directory: str | Path) -> Path:
    """The model's file in `directory`, named by its sha256; written only when missing or wrong."""
    path = Path(directory) / f"{row.sha256}.{row.format}"
    if path.exists() and sha256_of(path.read_bytes()) == row.sha256:
        return path
    verify(row)
    atomic_write(path, row.blob)
    return path
