"""The drift statistics (monitoring/drift.py) on known cases: identical and same-distribution
samples raise nothing; a known shift of each kind raises its test and the right alert."""

import numpy as np
import pytest

from monitoring import drift

CLASSES = 10
SEEDS = (0, 1, 2, 3, 4)


def make_sample(
    rng,
    n,
    *,
    priors=None,
    confidence=(8.0, 1.5),
    brightness=120.0,
    unknown=0.05,
    unsure=0.1,
    embedding_shift=0.0,
):
    """A synthetic sample: classes from `priors`, top probabilities from a Beta, image statistics
    and 16-d embeddings from Gaussians."""
    priors = np.full(CLASSES, 1 / CLASSES) if priors is None else np.asarray(priors)
    decisions = rng.choice(["confident", "unsure", "unknown"], n, p=[1 - unknown - unsure, unsure, unknown])
    statistics = np.column_stack(
        [
            rng.normal(brightness, 20, n),
            rng.normal(50, 8, n),
            rng.normal(0.3, 0.08, n),
            rng.lognormal(7, 0.5, n),
        ]
    )
    return drift.Sample(
        classes=rng.choice(CLASSES, n, p=priors),
        top_probability=rng.beta(*confidence, n),
        decisions=decisions,
        ood_scores=rng.normal(0, 1, n),
        statistics=statistics,
        embeddings=rng.normal(embedding_shift, 1, (n, 16)),
    )


def reference(seed):
    return make_sample(np.random.default_rng(1000 + seed), 5000)


def evaluate(window, seed):
    return drift.evaluate(window, reference(seed), CLASSES, seed=seed)


def test_identical_samples_raise_no_alarm():
    ref = reference(0)
    report = drift.evaluate(ref, ref, CLASSES)
    assert report.alerts == []
    # MMD compares two random subsamples of the 5,000 points, so only it is not exactly 1.
    exact = [t for t in report.tests if t.name != "mmd_embeddings"]
    assert all(t.p_value > 0.5 for t in exact), [t for t in exact if t.p_value <= 0.5]
    assert report.accuracy.z == pytest.approx(0.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_same_distribution_raises_no_alarm(seed):
    report = evaluate(make_sample(np.random.default_rng(seed), 500), seed)
    assert report.alerts == [], [t for t in report.tests if t.drift]
    assert len(report.tests) == 10


@pytest.mark.parametrize("seed", SEEDS)
def test_brightness_shift_is_input_drift_only(seed):
    report = evaluate(make_sample(np.random.default_rng(seed), 500, brightness=135.0), seed)
    flagged = {t.name for t in report.tests if t.drift}
    assert "ks_brightness_mean" in flagged
    assert report.alerts == ["input"]


@pytest.mark.parametrize("seed", SEEDS)
def test_embedding_shift_is_found_by_mmd(seed):
    report = evaluate(make_sample(np.random.default_rng(seed), 500, embedding_shift=0.25), seed)
    mmd = next(t for t in report.tests if t.name == "mmd_embeddings")
    assert mmd.drift and mmd.p_value == pytest.approx(1 / (drift.MMD_PERMUTATIONS + 1))
    assert "input" in report.alerts


@pytest.mark.parametrize("seed", SEEDS)
def test_prior_shift_10_to_30_percent_is_prediction_drift(seed):
    priors = np.full(CLASSES, 0.7 / 9)
    priors[3] = 0.3
    report = evaluate(make_sample(np.random.default_rng(seed), 500, priors=priors), seed)
    chi2 = next(t for t in report.tests if t.name == "chi2_classes")
    assert chi2.drift and 0.1 < chi2.effect < 0.4
    assert report.alerts == ["prediction"]


@pytest.mark.parametrize("seed", SEEDS)
def test_lower_confidence_means_model_likely_hurt(seed):
    report = evaluate(make_sample(np.random.default_rng(seed), 500, confidence=(6.0, 2.0)), seed)
    assert report.accuracy.fell and report.accuracy.value < report.accuracy.reference
    assert "model" in report.alerts


@pytest.mark.parametrize("seed", SEEDS)
def test_more_unknown_answers_mean_model_likely_hurt(seed):
    report = evaluate(make_sample(np.random.default_rng(seed), 500, unknown=0.15), seed)
    assert report.unknown_rose
    assert "model" in report.alerts


def test_fewer_unknown_answers_are_drift_but_not_harm():
    report = evaluate(make_sample(np.random.default_rng(0), 2000, unknown=0.0), 0)
    assert not report.unknown_rose
    assert "model" not in report.alerts and "prediction" in report.alerts


def test_chi_square_and_jensen_shannon_on_a_known_table():
    reference_classes = np.repeat([0, 1], [50, 50])
    window_classes = np.repeat([0, 1], [70, 30])
    statistic, p, distance = drift.class_shift(window_classes, reference_classes, 3)
    # 2 x 2 table [[50, 50], [70, 30]]: expected 60/40 per row, chi² = 2 (100/60 + 100/40) = 8.33.
    assert statistic == pytest.approx(8.3333, rel=1e-4)
    assert p == pytest.approx(0.003892, rel=1e-3)
    # JS distance between (0.5, 0.5) and (0.7, 0.3), base 2.
    m = np.array([0.6, 0.4])
    kl = lambda a: np.sum(a * np.log2(a / m))  # noqa: E731
    assert distance == pytest.approx(np.sqrt((kl(np.array([0.5, 0.5])) + kl(np.array([0.7, 0.3]))) / 2))


def test_accuracy_estimate_is_the_mean_top_probability_with_its_standard_error():
    estimate = drift.estimate_accuracy(np.array([0.6, 0.8, 1.0]), np.array([0.9, 0.9, 0.9, 0.9]))
    assert estimate.value == pytest.approx(0.8)
    assert estimate.se == pytest.approx(0.2 / np.sqrt(3))
    assert estimate.reference == pytest.approx(0.9) and estimate.reference_se == 0.0
    assert estimate.z == pytest.approx(0.1 / (0.2 / np.sqrt(3)))
    assert not estimate.fell


def test_bonferroni_shares_the_level_by_weight():
    # Nine tests of weight 1 and the chi-square of weight 4: levels 0.01/13 and 0.04/13.
    names = ["chi2_classes", *(f"t{i}" for i in range(9))]
    p_values = [0.003, 0.00076, 0.00078, 0.5, 1, 1, 1, 1, 1, 1]
    corrected = drift.bonferroni([drift.TestResult(n, "input", 0.0, p) for n, p in zip(names, p_values, strict=True)])
    assert [r.drift for r in corrected[:4]] == [True, True, False, False]
    assert not drift.bonferroni([drift.TestResult(n, "input", 0.0, 0.0032) for n in names])[0].drift


def test_permutation_p_value_is_near_uniform_under_no_shift():
    rng = np.random.default_rng(7)
    p_values = [drift.mmd_test(rng.normal(size=(60, 4)), rng.normal(size=(60, 4)), 200, seed=i)[1] for i in range(40)]
    assert 0.3 < np.mean(p_values) < 0.7
    assert min(p_values) >= 1 / 201
