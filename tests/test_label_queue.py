"""The label queue's rounds (lanes, diversity) and the feedback check, on plain candidates: no app."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import one_hot

from labelling.queue import (
    CONFIRMED,
    HELD,
    REJECTED,
    Candidate,
    Label,
    Vote,
    build_round,
    class_thresholds,
    doubt,
    quotas,
    review,
)

CLASSES = [f"c{i}" for i in range(10)]


def candidate(i: int, top: int, margin: float, **fields) -> Candidate:
    """Prediction `i` whose top class is `top`, with the given top-1 minus top-2 margin."""
    second = (1 - margin) / 2
    probabilities = dict.fromkeys(CLASSES, 0.0) | {CLASSES[top]: second + margin, CLASSES[(top + 1) % 10]: second}
    return Candidate(i, fields.pop("sha", f"sha{i}"), CLASSES[top], probabilities, **fields)


def distinct_features(ids: list[int]) -> np.ndarray:
    """One-hot features: no two predictions alike."""
    return one_hot(ids, 4096)


def pool(count: int = 200, **fields) -> list[Candidate]:
    rng = np.random.default_rng(5)
    return [
        candidate(i, i % 10, float(rng.uniform(0.05, 0.95)), ood_score=float(rng.normal()), **fields)
        for i in range(count)
    ]


def lanes_of(items) -> dict[str, list[int]]:
    lanes: dict[str, list[int]] = {}
    for item in items:
        lanes.setdefault(item.lane, []).append(item.prediction_id)
    return lanes


def test_quotas_follow_the_shares_and_sum_to_the_size():
    assert quotas(250) == {"random": 38, "conflict": 25, "shadow": 50, "ood": 37, "margin": 100}
    assert all(sum(quotas(n).values()) == n for n in range(1, 300))


def test_every_lane_takes_its_share_and_its_best_candidates():
    candidates = pool()
    # Ten predictions the challenger answered differently, ten it answered alike (more surely),
    # five labels the check holds.
    candidates = [
        Candidate(**{**c.__dict__, "challenger_class": CLASSES[(i + 3) % 10], "challenger_confidence": i / 200})
        if i % 20 == 3
        else Candidate(**{**c.__dict__, "challenger_class": c.top_class, "challenger_confidence": 1.0})
        if i % 20 == 13
        else c
        for i, c in enumerate(candidates)
    ]
    candidates += [candidate(1000 + k, k, 0.5, conflict=k / 10) for k in range(5)]
    items = build_round(candidates, 40, distinct_features, np.random.default_rng(0))
    lanes = lanes_of(items)
    assert {lane: len(ids) for lane, ids in lanes.items()} == {
        "random": 6,
        "conflict": 4,
        "shadow": 8,
        "ood": 6,
        "margin": 16,
    }
    by_id = {c.prediction_id: c for c in candidates}
    assert lanes["conflict"] == [1004, 1003, 1002, 1001]
    assert all(by_id[i].challenger_class not in (None, by_id[i].top_class) for i in lanes["shadow"])
    chosen = {item.prediction_id for item in items}
    fresh = [c for c in candidates if c.conflict is None]
    others = [c for c in fresh if c.prediction_id not in chosen]
    # Nothing left out has a higher OOD score than the OOD lane's, or a smaller margin than margin's.
    assert min(by_id[i].ood_score for i in lanes["ood"]) >= max(c.ood_score for c in others)
    assert max(by_id[i].margin for i in lanes["margin"]) <= min(c.margin for c in others)
    # Random is not the lowest margins nor the highest OOD scores: a spread over the pool.
    assert len({by_id[i].top_class for i in lanes["random"]}) > 2
    # People see the lanes mixed: the first half of the round holds half of each lane.
    assert {lane: len(ids) for lane, ids in lanes_of(items[:20]).items()} == {
        "random": 3,
        "conflict": 2,
        "shadow": 4,
        "ood": 3,
        "margin": 8,
    }


def test_without_shadow_answers_the_shadow_share_goes_to_margin():
    items = build_round(pool(), 40, distinct_features, np.random.default_rng(0))
    lanes = lanes_of(items)
    assert "shadow" not in lanes and "conflict" not in lanes
    assert len(lanes["margin"]) == 16 + 8 + 4 and len(items) == 40


def test_no_two_items_share_an_image_hash():
    candidates = [candidate(i, i % 10, 0.01 + i / 1000, sha="same" if i < 30 else f"s{i}") for i in range(100)]
    items = build_round(candidates, 20, distinct_features, np.random.default_rng(0))
    assert len(items) == 20
    assert sum(item.prediction_id < 30 for item in items) == 1


def test_no_two_items_have_penultimate_features_more_alike_than_the_limit():
    # Predictions 0-29 are near-copies of one another in feature space (cosine about 0.99).
    def features(ids: list[int]) -> np.ndarray:
        rng = np.random.default_rng(ids)
        base = one_hot([0], 512)[0] * 10
        return np.stack([base + rng.normal(0, 0.02, 512) if i < 30 else one_hot([i], 512)[0] for i in ids])

    candidates = [candidate(i, i % 10, 0.01 + i / 1000) for i in range(100)]
    for seed in range(5):
        items = build_round(candidates, 20, features, np.random.default_rng(seed))
        near = [item for item in items if item.prediction_id < 30]
        sampled = [item for item in near if item.lane == "random"]
        # One of the near-copies at most, or the random lane's own draws (a uniform sample).
        assert len(items) == 20 and (len(near) == 1 or len(sampled) == len(near)), near


def test_the_random_lane_stays_a_uniform_sample_however_alike_the_images():
    identical = lambda ids: np.ones((len(ids), 8))  # noqa: E731
    items = build_round(pool(), 20, identical, np.random.default_rng(0))
    assert lanes_of(items) == {"random": [item.prediction_id for item in items]} and len(items) == 3


def test_no_predicted_class_holds_more_than_a_quarter_of_a_round():
    # Every low-margin prediction is a c0: the margin lane alone would fill the round with it.
    candidates = [candidate(i, 0 if i < 60 else i % 10, 0.01 if i < 60 else 0.5) for i in range(200)]
    items = build_round(candidates, 40, distinct_features, np.random.default_rng(0))
    by_id = {c.prediction_id: c for c in candidates}
    counts = {}
    for item in items:
        counts[by_id[item.prediction_id].top_class] = counts.get(by_id[item.prediction_id].top_class, 0) + 1
    assert len(items) == 40 and max(counts.values()) == 10


def test_a_round_needs_a_size():
    with pytest.raises(ValueError):
        build_round(pool(), 0, distinct_features, np.random.default_rng(0))


def label(i: int, verdict: str, name: str | None, p: float, decision: str = "unsure", author=(1, "ann")) -> Label:
    probabilities = dict.fromkeys(CLASSES, (1 - p) / 9) | ({name: p} if name else {})
    return Label(i, verdict, name, "c9", decision, probabilities, author)


def test_a_wrong_label_the_model_finds_unlikely_is_flagged():
    labels = [label(i, "right", "c1", 0.8) for i in range(4)] + [label(9, "wrong", "c1", 0.05)]
    thresholds = class_thresholds(labels)
    assert thresholds["c1"] == pytest.approx((0.8 * 4 + 0.05) / 5)
    assert "under the" in doubt(labels[-1], thresholds)
    assert doubt(label(10, "wrong", "c1", 0.7), thresholds) is None
    # Under the threshold but the model's runner-up: a plausible correction, not flagged.
    runner_up = Label(11, "wrong", "c1", "c9", "unsure", dict.fromkeys(CLASSES, 0.01) | {"c9": 0.6, "c1": 0.32}, (1,))
    assert doubt(runner_up, thresholds) is None
    assert review(labels[-1], thresholds, [])[0] == HELD


def test_a_label_against_a_confident_prediction_waits_for_a_second_person():
    held = label(1, "wrong", "c1", 0.6, decision="confident")
    thresholds = class_thresholds([held])
    assert review(held, thresholds, []) == (HELD, "contradicts a confident c9")
    assert review(label(2, "none", None, 0.0, decision="confident"), thresholds, [])[0] == HELD
    assert review(label(3, "wrong", "c1", 0.6, decision="unsure"), thresholds, [])[0] == CONFIRMED
    # The same person saying it again is not a second person; another who agrees confirms it.
    assert review(held, thresholds, [Vote("label", "wrong", "c1", (1, "ann"))])[0] == HELD
    assert review(held, thresholds, [Vote("label", "wrong", "c2", (2, "bob"))])[0] == HELD
    assert review(held, thresholds, [Vote("label", "wrong", "c1", (2, "bob"))])[0] == CONFIRMED


def test_an_operator_decision_on_the_feedback_as_it_stands_wins():
    held = label(1, "wrong", "c1", 0.6, decision="confident")
    confirm, reject = Vote("confirm", "wrong", "c1", (3, "op")), Vote("reject", "wrong", "c1", (3, "op"))
    assert review(held, {}, [confirm])[0] == CONFIRMED
    assert review(held, {}, [confirm, reject])[0] == REJECTED
    # A decision about an earlier verdict says nothing about the one given since.
    assert review(held, {}, [Vote("confirm", "none", None, (3, "op"))])[0] == HELD
