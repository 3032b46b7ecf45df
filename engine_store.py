"""The serving engine's files in the registry: each stored model file's LiteRT conversion.

The import sandbox converts every model it stores (model_sandbox.convert_for_engine); the file
and its metadata (the engine's outputs, the Grad-CAM head) are kept in `engine_files`, keyed by the
sha256 of the model file they were converted from, so a re-saved model (`flask models
upgrade-files`) is never served through a conversion of its old bytes. A web worker rehydrates
the file under its own sha256 (model_store.served_engine_file) and serves it with
inference/lite_engine.LiteEngine, without TensorFlow. Versions stored before conversions existed
are converted once by `flask models upgrade-files` (model_store.upgrade_files), never while
serving.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, Integer, LargeBinary, String, select
from sqlalchemy.orm import Mapped, deferred, mapped_column

from database import db


class EngineFile(db.Model):
    """A model file converted for the serving engine, linked to it by the model file's sha256."""

    __tablename__ = "engine_files"

    model_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    format: Mapped[str] = mapped_column(String(20), nullable=False)
    blob: Mapped[bytes] = deferred(mapped_column(LargeBinary, nullable=False))
    size: Mapped[int] = mapped_column(Integer, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    details: Mapped[dict] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


def put(model_sha256: str, data: bytes, metadata: dict, sha256: str) -> None:
    """Store (or replace) the conversion of the model file `model_sha256`, in the caller's transaction."""
    row = db.session.get(EngineFile, model_sha256) or EngineFile(model_sha256=model_sha256)
    row.format, row.blob, row.size, row.sha256 = metadata["format"], data, len(data), sha256
    row.details, row.created_at = metadata, datetime.now(UTC)
    db.session.add(row)


def get(model_sha256: str) -> EngineFile | None:
    return db.session.get(EngineFile, model_sha256)


def covers(model_sha256: str, feature_layers: tuple[str, ...] = ()) -> bool:
    """Whether the model file has a conversion answering the pooled features of `feature_layers`."""
    details = db.session.scalar(select(EngineFile.details).where(EngineFile.model_sha256 == model_sha256))
    return details is not None and set(feature_layers) <= set(details["feature_layers"])
