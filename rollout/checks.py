"""Champion against challenger, judged on their answers: the comparison of two versions on the
same window, the rollback checks, and what a canary does next (nothing, step, promote, roll back).

Flask-free and database-free: the app feeds it windows read from the history (rollout_state.py)
and the simulations (benchmarks/rollout_simulation.py, tests/test_rollout_checks.py) feed it precomputed
model outputs, so both judge through this one code path.

SciPy is imported where a test is computed, past the early returns: a web worker that has not
checked a canary yet does not hold its memory (the lean worker's PSS budget).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import StrEnum

import numpy as np

DECISIONS = ("confident", "unsure", "unknown")


@dataclass(frozen=True)
class Criteria:
    """The rollback and promotion criteria; the defaults are the ones tuned on the simulations
    (docs/benchmarks.md, "Champion and challenger")."""

    check_every: int = 50  # challenger requests between two checks
    failures_to_rollback: int = 3  # failed checks in a row
    error_points: float = 1.0  # challenger's error rate above the champion's, in points
    p95_ratio: float = 1.5
    min_latency_samples: int = 50
    unknown_p: float = 0.01  # one-sided two-proportion test
    class_p: float = 0.001  # chi-square on the predicted-class counts
    conflict_limit: float = 0.01  # confident conflicts with the champion on the same requests
    conflict_p: float = 0.01  # one-sided binomial test against the limit
    step_after: int = 200  # challenger requests without a failed check before the next step
    steps: tuple[float, ...] = (5.0, 25.0, 50.0)
    promote_margin: float = 0.02  # non-inferiority margin on paired accuracy
    promote_confidence: float = 0.95
    min_labelled: int = 100  # paired, labelled items before promotion is considered

    @classmethod
    def from_dict(cls, values: dict | None) -> Criteria:
        """Criteria from a stored dict; unknown keys are ignored, missing ones take the defaults."""
        known = {key: value for key, value in (values or {}).items() if key in cls.__dataclass_fields__}
        if "steps" in known:
            known["steps"] = tuple(float(step) for step in known["steps"])
        return cls(**known)

    def to_dict(self) -> dict:
        return {**asdict(self), "steps": list(self.steps)}


@dataclass
class VersionWindow:
    """What one version answered on a window: one entry per answer, plus its request
    observations (latency of answered requests, and failures)."""

    classes: list[str] = field(default_factory=list)
    decisions: list[str | None] = field(default_factory=list)
    top_probabilities: list[float] = field(default_factory=list)
    ood_scores: list[float | None] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    requests: int = 0  # observed requests (answered or scored), failed ones included
    errors: int = 0

    def add(self, top_class: str, decision: str | None, top_probability: float, ood_score: float | None) -> None:
        self.classes.append(top_class)
        self.decisions.append(decision)
        self.top_probabilities.append(top_probability)
        self.ood_scores.append(ood_score)

    @property
    def answers(self) -> int:
        return len(self.classes)

    def count(self, decision: str) -> int:
        return sum(1 for value in self.decisions if value == decision)

    def summary(self) -> dict:
        """Requests, errors, latency percentiles, decision mix, classes, mean calibrated top
        probability (the estimated accuracy) and OOD-score quartiles."""
        latencies = np.asarray(self.latencies_ms, dtype=float)
        ood = np.asarray([score for score in self.ood_scores if score is not None], dtype=float)
        answers = self.answers
        return {
            "answers": answers,
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else None,
            "p50_ms": float(np.percentile(latencies, 50)) if latencies.size else None,
            "p95_ms": float(np.percentile(latencies, 95)) if latencies.size else None,
            "decisions": {name: self.count(name) / answers if answers else None for name in DECISIONS},
            "classes": dict(Counter(self.classes).most_common()),
            "mean_top_probability": float(np.mean(self.top_probabilities)) if answers else None,
            "ood_quartiles": [float(q) for q in np.percentile(ood, [25, 50, 75])] if ood.size else None,
        }


@dataclass
class Paired:
    """Requests both versions answered (one on the response path, the other off it): each one's
    class and decision, and the class people confirmed when there is feedback (None if not)."""

    champion_classes: list[str] = field(default_factory=list)
    challenger_classes: list[str] = field(default_factory=list)
    champion_decisions: list[str | None] = field(default_factory=list)
    challenger_decisions: list[str | None] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)

    def add(
        self,
        champion: tuple[str, str | None],
        challenger: tuple[str, str | None],
        label: str | None = None,
    ) -> None:
        self.champion_classes.append(champion[0])
        self.champion_decisions.append(champion[1])
        self.challenger_classes.append(challenger[0])
        self.challenger_decisions.append(challenger[1])
        self.labels.append(label)

    def __len__(self) -> int:
        return len(self.champion_classes)

    def agreement(self) -> float | None:
        pairs = zip(self.champion_classes, self.challenger_classes, strict=True)
        return sum(a == b for a, b in pairs) / len(self) if len(self) else None

    def confident_conflicts(self) -> int:
        """Requests where both are calibrated-confident and name different classes."""
        return sum(
            1
            for a, b, da, db in zip(
                self.champion_classes,
                self.challenger_classes,
                self.champion_decisions,
                self.challenger_decisions,
                strict=True,
            )
            if da == "confident" and db == "confident" and a != b
        )

    def unknown_discordant(self) -> tuple[int, int]:
        """(unknown to the challenger only, unknown to the champion only) on the same requests."""
        pairs = list(zip(self.champion_decisions, self.challenger_decisions, strict=True))
        mine = sum(1 for a, b in pairs if b == "unknown" and a != "unknown")
        theirs = sum(1 for a, b in pairs if a == "unknown" and b != "unknown")
        return mine, theirs

    def discordant(self) -> tuple[int, int, int]:
        """On labelled items: (labelled, champion right and challenger wrong, champion wrong and challenger right)."""
        labelled = worse = better = 0
        for a, b, label in zip(self.champion_classes, self.challenger_classes, self.labels, strict=True):
            if label is None:
                continue
            labelled += 1
            worse += a == label and b != label
            better += a != label and b == label
        return labelled, worse, better


@dataclass(frozen=True)
class Answer:
    """One model's answer to one request: on the response path (`answered`) or off it."""

    request: int  # the prediction's id, or the position in a simulated stream
    model_id: int
    top_class: str
    decision: str | None
    top_probability: float
    ood_score: float | None = None
    label: str | None = None  # the class people confirmed, when there is feedback


@dataclass(frozen=True)
class Observation:
    """One model's call for one request: its latency when it answered, and whether it failed."""

    model_id: int
    answered: bool
    latency_ms: float | None
    error: bool = False


def windows(
    answers: list[Answer], observations: list[Observation], champion_id: int, challenger_id: int
) -> tuple[VersionWindow, VersionWindow, Paired]:
    """Each version's window, and the requests both answered, from answers and observations."""
    by_model = {champion_id: VersionWindow(), challenger_id: VersionWindow()}
    by_request: dict[int, dict[int, Answer]] = {}
    for answer in answers:
        if answer.model_id in by_model:
            by_model[answer.model_id].add(answer.top_class, answer.decision, answer.top_probability, answer.ood_score)
            by_request.setdefault(answer.request, {})[answer.model_id] = answer
    for observation in observations:
        window = by_model.get(observation.model_id)
        if window is None:
            continue
        window.requests += 1
        window.errors += observation.error
        if observation.answered and not observation.error and observation.latency_ms is not None:
            window.latencies_ms.append(observation.latency_ms)
    paired = Paired()
    for both in by_request.values():
        if len(both) == 2:
            a, b = both[champion_id], both[challenger_id]
            paired.add((a.top_class, a.decision), (b.top_class, b.decision), a.label or b.label)
    return by_model[champion_id], by_model[challenger_id], paired


@dataclass(frozen=True)
class Check:
    """One criterion's verdict: True passed, False failed, None not enough data to judge."""

    name: str
    passed: bool | None
    value: float | None
    limit: float | None
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "FAIL", None: "n/a"}[self.passed]


def run_checks(champion: VersionWindow, challenger: VersionWindow, paired: Paired, criteria: Criteria) -> list[Check]:
    """Every rollback criterion on one window; a check fails only on enough evidence."""
    return [
        _error_check(champion, challenger, criteria),
        _latency_check(champion, challenger, criteria),
        _unknown_check(champion, challenger, paired, criteria),
        _class_check(champion, challenger, criteria),
        _conflict_check(paired, criteria),
    ]


def failed(checks: list[Check]) -> bool:
    return any(check.passed is False for check in checks)


def _error_check(champion: VersionWindow, challenger: VersionWindow, criteria: Criteria) -> Check:
    if not champion.requests or not challenger.requests:
        return Check("errors", None, None, criteria.error_points, "no observed requests")
    points = 100 * (challenger.errors / challenger.requests - champion.errors / champion.requests)
    detail = f"{challenger.errors}/{challenger.requests} against {champion.errors}/{champion.requests}"
    return Check("errors", points <= criteria.error_points, points, criteria.error_points, detail)


def _latency_check(champion: VersionWindow, challenger: VersionWindow, criteria: Criteria) -> Check:
    least = min(len(champion.latencies_ms), len(challenger.latencies_ms))
    if least < criteria.min_latency_samples:
        return Check("p95 latency", None, None, criteria.p95_ratio, f"{least} answered requests timed")
    ratio = float(np.percentile(challenger.latencies_ms, 95) / max(np.percentile(champion.latencies_ms, 95), 1e-9))
    return Check("p95 latency", ratio <= criteria.p95_ratio, ratio, criteria.p95_ratio, "challenger p95 / champion p95")


def _unknown_check(champion: VersionWindow, challenger: VersionWindow, paired: Paired, criteria: Criteria) -> Check:
    """On the requests both answered, an exact one-sided McNemar test (only the challenger
    says unknown, against only the champion); without them, a two-proportion test on each
    one's own requests. The paired test is the one canaries use: on independent requests a
    challenger identical to the champion was rolled back for its unknown rate in 2 of 20
    simulated canaries (docs/benchmarks.md)."""
    if len(paired) >= criteria.check_every:
        from scipy import stats

        mine, theirs = paired.unknown_discordant()
        p = float(stats.binomtest(mine, mine + theirs, 0.5, alternative="greater").pvalue) if mine + theirs else 1.0
        detail = (
            f"on {len(paired)} requests both answered: unknown to the challenger only {mine}, champion only {theirs}"
        )
        return Check("unknown rate", p >= criteria.unknown_p, p, criteria.unknown_p, detail)
    n1, n2 = challenger.answers, champion.answers
    if not n1 or not n2:
        return Check("unknown rate", None, None, criteria.unknown_p, "no answers")
    k1, k2 = challenger.count("unknown"), champion.count("unknown")
    pooled = (k1 + k2) / (n1 + n2)
    if pooled in (0.0, 1.0):
        return Check("unknown rate", True, 1.0, criteria.unknown_p, "the same rate on both")
    z = (k1 / n1 - k2 / n2) / np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    from scipy import stats

    p = float(stats.norm.sf(z))
    return Check("unknown rate", p >= criteria.unknown_p, p, criteria.unknown_p, f"{k1}/{n1} against {k2}/{n2}")


def _class_check(champion: VersionWindow, challenger: VersionWindow, criteria: Criteria) -> Check:
    if challenger.answers < criteria.check_every or not champion.answers:
        return Check("class distribution", None, None, criteria.class_p, f"{challenger.answers} challenger answers")
    names = sorted(set(champion.classes) | set(challenger.classes))
    if len(names) < 2:
        return Check("class distribution", True, 1.0, criteria.class_p, "one class on both")
    mine, theirs = Counter(challenger.classes), Counter(champion.classes)
    table = np.array([[mine[name] for name in names], [theirs[name] for name in names]])
    from scipy import stats

    p = float(stats.chi2_contingency(table)[1])
    top = max(names, key=lambda name: mine[name] / challenger.answers - theirs[name] / champion.answers)
    detail = f"most over-predicted: {top} ({mine[top]}/{challenger.answers} against {theirs[top]}/{champion.answers})"
    return Check("class distribution", p >= criteria.class_p, p, criteria.class_p, detail)


def _conflict_check(paired: Paired, criteria: Criteria) -> Check:
    if not len(paired):
        return Check("confident conflicts", None, None, criteria.conflict_limit, "no requests scored by both")
    conflicts = paired.confident_conflicts()
    from scipy import stats

    p = float(stats.binomtest(conflicts, len(paired), criteria.conflict_limit, alternative="greater").pvalue)
    detail = f"{conflicts}/{len(paired)} confident conflicts (p {p:.2g} against the limit)"
    return Check(
        "confident conflicts", p >= criteria.conflict_p, conflicts / len(paired), criteria.conflict_limit, detail
    )


@dataclass(frozen=True)
class Accuracy:
    """Paired accuracy on labelled items both answered: the difference (challenger minus
    champion), its one-sided lower confidence bound, and McNemar's exact p-value."""

    labelled: int
    champion: float | None
    challenger: float | None
    difference: float | None
    lower_bound: float | None
    mcnemar_p: float | None


def paired_accuracy(paired: Paired, confidence: float = 0.95) -> Accuracy:
    labelled, worse, better = paired.discordant()
    if not labelled:
        return Accuracy(0, None, None, None, None, None)
    champion_right = sum(
        1 for a, label in zip(paired.champion_classes, paired.labels, strict=True) if label is not None and a == label
    )
    champion = champion_right / labelled
    challenger = champion + (better - worse) / labelled
    difference = (better - worse) / labelled
    # The paired difference's standard error (Wald, on the discordant counts).
    variance = max((better + worse) / labelled - difference**2, 0.0) / labelled
    from scipy import stats

    lower = difference - float(stats.norm.ppf(confidence)) * np.sqrt(variance)
    discordant = worse + better
    mcnemar = float(stats.binomtest(min(worse, better), discordant, 0.5).pvalue) if discordant else 1.0
    return Accuracy(labelled, champion, challenger, difference, float(lower), mcnemar)


def non_inferior(accuracy: Accuracy, criteria: Criteria) -> bool:
    """The challenger is not worse than the champion by more than the margin, at the confidence."""
    return (
        accuracy.labelled >= criteria.min_labelled
        and accuracy.lower_bound is not None
        and accuracy.lower_bound > -criteria.promote_margin
    )


class Action(StrEnum):
    NONE = "none"
    STEP = "step"
    PROMOTE = "promote"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class Progress:
    """A canary's progress between checks: failed checks in a row, and the challenger requests
    counted at the last step or failed check (the clean run a step needs starts there)."""

    failed_in_row: int = 0
    clean_since: int = 0


@dataclass(frozen=True)
class Decision:
    action: Action
    progress: Progress
    share: float
    reason: str


def decide(
    progress: Progress,
    checks: list[Check],
    challenger_requests: int,
    share: float,
    criteria: Criteria,
    auto_step: bool = False,
    accuracy: Accuracy | None = None,
    auto_promote: bool = False,
) -> Decision:
    """What a canary does after a check: roll back after `failures_to_rollback` failed checks in a
    row; with `auto_step`, move to the next share after `step_after` challenger requests without
    a failed check; with `auto_promote`, promote on paired non-inferiority."""
    bad = failed(checks)
    progress = Progress(progress.failed_in_row + 1 if bad else 0, challenger_requests if bad else progress.clean_since)
    if progress.failed_in_row >= criteria.failures_to_rollback:
        names = ", ".join(check.name for check in checks if check.passed is False)
        return Decision(Action.ROLLBACK, progress, share, f"{progress.failed_in_row} failed checks in a row ({names})")
    if auto_promote and not bad and accuracy is not None and non_inferior(accuracy, criteria):
        reason = (
            f"paired accuracy {accuracy.difference * 100:+.1f} points on {accuracy.labelled} labelled items, "
            f"lower bound {accuracy.lower_bound * 100:+.1f} > -{criteria.promote_margin * 100:.0f}"
        )
        return Decision(Action.PROMOTE, progress, share, reason)
    steps = [step for step in criteria.steps if step > share]
    clean = challenger_requests - progress.clean_since
    if auto_step and steps and clean >= criteria.step_after:
        reason = f"{clean} challenger requests without a failed check"
        return Decision(Action.STEP, Progress(0, challenger_requests), steps[0], reason)
    return Decision(Action.NONE, progress, share, "failed check" if bad else "passed")


def routing_bucket(image_sha256: str) -> float:
    """Where an upload falls in [0, 100): the same image always falls in the same place, so a
    canary at share S answers the images below S (and keeps them when the share grows)."""
    digest = hashlib.sha256(b"canary:" + image_sha256.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def goes_to_challenger(image_sha256: str, share: float) -> bool:
    return routing_bucket(image_sha256) < share
