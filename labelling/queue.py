"""Rounds of label requests, and the check of feedback before it trains a model (no Flask, no database).

A round mixes five lanes, each item with its reason (the lane) and the score that put it there:

- margin (40 %): the smallest calibrated margin, top-1 minus top-2 probability;
- shadow (20 %): the shadow challenger answered another class than the champion (highest
  challenger confidence first); with no shadow answers its share goes to margin;
- ood (15 %): the highest out-of-distribution scores, the out-of-scope lane ("none of these"
  answers there are about the OOD threshold, not the classifier);
- conflict (10 %): labels the check holds, for a second person (largest doubt first);
- random (15 %): uniform, so the labels of this lane estimate the served accuracy without bias.

A lane with too few candidates gives its share to margin, and margin's own shortfall goes to
random. Inside a round no two items share an image hash, no predicted class holds more than
CLASS_CAP of the round, and no item has penultimate features more alike than SIMILARITY_LIMIT
(cosine) to another's, but for two of the random lane: that lane is a uniform sample, and the
feature limit turned typical images away (a trained network's features of one class are nearly
parallel), which doubled the lane's error rate and spoilt its accuracy estimate (docs/benchmarks.md).

The check is confident learning (Northcutt et al., 2021): class X's threshold is the mean p(X)
over the items labelled X; a "wrong, it is X" whose p(X) is under it is flagged, and a label that
contradicts a confident prediction is held too, until a second person agrees or an operator decides.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Order matters: random draws first so its sample stays uniform over the pool; margin fills last
# and takes every other lane's shortfall (build_round relies on it being last).
LANE_SHARES = {"random": 0.15, "conflict": 0.10, "shadow": 0.20, "ood": 0.15, "margin": 0.40}
LANES = tuple(LANE_SHARES)
DEFAULT_ROUND_SIZE = 250
SIMILARITY_LIMIT = 0.95
CLASS_CAP = 0.25
# Candidates whose features are computed in one call while a lane is filled.
FEATURE_CHUNK = 128

# A "wrong, it is X" naming one of the model's top guesses (its runner-up: cat for dog) is the
# correction people most often make rightly; the flag is for labels the model ranks lower still.
# On clean CIFAR-10 with 10 % random wrong labels this took the flag's precision from 0.54 to 0.76
# for a recall of 0.88 instead of 0.995 (docs/benchmarks.md, label queue).
PLAUSIBLE_RANKS = 2

# Review states of a piece of feedback.
CONFIRMED, HELD, REJECTED = "confirmed", "held", "rejected"


@dataclass(frozen=True)
class Candidate:
    """A recorded prediction that could be asked about: its calibrated probabilities (class name
    to probability), OOD score, the shadow challenger's answer when one ran, and `conflict`, the
    doubt on a label the check holds (None when it holds none)."""

    prediction_id: int
    image_sha256: str
    top_class: str
    probabilities: dict[str, float]
    ood_score: float | None = None
    challenger_class: str | None = None
    challenger_confidence: float | None = None
    conflict: float | None = None

    @property
    def margin(self) -> float:
        """Top-1 minus top-2 calibrated probability."""
        ranked = sorted(self.probabilities.values(), reverse=True)
        return ranked[0] - (ranked[1] if len(ranked) > 1 else 0.0)


@dataclass(frozen=True)
class Item:
    """One label request of a round: which prediction, why (its lane) and the lane's score."""

    prediction_id: int
    lane: str
    score: float


def quotas(size: int) -> dict[str, int]:
    """Items per lane for a round of `size`, summing to `size` (largest remainders round up)."""
    exact = {lane: share * size for lane, share in LANE_SHARES.items()}
    counts = {lane: int(value) for lane, value in exact.items()}
    by_remainder = sorted(LANES, key=lambda lane: exact[lane] - counts[lane], reverse=True)
    for lane in by_remainder[: size - sum(counts.values())]:
        counts[lane] += 1
    return counts


def ranked_lanes(candidates: Sequence[Candidate], rng: np.random.Generator) -> dict[str, list[Item]]:
    """Each lane's candidates, most worth a label first, as items with their scores. Labelled
    predictions (those with a conflict) only take the conflict lane: the others ask for a first label."""
    fresh = [c for c in candidates if c.conflict is None]
    draws = rng.random(len(fresh))
    lanes = {
        "random": [Item(c.prediction_id, "random", float(u)) for c, u in zip(fresh, draws, strict=True)],
        "conflict": [Item(c.prediction_id, "conflict", c.conflict) for c in candidates if c.conflict is not None],
        "shadow": [
            Item(c.prediction_id, "shadow", c.challenger_confidence or 0.0)
            for c in fresh
            if c.challenger_class is not None and c.challenger_class != c.top_class
        ],
        "ood": [Item(c.prediction_id, "ood", c.ood_score) for c in fresh if c.ood_score is not None],
        "margin": [Item(c.prediction_id, "margin", c.margin) for c in fresh],
    }
    for lane, items in lanes.items():
        # Margin: smallest first; the others: largest first. Ties go to the older prediction.
        items.sort(key=lambda item: (item.score if lane == "margin" else -item.score, item.prediction_id))
    return lanes


class RoundSelector:
    """Admits items into a round while the round stays diverse: one item per image hash, none
    too alike in penultimate features, no predicted class above the cap."""

    def __init__(
        self,
        candidates: Sequence[Candidate],
        size: int,
        features: Callable[[list[int]], np.ndarray],
        similarity_limit: float = SIMILARITY_LIMIT,
        class_cap: float = CLASS_CAP,
    ):
        self.by_id = {c.prediction_id: c for c in candidates}
        self.features = features
        self.similarity_limit = similarity_limit
        self.class_limit = max(1, int(class_cap * size))
        self.items: list[Item] = []
        self._hashes: set[str] = set()
        self._classes: Counter[str] = Counter()
        self._unit: dict[int, np.ndarray] = {}
        self._chosen: list[np.ndarray] = []

    def prepare(self, prediction_ids: Iterable[int]) -> None:
        """Compute, in one call, the unit feature vectors of the ids not seen yet."""
        missing = [i for i in dict.fromkeys(prediction_ids) if i not in self._unit]
        if not missing:
            return
        vectors = np.asarray(self.features(missing), dtype=np.float64).reshape(len(missing), -1)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        for prediction_id, vector in zip(missing, vectors / np.maximum(norms, 1e-12), strict=True):
            self._unit[prediction_id] = vector

    def admit(self, item: Item, sample: bool = False) -> bool:
        """Take the item if the round stays diverse with it; whether it was taken. A `sample`
        item (the random lane's) is not held to the feature limit: the lane must stay uniform."""
        candidate = self.by_id[item.prediction_id]
        if candidate.image_sha256 in self._hashes or self._classes[candidate.top_class] >= self.class_limit:
            return False
        self.prepare([item.prediction_id])
        vector = self._unit[item.prediction_id]
        if not sample and self._chosen and float(np.max(np.stack(self._chosen) @ vector)) > self.similarity_limit:
            return False
        self.items.append(item)
        self._hashes.add(candidate.image_sha256)
        self._classes[candidate.top_class] += 1
        self._chosen.append(vector)
        return True

    def fill(self, ranked: Sequence[Item], wanted: int, sample: bool = False) -> int:
        """Admit up to `wanted` items of a ranked lane, best first; how many were taken."""
        taken = 0
        for start in range(0, len(ranked), FEATURE_CHUNK):
            chunk = ranked[start : start + FEATURE_CHUNK]
            self.prepare(item.prediction_id for item in chunk)
            for item in chunk:
                if taken == wanted:
                    return taken
                taken += self.admit(item, sample)
        return taken


def build_round(
    candidates: Sequence[Candidate],
    size: int,
    features: Callable[[list[int]], np.ndarray],
    rng: np.random.Generator,
) -> list[Item]:
    """A round of at most `size` items (fewer when the pool or the diversity rules run out).
    `features(prediction_ids)` gives the penultimate features of those predictions, one row each."""
    if size < 1:
        raise ValueError("a round needs at least one item")
    selector = RoundSelector(candidates, size, features)
    lanes = ranked_lanes(candidates, rng)
    wanted = quotas(size)
    for lane in LANES[:-1]:
        wanted["margin"] += wanted[lane] - selector.fill(lanes[lane], wanted[lane], sample=lane == "random")
    left = wanted["margin"] - selector.fill(lanes["margin"], wanted["margin"])
    if left:
        selector.fill(lanes["random"], left)
    return interleaved(selector.items)


def interleaved(items: Sequence[Item]) -> list[Item]:
    """A round in the order people see it: the lanes mixed in proportion, each in its own order,
    so whoever labels only part of a round labels that part of every lane."""
    counts = Counter(item.lane for item in items)
    seen: Counter[str] = Counter()
    keyed = []
    for item in items:
        keyed.append(((seen[item.lane] + 0.5) / counts[item.lane], LANES.index(item.lane), item))
        seen[item.lane] += 1
    return [item for *_key, item in sorted(keyed, key=lambda key: key[:2])]


@dataclass(frozen=True)
class Label:
    """A piece of feedback as the check sees it: the verdict (right, wrong, none), the class it
    names (`label`: the prediction's own when right, None for none), the prediction's top class and
    decision, the calibrated probabilities of the model that made it (None when not stored) and who gave it."""

    prediction_id: int
    verdict: str
    label: str | None
    top_class: str
    decision: str | None
    probabilities: dict[str, float] | None
    author: tuple


@dataclass(frozen=True)
class Vote:
    """Someone's word on a piece of feedback: a second label ("label"), or an operator's "confirm"
    or "reject", each about the verdict and class as they stood."""

    stance: str
    verdict: str
    label: str | None
    author: tuple


def class_thresholds(labels: Iterable[Label]) -> dict[str, float]:
    """Per class X, the mean p(X) over the items labelled X (confident learning's per-class threshold)."""
    sums: dict[str, list[float]] = {}
    for label in labels:
        if label.label is not None and label.probabilities is not None and label.label in label.probabilities:
            sums.setdefault(label.label, []).append(label.probabilities[label.label])
    return {name: float(np.mean(values)) for name, values in sums.items()}


def doubt(label: Label, thresholds: dict[str, float]) -> str | None:
    """Why the check holds this feedback, or None: a "wrong, it is X" with p(X) under class X's
    threshold (and X not among the model's PLAUSIBLE_RANKS top guesses) is flagged; a wrong or
    none against a confident prediction waits for a second person."""
    if label.verdict == "wrong" and label.probabilities is not None and label.label in thresholds:
        p, threshold = label.probabilities.get(label.label, 0.0), thresholds[label.label]
        rank = sum(other > p for other in label.probabilities.values())
        if p < threshold and rank >= PLAUSIBLE_RANKS:
            return f"the model gives {label.label} {p:.0%}, under the {threshold:.0%} images labelled {label.label} get"
    if label.verdict in ("wrong", "none") and label.decision == "confident":
        return f"contradicts a confident {label.top_class}"
    return None


def review(label: Label, thresholds: dict[str, float], votes: Sequence[Vote]) -> tuple[str, str]:
    """The feedback's state and why: an operator's latest decision on it as it stands wins; else
    a second person who gave the same label confirms it; else the check holds it or it stands."""
    same = [v for v in votes if (v.verdict, v.label) == (label.verdict, label.label)]
    decisions = [v for v in same if v.stance in ("confirm", "reject")]
    if decisions:
        return (CONFIRMED, "confirmed by an operator") if decisions[-1].stance == "confirm" else (REJECTED, "rejected")
    if any(v.stance == "label" and v.author != label.author for v in same):
        return CONFIRMED, "a second person agreed"
    reason = doubt(label, thresholds)
    return (HELD, reason) if reason else (CONFIRMED, "passed the check")


def conflict_score(label: Label) -> float:
    """How strongly the model doubts a held label: its top probability minus p(label) (for
    "none of these", its top probability)."""
    if label.probabilities is None:
        return 0.0
    top = max(label.probabilities.values())
    return top - (label.probabilities.get(label.label, 0.0) if label.label is not None else 0.0)
