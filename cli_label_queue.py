"""`flask label-queue ...`: build a round of label requests with the served champion, list it, and
tune the OOD threshold from its labels."""

from __future__ import annotations

import json
from collections.abc import Callable

import click
import numpy as np
from flask.cli import AppGroup

from cli_rollout import actor
from labelling import ood_store, store
from labelling.ood_tuning import Proposal, TooFewLabels
from labelling.queue import DEFAULT_ROUND_SIZE
from serving import LoadedModel, Upload
from web.extensions import model_serving

label_queue_group = AppGroup("label-queue", help="Rounds of the predictions most worth a person's label.")


def penultimate_features(loaded: LoadedModel) -> Callable[[list[int]], np.ndarray]:
    """The champion's penultimate features of recorded predictions, from their kept images."""

    def features(prediction_ids: list[int]) -> np.ndarray:
        images = store.thumbnails(prediction_ids)
        uploads = [Upload(f"#{i}", data) for i, data in zip(prediction_ids, images, strict=True)]
        return loaded.features(loaded.batch(model_serving.decode(uploads, [loaded])))

    return features


@label_queue_group.command("build")
@click.option("--size", type=click.IntRange(min=1), default=DEFAULT_ROUND_SIZE, show_default=True)
@click.option("--seed", type=int, help="seed of the random lane (default: fresh each build)")
def build_command(size: int, seed: int | None) -> None:
    """Build a new round from the kept images of recorded predictions; people label the newest round."""
    model_serving.refresh()  # a one-shot command: load here, no poller
    loaded = model_serving.slots.slot()
    if loaded is None:
        raise click.ClickException(model_serving.slots.error())
    label_round = store.build(size, penultimate_features(loaded), loaded.id, seed)
    lanes = store.summary(label_round)
    total = sum(lane.items for lane in lanes)
    parts = ", ".join(f"{lane.lane} {lane.items}" for lane in lanes) or "nothing to ask about"
    click.echo(f"round {label_round.id}: {total} of {size} items ({parts})")
    if total < size:
        click.echo("fewer than asked: the pool (unmarked predictions with kept images) or the diversity rules ran out")


@label_queue_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="print {'round': ..., 'items': [...]} as JSON")
def list_command(as_json: bool) -> None:
    """The newest round's items, in order, with why each was asked about."""
    label_round = store.latest_round()
    if label_round is None:
        raise click.ClickException("no round yet: build one with `flask label-queue build`")
    pairs = store.round_items(label_round)
    items = [
        {
            "prediction_id": row.id,
            "filename": row.filename,
            "reason": item.lane,
            "score": item.score,
            "predicted": row.top_class,
            "labelled_by": item.labelled_by,
        }
        for item, row in pairs
    ]
    if as_json:
        click.echo(json.dumps({"round": label_round.id, "items": items}))
        return
    click.echo(f"round {label_round.id} ({label_round.created_at:%Y-%m-%d %H:%M}): {len(items)} items")
    for entry in items:
        done = f"labelled by {entry['labelled_by']}" if entry["labelled_by"] else "open"
        click.echo(
            f"#{entry['prediction_id']:<7} {entry['reason']:<8} {entry['score']:>7.3f}  "
            f"{entry['predicted'][:20]:<20} {entry['filename'][:40]:<40} {done}"
        )
    for lane in store.summary(label_round):
        if lane.lane == "random" and lane.labelled:
            rate = lane.right / lane.labelled
            click.echo(f"random lane (unbiased accuracy): {lane.right} of {lane.labelled} labelled right, {rate:.0%}")


def describe(proposal: Proposal) -> str:
    """The proposal in words."""
    return (
        f"OOD threshold {proposal.current:.3f} now, {proposal.proposed:.3f} supported by the labels "
        f"({proposal.in_scope_labels} in-scope, {proposal.none_labels} none of these): in-scope images called "
        f"unknown {proposal.false_unknown_now:.0%} now, {proposal.false_unknown_proposed:.0%} with it "
        f"(target {proposal.target_false_unknown:.0%}); none-of-these images caught {proposal.caught_now:.0%} now, "
        f"{proposal.caught_proposed:.0%} with it"
    )


@label_queue_group.command("tune-ood")
@click.option("--model", "model_id", type=int, help="model id (default: the active model)")
@click.option("--apply", "apply_it", is_flag=True, help="write the threshold into the model's calibration")
@click.option("--json", "as_json", is_flag=True, help="print the proposal as JSON")
def tune_ood_command(model_id: int | None, apply_it: bool, as_json: bool) -> None:
    """The OOD threshold the ood and random lanes' labels support; --apply writes it (and logs who)."""
    try:
        if apply_it:
            proposal, change = ood_store.apply(actor(), model_id)
        else:
            proposal, change = ood_store.proposal(model_id), None
    except (ood_store.NotTunable, TooFewLabels) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps({**proposal.to_dict(), "applied": change is not None}))
        return
    click.echo(describe(proposal))
    if change is not None:
        click.echo(f"applied to model {change.model_id} by {change.author}: serving workers reload it")


COMMANDS = (label_queue_group,)
