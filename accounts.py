"""Accounts and API keys: who may use the app, and whose predictions are whose.

Passwords are stored as werkzeug.security hashes; API keys are random tokens of which only the
SHA-256 is stored, so the database alone never lets anyone use one. A browser session names an
account by its random session token, not its id: changing the token (log-out, new password, new
role, disabling) ends every session of the account, and a deleted account's cookie names no one.
Repeated failed log-ins lock an account for a while. A `Viewer` is the person a
request speaks for (an account, or an anonymous browser session); the prediction history uses it
to show each person only their own predictions, and operators all of them.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import ClassVar

from sqlalchemy import DateTime, ForeignKey, Integer, String, UniqueConstraint, select, update
from sqlalchemy.orm import Mapped, mapped_column
from werkzeug.security import check_password_hash, generate_password_hash

from app_errors import AppError
from database import db

ROLES = ("operator", "member")
KEY_PREFIX = "ick_"  # image-classifier key: lets secret scanners and people recognise one
MIN_PASSWORD_LENGTH = 8
# werkzeug's scrypt default, spelled out: OWASP's N=2^17 costs 0.9 s a login on this app's server
# (benchmarks/password_hash.py). Hashes made with another method are redone at the next log-in.
PASSWORD_METHOD = "scrypt:32768:8:1"
_NO_ONES_PASSWORD = "not a password of anyone"


@dataclass
class _Hashing:
    """How new password hashes are made, for the whole process (set_password_method), and a hash
    of no one's password in that method, checked when the name is unknown so that a failed login
    takes as long whether or not the name exists (made at the first need)."""

    method: str = PASSWORD_METHOD
    dummy_hash: str | None = None

    def dummy(self) -> str:
        if self.dummy_hash is None:
            self.dummy_hash = generate_password_hash(_NO_ONES_PASSWORD, method=self.method)
        return self.dummy_hash


_hashing = _Hashing()
_DEFAULT_N, _DEFAULT_R, _ = (int(number) for number in PASSWORD_METHOD.split(":")[1:])


def _weaker_than_default(method: str) -> bool:
    """Whether an scrypt method costs an attacker less than PASSWORD_METHOD: a smaller N (time and
    memory per guess) or r (memory); p buys no memory. Any other algorithm counts as weaker."""
    name, *numbers = method.split(":")
    if name != "scrypt":
        return True
    n, r, _p = (int(number) for number in numbers)
    return n < _DEFAULT_N or r < _DEFAULT_R


def set_password_method(method: str, allow_weaker: bool = False) -> None:
    """Make new password hashes with `method` (a werkzeug.security method, e.g. scrypt:65536:8:1).
    One cheaper than PASSWORD_METHOD is refused unless `allow_weaker`: only the test suite asks for
    that (TESTING), where every account made or log-in would otherwise cost 0.15 s of CPU. The
    method holds for the whole process (one app per worker process)."""
    method = str(method)
    if method == _hashing.method:
        spelled, dummy_hash = _hashing.method, _hashing.dummy_hash
    else:  # hashed once: werkzeug refuses a method it does not know, and says how it spells it
        try:
            dummy_hash = generate_password_hash(_NO_ONES_PASSWORD, method=method)
        except ValueError as error:
            raise ValueError(f"PASSWORD_HASH_METHOD {method!r} is not a werkzeug.security method: {error}") from None
        # As werkzeug spells it in its hashes ("scrypt" -> "scrypt:32768:8:1"), so that a stored
        # hash is recognised as current at log-in.
        spelled = dummy_hash.split("$", 1)[0]
    if _weaker_than_default(spelled) and not allow_weaker:
        raise ValueError(f"PASSWORD_HASH_METHOD {method!r} is cheaper to guess than {PASSWORD_METHOD}")
    _hashing.method, _hashing.dummy_hash = spelled, dummy_hash


def password_method() -> str:
    """The method new password hashes are made with."""
    return _hashing.method


def _hash(password: str) -> str:
    return generate_password_hash(password, method=_hashing.method)


class AccountError(AppError):
    """An account or key operation that cannot be done; the message says why."""

    code = "bad_account"


class AccountLocked(AccountError):
    """Too many failed log-ins in a row: the account refuses log-ins for a while."""

    code = "account_locked"


def _session_token() -> str:
    return secrets.token_urlsafe(32)


class User(db.Model):
    """An account. The four members Flask-Login asks of a user are here, so this module needs no Flask."""

    __tablename__ = "users"
    # SQLite would otherwise give a deleted account's id to the next account made.
    __table_args__: ClassVar[tuple] = (
        UniqueConstraint("session_token", name="uq_users_session_token"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), nullable=False, unique=True)
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    role: Mapped[str] = mapped_column(String(10), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    session_token: Mapped[str] = mapped_column(String(64), nullable=False, default=_session_token)
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_logins: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    is_authenticated = True
    is_anonymous = False

    @property
    def is_active(self) -> bool:
        return self.disabled_at is None

    def get_id(self) -> str:
        """What the session cookie keeps: the session token, which ends with the session."""
        return self.session_token

    def end_sessions(self) -> None:
        """A new session token: every cookie holding the old one names no one now (not committed)."""
        self.session_token = _session_token()

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
    password_hash = _hash(password)
    user = User(name=name, password_hash=password_hash, role=role, created_at=datetime.now(UTC))
    db.session.add(user)
    db.session.commit()
    return user


def find_user(name: str) -> User | None:
    return db.session.scalar(select(User).where(User.name == name))


def _existing(name: str) -> User:
    user = find_user(name)
    if user is None:
        raise AccountError(f"no user named {name!r}")
    return user


def list_users() -> list[User]:
    return list(db.session.scalars(select(User).order_by(User.name)))


def user_for_session(token: str) -> User | None:
    """The enabled account whose current session token this is, or None."""
    return db.session.scalar(select(User).where(User.session_token == token, User.disabled_at.is_(None)))


def set_password(name: str, password: str) -> User:
    """A new password; the account's sessions end."""
    _validate(name, password, None)
    user = _existing(name)
    user.password_hash = _hash(password)
    user.failed_logins, user.locked_until = 0, None
    user.end_sessions()
    db.session.commit()
    return user


def set_role(name: str, role: str) -> User:
    """A new role; the account's sessions end, so no page keeps the old role's view."""
    _validate(name, None, role)
    user = _existing(name)
    user.role = role
    user.end_sessions()
    db.session.commit()
    return user


def set_disabled(name: str, disabled: bool) -> User:
    """Disable an account (its sessions end; log-ins and its API keys are refused) or enable it again."""
    user = _existing(name)
    if disabled and user.disabled_at is None:
        user.disabled_at = datetime.now(UTC)
        user.end_sessions()
    elif not disabled:
        user.disabled_at, user.failed_logins, user.locked_until = None, 0, None
    db.session.commit()
    return user


def end_sessions(user: User) -> None:
    """Log the account out everywhere."""
    user.end_sessions()
    db.session.commit()


def delete_user(name: str) -> None:
    """Delete an account with its keys and its predictions (the foreign keys cascade)."""
    db.session.delete(_existing(name))
    db.session.commit()


@dataclass(frozen=True)
class Lockout:
    """After `failures` failed log-ins in a row, an account refuses log-ins for `duration`."""

    failures: int = 10
    duration: timedelta = timedelta(minutes=15)


def authenticate(name: str, password: str, lockout: Lockout | None = None) -> User | None:
    """The enabled user with that name and password, or None; AccountLocked while locked out."""
    lockout = lockout or Lockout()
    user = find_user(name)
    if user is None:
        check_password_hash(_hashing.dummy(), password)
        return None
    now = datetime.now(UTC)
    if user.locked_until is not None and _aware(user.locked_until) > now:
        raise AccountLocked(
            f"Too many failed log-ins: this account accepts none until {_aware(user.locked_until):%H:%M} UTC."
        )
    if not check_password_hash(user.password_hash, password):
        _count_failure(user, lockout, now)
        return None
    if not user.is_active:
        return None
    user.failed_logins, user.locked_until = 0, None
    if not user.password_hash.startswith(_hashing.method + "$"):
        user.password_hash = _hash(password)
    db.session.commit()
    return user


def _count_failure(user: User, lockout: Lockout, now: datetime) -> None:
    # Counted in SQL, so failures sent at once by several workers all count.
    db.session.execute(update(User).where(User.id == user.id).values(failed_logins=User.failed_logins + 1))
    db.session.commit()
    if user.failed_logins >= lockout.failures:
        user.failed_logins, user.locked_until = 0, now + lockout.duration
        db.session.commit()


def _aware(moment: datetime) -> datetime:
    """SQLite gives back naive datetimes (stored as UTC); PostgreSQL aware ones."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


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
    """The enabled user of a live (not revoked) key, or None. Looked up by hash: the hash is the index."""
    statement = (
        select(User)
        .join(ApiKey, ApiKey.user_id == User.id)
        .where(ApiKey.key_sha256 == _hash_key(key), ApiKey.revoked_at.is_(None), User.disabled_at.is_(None))
    )
    return db.session.scalar(statement)
