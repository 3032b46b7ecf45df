"""Canaries simulated on precomputed model outputs: a stream of images, each answered by the
champion or (for the canary's share, by the same hash the app routes with) by the challenger,
which the champion then also scores, judged every `check_every` challenger requests by the
app's own code (rollout_checks.run_checks and decide).

Model outputs are computed once per image (benchmarks/rollout_simulation.py: the shipped model on CIFAR-10;
the tests: synthetic ones) and replayed, so twenty seeds of thousands of requests cost seconds.
Flask-free.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from rollout import checks as rollout_checks
from rollout.checks import Action, Criteria, Paired, Progress, VersionWindow


@dataclass(frozen=True)
class Outputs:
    """One model's answer to each image of a test set, and the images' true classes."""

    classes: np.ndarray  # str, the top class
    decisions: np.ndarray  # str: confident | unsure | unknown
    top_probabilities: np.ndarray
    ood_scores: np.ndarray | None
    labels: np.ndarray  # str, the true class

    def __len__(self) -> int:
        return len(self.classes)


def swapped(outputs: Outputs, first: str, second: str) -> Outputs:
    """The same model with two classes' outputs swapped: its class distribution is unchanged."""
    classes = outputs.classes.copy()
    classes[outputs.classes == first] = second
    classes[outputs.classes == second] = first
    return replace(outputs, classes=classes)


def answering(outputs: Outputs, name: str, fraction: float, seed: int = 0) -> Outputs:
    """A model that answers `name` for a fixed `fraction` of images, with its usual confidence."""
    chosen = np.random.default_rng(seed).random(len(outputs)) < fraction
    classes = outputs.classes.copy()
    classes[chosen] = name
    return replace(outputs, classes=classes)


@dataclass(frozen=True)
class Run:
    """How one simulated canary ended: the action (rollback, promote, or none by the horizon),
    after how many challenger requests, the shares it went through, and each check's verdicts."""

    action: Action
    challenger_requests: int
    shares: tuple[float, ...]
    failed_checks: tuple[tuple[str, ...], ...]


def simulate(
    champion: Outputs,
    challenger: Outputs,
    seed: int,
    share: float = 5.0,
    criteria: Criteria | None = None,
    horizon: int = 300,
    auto_step: bool = False,
    auto_promote: bool = False,
    feedback: float = 0.0,
    latency_ms: tuple[float, float] = (20.0, 20.0),
) -> Run:
    """Replay a stream until the canary is rolled back or promoted, or the challenger has
    answered `horizon` requests. Latencies are lognormal around `latency_ms` (champion,
    challenger); `feedback` is the share of requests people label. The windows grow as the
    app's do (the champion's answers, and its off-path answers to the canary's requests); each
    check is rollout_checks.run_checks and rollout_checks.decide, as in rollout_state."""
    criteria = criteria or Criteria()
    rng = np.random.default_rng(seed)
    cham, chal, paired = VersionWindow(), VersionWindow(), Paired()
    progress, shares, failures = Progress(), [share], []
    served = request = 0
    while served < horizon:
        request += 1
        image = int(rng.integers(len(champion)))
        label = str(champion.labels[image]) if rng.random() < feedback else None
        key = f"{seed}:{request}"  # stands for the upload's sha256: a new image each request
        _add(cham, champion, image)
        if not rollout_checks.goes_to_challenger(key, share):
            _observe(cham, _latency(rng, latency_ms[0]))
            continue
        served += 1
        _add(chal, challenger, image)
        _observe(chal, _latency(rng, latency_ms[1]))
        cham.requests += 1  # the champion's off-path call
        paired.add(
            (str(champion.classes[image]), str(champion.decisions[image])),
            (str(challenger.classes[image]), str(challenger.decisions[image])),
            label,
        )
        if served % criteria.check_every:
            continue
        checks = rollout_checks.run_checks(cham, chal, paired, criteria)
        failures.append(tuple(check.name for check in checks if check.passed is False))
        accuracy = rollout_checks.paired_accuracy(paired, criteria.promote_confidence)
        decision = rollout_checks.decide(progress, checks, served, share, criteria, auto_step, accuracy, auto_promote)
        progress = decision.progress
        if decision.action in (Action.ROLLBACK, Action.PROMOTE):
            return Run(decision.action, served, tuple(shares), tuple(failures))
        if decision.action is Action.STEP:
            share = decision.share
            shares.append(share)
    return Run(Action.NONE, served, tuple(shares), tuple(failures))


def _add(window: VersionWindow, outputs: Outputs, image: int) -> None:
    ood = None if outputs.ood_scores is None else float(outputs.ood_scores[image])
    window.add(str(outputs.classes[image]), str(outputs.decisions[image]), float(outputs.top_probabilities[image]), ood)


def _observe(window: VersionWindow, latency_ms: float) -> None:
    window.requests += 1
    window.latencies_ms.append(latency_ms)


def _latency(rng: np.random.Generator, median_ms: float) -> float:
    return float(median_ms * np.exp(rng.normal(0, 0.25)))


def conflict_rate(a: Outputs, b: Outputs) -> float:
    """The share of images both answer calibrated-confident with different classes."""
    both = (a.decisions == "confident") & (b.decisions == "confident")
    return float(np.mean(both & (a.classes != b.classes)))


def synthetic_outputs(n: int, accuracy: float, seed: int, classes: tuple[str, ...]) -> Outputs:
    """A made-up classifier: right `accuracy` of the time, confident when its probability is
    high, 'unknown' on 3 % of images; for the tests, where no real model is at hand."""
    rng = np.random.default_rng(seed)
    labels = np.array(classes)[rng.integers(len(classes), size=n)]
    wrong = np.array(classes)[rng.integers(len(classes), size=n)]
    right = rng.random(n) < accuracy
    predicted = np.where(right, labels, wrong)
    probability = np.where(right, rng.beta(8, 2, n), rng.beta(3, 3, n))
    decisions = np.where(probability > 0.6, "confident", "unsure")
    decisions[rng.random(n) < 0.03] = "unknown"
    return Outputs(predicted, decisions, probability, rng.normal(0, 1, n), labels)


def retrained(outputs: Outputs, agreement: float, seed: int, classes: tuple[str, ...]) -> Outputs:
    """Another good version: the champion's answer on `agreement` of the images (a retrain errs
    mostly where its predecessor did), an answer of its own of the same quality on the rest."""
    own = synthetic_outputs(len(outputs), float(np.mean(outputs.classes == outputs.labels)), seed, classes)
    own = replace(own, classes=np.where(own.classes == own.labels, outputs.labels, own.classes))
    same = np.random.default_rng(seed + 1).random(len(outputs)) < agreement
    return Outputs(
        np.where(same, outputs.classes, own.classes),
        np.where(same, outputs.decisions, own.decisions),
        np.where(same, outputs.top_probabilities, own.top_probabilities),
        None if outputs.ood_scores is None else np.where(same, outputs.ood_scores, own.ood_scores),
        outputs.labels,
    )
