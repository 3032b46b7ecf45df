"""`flask` commands for accounts and privacy: `flask users ...`, `flask api-keys ...` and
`flask purge-history`."""

from __future__ import annotations

import sys

import click
from flask import current_app
from flask.cli import AppGroup, with_appcontext

import accounts
import prediction_history
from accounts import AccountError

users_group = AppGroup("users", help="Accounts: create, list, delete, set-password, set-role, disable, enable.")
keys_group = AppGroup("api-keys", help="API keys: create (printed once), list, revoke.")


def _password(from_stdin: bool) -> str:
    """One line of standard input, or a hidden prompt asked twice."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


def _run(action):
    """Run an account operation; its refusal is a clear message and exit status 1."""
    try:
        return action()
    except AccountError as exc:
        raise click.ClickException(str(exc)) from exc


@users_group.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(accounts.ROLES), default="member", show_default=True)
@click.option("--password-stdin", is_flag=True, help="read the password as one line of standard input")
def create_user_command(name: str, role: str, password_stdin: bool) -> None:
    """Create an account (the password is asked for, or read with --password-stdin)."""
    user = _run(lambda: accounts.create_user(name, _password(password_stdin), role))
    click.echo(f"created {user.role} {user.name}")


@users_group.command("list")
def list_users_command() -> None:
    """List the accounts."""
    users = accounts.list_users()
    if not users:
        click.echo("no accounts; create one with `flask --app app users create NAME --role operator`")
        return
    for user in users:
        click.echo(f"{user.id:>4}  {user.name:<30} {user.role:<8}  created {user.created_at:%Y-%m-%d %H:%M}")


@users_group.command("delete")
@click.argument("name")
def delete_user_command(name: str) -> None:
    """Delete an account with its API keys and its predictions."""
    _run(lambda: accounts.delete_user(name))
    click.echo(f"deleted {name}, its API keys and its predictions")


@users_group.command("set-password")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="read the password as one line of standard input")
def set_password_command(name: str, password_stdin: bool) -> None:
    """Set an account's password."""
    _run(lambda: accounts.set_password(name, _password(password_stdin)))
    click.echo(f"password of {name} changed")


@users_group.command("set-role")
@click.argument("name")
@click.argument("role", type=click.Choice(accounts.ROLES))
def set_role_command(name: str, role: str) -> None:
    """Change an account's role; its sessions end."""
    _run(lambda: accounts.set_role(name, role))
    click.echo(f"{name} is now {role}; its sessions are ended")


@users_group.command("disable")
@click.argument("name")
def disable_user_command(name: str) -> None:
    """Disable an account: its sessions end, and log-ins and its API keys are refused until enabled."""
    _run(lambda: accounts.set_disabled(name, True))
    click.echo(f"disabled {name}: its sessions are ended, its log-ins and API keys refused")


@users_group.command("enable")
@click.argument("name")
def enable_user_command(name: str) -> None:
    """Enable a disabled account again (and lift a log-in lockout)."""
    _run(lambda: accounts.set_disabled(name, False))
    click.echo(f"enabled {name}")


@keys_group.command("create")
@click.argument("name")
@click.option("--user", "user_name", required=True, help="the account the key acts for")
def create_key_command(name: str, user_name: str) -> None:
    """Create an API key; the key is the last line of the output and is not shown again."""
    row, key = _run(lambda: accounts.create_api_key(name, user_name))
    click.echo(f"API key {row.id} ({row.name}) for {user_name}; store it now, it is not shown again:")
    click.echo(key)


@keys_group.command("list")
def list_keys_command() -> None:
    """List the keys (their first characters only: the keys themselves are not stored)."""
    rows = accounts.list_api_keys()
    if not rows:
        click.echo("no API keys; create one with `flask --app app api-keys create NAME --user USER`")
        return
    for key, user_name in rows:
        state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "live"
        click.echo(f"{key.id:>4}  {key.name:<24} {user_name:<20} {key.prefix}…  {state}")


@keys_group.command("revoke")
@click.argument("key_id", type=int)
def revoke_key_command(key_id: int) -> None:
    """Revoke a key by its id (see `api-keys list`); requests with it are refused at once."""
    row = _run(lambda: accounts.revoke_api_key(key_id))
    click.echo(f"revoked API key {row.id} ({row.name})")


@click.command("purge-history")
@click.option(
    "--days",
    type=click.FloatRange(min=0, min_open=True),
    help="keep this many days (default: RETENTION_DAYS; 0 there means kept until deleted)",
)
@click.option("--all", "everything", is_flag=True, help="delete every prediction of everyone, whatever its age")
@click.option("--yes", is_flag=True, help="with --all: do not ask for confirmation")
@with_appcontext
def purge_history_command(days: float | None, everything: bool, yes: bool) -> None:
    """Delete predictions (and thumbnails) older than the retention period, or --all of them."""
    if everything:
        if days is not None:
            raise click.UsageError("--all deletes every prediction: it takes no --days")
        if not yes:
            click.confirm("Delete every prediction of everyone, with its thumbnail?", abort=True)
        click.echo(f"deleted all {prediction_history.purge_all()} predictions")
        return
    days = current_app.config["RETENTION_DAYS"] if days is None else days
    if not days:
        click.echo("RETENTION_DAYS is 0: predictions are kept until deleted, none purged (--all deletes all)")
        return
    removed = prediction_history.purge(float(days))
    click.echo(f"deleted {removed} predictions older than {days:g} days")


COMMANDS = (users_group, keys_group, purge_history_command)
