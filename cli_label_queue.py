"""`flask label-queue ...`: build a round of label requests with the served champion, and list it."""

from __future__ import annotations

import json
from collections.abc import Callable

import click
import numpy as np
from flask.cli import AppGroup

from labelling import store
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


COMMANDS = (label_queue_group,)
