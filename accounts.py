"""Accounts and API keys: who may use the app, and whose predictions are whose.

Passwords are stored as werkzeug.security hashes; API keys are random tokens of which only the
SHA-256 is stored, so the database alone never lets anyone use one. A `Viewer` is the person a
request speaks for (an account, or an anonymous browser session); the prediction history uses it
to show each person only their own predictions, and operators all of them.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import DateTime, ForeignKey, Integer, String, select
from sqlalchemy.orm import Mapped, mapped_column
from werkzeug.security import check_password_hash, generate_password_hash

from app_errors import AppError
from database import db

ROLES = ("operator", "member")
KEY_PREFIX = "ick_"  # image-classifier key: lets secret scanners and people recognise one
MIN_PASSWORD_LENGTH = 8
# Checked when the name is unknown, so a failed login takes as long whether or not the name exists.
_DUMMY_HASH = generate_password_hash("not a password of anyone")


class AccountError(AppError):
    """An account or key operation that cannot be done; the message says why."""

    code = "bad_account"


class User(db.Model):
    """An account. The four members Flask-Login asks of a user are here, so this module needs no Flask."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), nullable=False, unique=True)
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    role: Mapped[str] = mapped_column(String(10), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)

    is_authenticated = True
    is_active = True
    is_anonymous = False

    def get_id(self) -> str:
        return str(self.id)

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


class ApiKey(db.Model):
    """An API key of a user: its name, the first characters (to tell keys apart) and the hash."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    prefix: Mapped[str] = mapped_column(String(12), nullable=False)
    key_sha256: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class Viewer:
    """Whom a request speaks for: an account (`user_id`), else an anonymous browser session."""

    user_id: int | None = None
    session_id: str | None = None
    operator: bool = False
    name: str = "anonymous"

    @classmethod
    def of(cls, user: User) -> Viewer:
        return cls(user_id=user.id, operator=user.is_operator, name=user.name)


def _validate(name: str, password: str | None, role: str | None) -> None:
    if not name or len(name) > 100 or not name.isprintable() or name != name.strip():
        raise AccountError("a user name is 1 to 100 printable characters, without spaces around it")
    if password is not None and len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"a password has at least {MIN_PASSWORD_LENGTH} characters")
    if role is not None and role not in ROLES:
        raise AccountError(f"the role is one of: {', '.join(ROLES)}")


def create_user(name: str, password: str, role: str = "member") -> User:
    _validate(name, password, role)
    if find_user(name) is not None:
        raise AccountError(f"a user named {name!r} exists already")
    user = User(name=name, password_hash=generate_password_hash(password), role=role, created_at=datetime.now(UTC))
    db.session.add(user)
    db.session.commit()
    return user


def find_user(name: str) -> User | None:
    return db.session.scalar(select(User).where(User.name == name))


def get_user(user_id: int) -> User | None:
    return db.session.get(User, user_id)


def _existing(name: str) -> User:
    user = find_user(name)
    if user is None:
        raise AccountError(f"no user named {name!r}")
    return user


def list_users() -> list[User]:
    return list(db.session.scalars(select(User).order_by(User.name)))


def set_password(name: str, password: str) -> User:
    _validate(name, password, None)
    user = _existing(name)
    user.password_hash = generate_password_hash(password)
    db.session.commit()
    return user


def delete_user(name: str) -> None:
    """Delete an account with its keys and its predictions (the foreign keys cascade)."""
    db.session.delete(_existing(name))
    db.session.commit()


def authenticate(name: str, password: str) -> User | None:
    """The user with that name and password, or None."""
    user = find_user(name)
    if user is None:
        check_password_hash(_DUMMY_HASH, password)
        return None
    return user if check_password_hash(user.password_hash, password) else None


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(name: str, user_name: str) -> tuple[ApiKey, str]:
    """A new key for a user: the stored row, and the key itself (shown once, never stored)."""
    if not name or len(name) > 100:
        raise AccountError("a key name is 1 to 100 characters")
    user = _existing(user_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name, user_id=user.id, prefix=key[:12], key_sha256=_hash_key(key), created_at=datetime.now(UTC))
    db.session.add(row)
    db.session.commit()
    return row, key


def list_api_keys() -> list[tuple[ApiKey, str]]:
    """Every key with its user's name, oldest first."""
    statement = select(ApiKey, User.name).join(User, ApiKey.user_id == User.id).order_by(ApiKey.id)
    return [(key, user_name) for key, user_name in db.session.execute(statement)]


def revoke_api_key(key_id: int) -> ApiKey:
    row = db.session.get(ApiKey, key_id)
    if row is None:
        raise AccountError(f"no API key with id {key_id}")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
        db.session.commit()
    return row


def user_for_key(key: str) -> User | None:
    """The user of a live (not revoked) key, or None. Looked up by hash: the hash is the index."""
    statement = (
        select(User)
        .join(ApiKey, ApiKey.user_id == User.id)
        .where(ApiKey.key_sha256 == _hash_key(key), ApiKey.revoked_at.is_(None))
    )
    return db.session.scalar(statement)
