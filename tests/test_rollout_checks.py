"""The rollout's judging (rollout_checks.py) on windows built by hand, and on simulated canaries
of synthetic outputs over twenty seeds (rollout_simulation.py): each check fails on its fault
and only then, a bad challenger is rolled back in time, a good one is not."""

from __future__ import annotations

import numpy as np
import pytest

from registry.model_spec import CIFAR10_CLASSES
from rollout import checks as rollout_checks
from rollout.checks import Action, Answer, Criteria, Observation, Paired, Progress, VersionWindow
from rollout.simulation import answering, conflict_rate, retrained, simulate, swapped, synthetic_outputs

CLASSES = tuple(CIFAR10_CLASSES)
SEEDS = range(20)


def window(classes, decisions=None, latencies=(), errors=0, requests=None) -> VersionWindow:
    built = VersionWindow()
    for i, name in enumerate(classes):
        built.add(name, decisions[i] if decisions else "confident", 0.9, 0.0)
    built.latencies_ms = list(latencies)
    built.errors = errors
    built.requests = len(classes) if requests is None else requests
    return built


def balanced(n: int, offset: int = 0) -> list[str]:
    return [CLASSES[(i + offset) % 10] for i in range(n)]


def by_name(checks) -> dict[str, bool | None]:
    return {check.name: check.passed for check in checks}


def test_windows_group_answers_by_version_and_pair_the_requests_both_answered():
    answers = [
        Answer(1, 1, "cat", "confident", 0.9, 0.1),
        Answer(2, 2, "dog", "confident", 0.8, 0.2, "cat"),
        Answer(2, 1, "cat", "confident", 0.9, 0.1, "cat"),
        Answer(3, 7, "ship", "unsure", 0.5),  # another version: not in either window
    ]
    observations = [Observation(1, True, 10.0), Observation(2, True, None, error=True), Observation(1, False, 5.0)]
    champion, challenger, paired = rollout_checks.windows(answers, observations, 1, 2)
    assert (champion.answers, challenger.answers) == (2, 1)
    assert (champion.requests, champion.latencies_ms, challenger.errors) == (2, [10.0], 1)
    assert len(paired) == 1 and paired.confident_conflicts() == 1 and paired.discordant() == (1, 1, 0)


NOMINAL = dict(latencies=[20.0] * 60)


@pytest.mark.parametrize(
    ("fault", "challenger", "paired_classes"),
    [
        ("errors", window(balanced(200), errors=5, **NOMINAL), None),
        ("p95 latency", window(balanced(200), latencies=[40.0] * 60), None),
        ("unknown rate", window(balanced(200), ["unknown"] * 30 + ["confident"] * 170, **NOMINAL), None),
        # On a window of other requests than the paired ones (a canary at a small share).
        ("class distribution", window(["cat"] * 80 + balanced(120), **NOMINAL), balanced(200)),
        ("confident conflicts", window(balanced(200), **NOMINAL), balanced(200, offset=1)),
    ],
)
def test_each_check_fails_on_its_fault_and_only_that_one(fault, challenger, paired_classes):
    criteria = Criteria()
    champion = window(balanced(2000), **NOMINAL)
    paired = Paired()  # the champion scored the challenger's requests too
    for i, name in enumerate(balanced(200)):
        paired.add((name, "confident"), ((paired_classes or challenger.classes)[i], challenger.decisions[i]))
    verdicts = by_name(rollout_checks.run_checks(champion, challenger, paired, criteria))
    assert verdicts.pop(fault) is False
    assert all(verdicts.values()), verdicts
    nominal = by_name(rollout_checks.run_checks(champion, window(balanced(200), **NOMINAL), Paired(), criteria))
    assert nominal["errors"] and nominal["p95 latency"] and nominal["class distribution"]


def test_without_paired_requests_the_unknown_rate_is_compared_on_each_ones_own_requests():
    champion = window(balanced(2000), ["unknown"] * 60 + ["confident"] * 1940)
    worse = window(balanced(200), ["unknown"] * 30 + ["confident"] * 170)
    same = window(balanced(200), ["unknown"] * 6 + ["confident"] * 194)
    assert by_name(rollout_checks.run_checks(champion, worse, Paired(), Criteria()))["unknown rate"] is False
    assert by_name(rollout_checks.run_checks(champion, same, Paired(), Criteria()))["unknown rate"] is True


def test_too_few_answers_are_not_judged():
    checks = rollout_checks.run_checks(VersionWindow(), window(["cat"] * 10), Paired(), Criteria())
    assert not rollout_checks.failed(checks)


def _check(passed: bool) -> list[rollout_checks.Check]:
    return [rollout_checks.Check("x", passed, None, None, "")]


def test_three_failed_checks_in_a_row_roll_back_and_a_pass_resets_the_count():
    criteria, progress = Criteria(), Progress()
    for passed in (False, False, True, False, False):
        decision = rollout_checks.decide(progress, _check(passed), 50, 5.0, criteria)
        assert decision.action is Action.NONE
        progress = decision.progress
    assert rollout_checks.decide(progress, _check(False), 50, 5.0, criteria).action is Action.ROLLBACK


def test_auto_step_goes_5_25_50_after_200_clean_challenger_requests():
    criteria, progress, share, shares = Criteria(), Progress(), 5.0, []
    for requests in range(50, 1501, 50):
        decision = rollout_checks.decide(progress, _check(requests != 100), requests, share, criteria, auto_step=True)
        progress, share = decision.progress, decision.share
        if decision.action is Action.STEP:
            shares.append((requests, share))
    # The failed check at 100 delays the first step: the 200 clean requests count from a step
    # or from the last failed check.
    assert shares == [(300, 25.0), (500, 50.0)]
    assert rollout_checks.decide(progress, _check(True), 2000, share, criteria).action is Action.NONE


def paired_with_feedback(champion_right: int, challenger_right: int, n: int = 400) -> Paired:
    paired = Paired()
    for i in range(n):
        paired.add(
            ("cat" if i < champion_right else "dog", "confident"),
            ("cat" if i < challenger_right else "dog", "confident"),
            "cat",
        )
    return paired


def test_paired_accuracy_and_auto_promote_on_non_inferiority_only():
    criteria = Criteria()
    same = rollout_checks.paired_accuracy(paired_with_feedback(360, 360))
    worse = rollout_checks.paired_accuracy(paired_with_feedback(360, 330))
    assert same.difference == 0 and same.mcnemar_p == 1.0 and rollout_checks.non_inferior(same, criteria)
    assert worse.difference == pytest.approx(-0.075) and worse.mcnemar_p < 1e-6
    assert not rollout_checks.non_inferior(worse, criteria)
    promote = rollout_checks.decide(Progress(), _check(True), 50, 5.0, criteria, accuracy=same, auto_promote=True)
    assert promote.action is Action.PROMOTE
    kept = rollout_checks.decide(Progress(), _check(True), 50, 5.0, criteria, accuracy=worse, auto_promote=True)
    assert kept.action is Action.NONE


def test_routing_is_stable_and_a_growing_share_keeps_the_images_it_had():
    keys = [f"{i:064x}" for i in range(4000)]
    at5 = {key for key in keys if rollout_checks.goes_to_challenger(key, 5)}
    at25 = {key for key in keys if rollout_checks.goes_to_challenger(key, 25)}
    assert at5 <= at25 and 0.04 < len(at5) / 4000 < 0.06 and 0.23 < len(at25) / 4000 < 0.27
    assert at5 == {key for key in keys if rollout_checks.goes_to_challenger(key, 5)}


@pytest.fixture(scope="module")
def champion():
    return synthetic_outputs(10_000, 0.9, 0, CLASSES)


@pytest.fixture(scope="module")
def criteria(champion):
    """The conflict limit set as the benchmark sets it: from two good versions."""
    good = retrained(champion, 0.9, 5, CLASSES)
    return Criteria(conflict_limit=round(1.5 * conflict_rate(champion, good), 3))


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["swapped", "cat20"])
def test_a_bad_challenger_is_rolled_back_within_300_challenger_requests_in_95_percent_of_seeds(champion, criteria, bad):
    challenger = swapped(champion, "cat", "dog") if bad == "swapped" else answering(champion, "cat", 0.2)
    runs = [simulate(champion, challenger, seed, criteria=criteria, horizon=300) for seed in SEEDS]
    caught = [run for run in runs if run.action is Action.ROLLBACK]
    assert len(caught) >= 0.95 * len(SEEDS)
    if bad == "swapped":  # only the conflicts see it: the class distribution is the champion's
        assert all("confident conflicts" in failed for run in caught for failed in run.failed_checks[-3:])


@pytest.mark.slow
@pytest.mark.parametrize("good", ["identical", "retrained"])
def test_a_good_challenger_is_falsely_rolled_back_in_at_most_5_percent_of_seeds(champion, criteria, good):
    challenger = champion if good == "identical" else retrained(champion, 0.9, 5, CLASSES)
    runs = [simulate(champion, challenger, seed, criteria=criteria, horizon=600) for seed in SEEDS]
    assert sum(run.action is Action.ROLLBACK for run in runs) <= 0.05 * len(SEEDS)


def test_auto_step_reaches_50_percent_with_a_good_challenger(champion, criteria):
    run = simulate(champion, champion, 0, criteria=criteria, horizon=700, auto_step=True)
    assert run.action is Action.NONE and run.shares == (5.0, 25.0, 50.0)


def test_conflict_rate_counts_confident_disagreements_only(champion):
    assert conflict_rate(champion, champion) == 0
    assert conflict_rate(champion, swapped(champion, "cat", "dog")) == pytest.approx(
        np.mean((champion.decisions == "confident") & np.isin(champion.classes, ["cat", "dog"]))
    )
