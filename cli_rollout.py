"""`flask models` commands for champion and challenger: shadow, canary, promote, rollback,
compare and audit (rollout_state.py holds the state and its record)."""

from __future__ import annotations

import getpass
import json
from datetime import datetime

import click
from flask.cli import with_appcontext

from app_errors import AppError
from cli_types import ISO_TIME
from rollout import state as rollout_state
from rollout.checks import Criteria


def actor() -> str:
    """Who runs a command: the operator's account on this machine."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no name for this uid (a container)
        return "cli"


def _run(action):
    try:
        return action()
    except AppError as exc:
        raise click.ClickException(exc.message) from exc


def _criteria(conflict_limit: float | None, check_every: int | None) -> Criteria | None:
    changes = {key: value for key, value in (("conflict_limit", conflict_limit), ("check_every", check_every)) if value}
    return Criteria.from_dict(changes) if changes else None


@click.command("shadow")
@with_appcontext
@click.argument("model_id", type=int)
@click.option(
    "--sample",
    type=click.FloatRange(0, 1, min_open=True),
    default=1.0,
    show_default=True,
    help="fraction of requests the challenger scores off the response path",
)
def shadow_command(model_id: int, sample: float) -> None:
    """Start a shadow: MODEL_ID scores requests beside the champion; nobody sees its answers."""
    _run(lambda: rollout_state.start_shadow(model_id, sample, actor()))
    click.echo(f"model {model_id} shadows the champion on {sample:.0%} of requests")


@click.command("canary")
@with_appcontext
@click.argument("model_id", type=int)
@click.option("--share", type=click.FloatRange(0, 100, min_open=True), required=True, help="percent of requests")
@click.option("--auto-step", is_flag=True, help="5 -> 25 -> 50 %% after clean checks")
@click.option("--auto-promote", is_flag=True, help="promote on paired non-inferiority from feedback")
@click.option("--check-every", type=click.IntRange(min=1), help="challenger requests between checks (default 50)")
@click.option("--conflict-limit", type=click.FloatRange(0, 1), help="confident-conflict rate limit (default 0.01)")
def canary_command(
    model_id: int, share: float, auto_step: bool, auto_promote: bool, check_every, conflict_limit
) -> None:
    """Start a canary: MODEL_ID answers SHARE % of requests, checked every 50 of them."""
    criteria = _criteria(conflict_limit, check_every)
    _run(lambda: rollout_state.start_canary(model_id, share, actor(), auto_step, auto_promote, criteria))
    click.echo(f"model {model_id} answers {share:g}% of requests as a canary")


@click.command("promote")
@with_appcontext
@click.option("--reason", help="why, for the record")
def promote_command(reason: str | None) -> None:
    """Make the challenger the champion."""
    row = _run(lambda: rollout_state.promote(actor(), reason))
    click.echo(f"{rollout_state.label(row)} is now the champion")


@click.command("rollback")
@with_appcontext
@click.option("--reason", help="why, for the record")
def rollback_command(reason: str | None) -> None:
    """End the shadow or canary: the champion answers every request."""
    _run(lambda: rollout_state.rollback(actor(), reason))
    click.echo("rolled back: the champion answers every request")


@click.command("compare")
@with_appcontext
@click.option("--json", "as_json", is_flag=True, help="the comparison as JSON")
def compare_command(as_json: bool) -> None:
    """Champion against challenger on the current window, with a verdict per check."""
    result = rollout_state.compare_current()
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if result is None:
        click.echo("no challenger: start one with `flask models shadow ID` or `flask models canary ID --share 5`")
        return
    part = f"share {result['share']:g}%" if result["mode"] == "canary" else f"sample {result['sample']:g}"
    click.echo(f"{result['mode']} ({part}) since {result['window_start']}")
    for role in ("champion", "challenger"):
        click.echo(f"{role:<10} {_summary_line(result[role])}")
    paired = result["paired"]
    agreement = "-" if paired["agreement"] is None else f"{paired['agreement']:.1%}"
    click.echo(
        f"paired     {paired['requests']} requests, agreement {agreement}, "
        f"{paired['confident_conflicts']} confident conflicts"
    )
    accuracy = result["accuracy"]
    if accuracy["labelled"]:
        click.echo(
            f"feedback   {accuracy['labelled']} labelled: champion {accuracy['champion']:.1%}, "
            f"challenger {accuracy['challenger']:.1%}, McNemar p {accuracy['mcnemar_p']:.3g}, "
            f"non-inferior: {'yes' if result['non_inferior'] else 'no'}"
        )
    for check in result["checks"]:
        click.echo(f"  {check['verdict']:<5} {check['name']:<20} {check['detail']}")


def _summary_line(summary: dict) -> str:
    p95 = "-" if summary["p95_ms"] is None else f"{summary['p95_ms']:.1f} ms"
    top = "-" if summary["mean_top_probability"] is None else f"{summary['mean_top_probability']:.3f}"
    decisions = ", ".join(f"{name} {'-' if v is None else f'{v:.0%}'}" for name, v in summary["decisions"].items())
    return (
        f"id {summary['id']}: {summary['answers']} answers, {summary['errors']} errors, p95 {p95}, "
        f"mean top probability {top}, {decisions}"
    )


@click.command("audit")
@with_appcontext
@click.option("--at", "at", type=ISO_TIME, help="which version answered at this ISO time (UTC unless a zone is given)")
@click.option("--image", "image_sha256", help="with --at: the image's sha256, to name the version that answered it")
@click.option("--json", "as_json", is_flag=True)
def audit_command(at: datetime | None, image_sha256: str | None, as_json: bool) -> None:
    """The record of who served when: every event, or who served at one moment (--at)."""
    if at is not None:
        served = rollout_state.served_at(at, image_sha256)
        if as_json:
            click.echo(json.dumps(served.to_dict(), indent=2))
            return
        challenger = f", challenger {served.challenger} ({served.mode}, {served.share:g}%)" if served.challenger else ""
        click.echo(f"at {served.at}: champion {served.champion}{challenger}")
        if served.answered_by:
            click.echo(f"image {image_sha256[:12]} was answered by {served.answered_by}")
        return
    records = [event.to_dict() for event in rollout_state.events()]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    if not records:
        click.echo("no events recorded yet")
    for event in records:
        click.echo(
            f"{event['time']}  {event['actor']:<14} {event['action']:<12} {event['from'] or '-'} -> "
            f"{event['to'] or '-'}  [{event['mode']} {event['share']:g}%] {event['reason'] or ''}"
        )


COMMANDS = (shadow_command, canary_command, promote_command, rollback_command, compare_command, audit_command)
