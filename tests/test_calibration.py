"""Calibration and the OOD score on synthetic numbers: known temperatures, thresholds and
pass rates come out as constructed."""

import numpy as np
import pytest

from inference import calibration, ood
from inference.calibration import Calibration
from predictor import softmax


def _sampled_labels(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    probabilities = softmax(logits)
    cumulative = probabilities.cumsum(axis=1)
    return (rng.random((len(logits), 1)) > cumulative).sum(axis=1)


@pytest.mark.parametrize("true_temperature", [0.4, 1.0, 2.5])
def test_fit_temperature_recovers_a_known_temperature(true_temperature):
    rng = np.random.default_rng(0)
    calibrated_logits = rng.normal(0, 3, (20_000, 10))
    labels = _sampled_labels(calibrated_logits, rng)  # labels drawn from softmax(calibrated)
    served_logits = calibrated_logits * true_temperature  # what an over/under-confident model outputs
    fitted = calibration.fit_temperature(served_logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)


def test_ece_of_an_overconfident_model_and_of_a_calibrated_one():
    rng = np.random.default_rng(1)
    probabilities = np.full((1000, 2), 0.1)
    probabilities[:, 0] = 0.9
    labels = (np.arange(1000) >= 600).astype(int)  # right 60 % of the time at 90 % confidence
    assert calibration.expected_calibration_error(probabilities, labels) == pytest.approx(0.3)
    logits = rng.normal(0, 2, (50_000, 5))
    assert calibration.expected_calibration_error(softmax(logits), _sampled_labels(logits, rng)) < 0.01


def test_reliability_bins_count_every_image():
    rng = np.random.default_rng(2)
    probabilities = softmax(rng.normal(0, 2, (500, 10)))
    rows = calibration.reliability(probabilities, rng.integers(0, 10, 500))
    assert len(rows) == 15 and sum(row["count"] for row in rows) == 500
    for row in rows:
        if row["count"]:
            assert row["low"] <= row["confidence"] <= row["high"]


def _ranked_scores():
    """200 answers, most confident first; the top 100 are right but for one."""
    confidence = np.linspace(1.0, 0.005, 200)
    correct = np.zeros(200, bool)
    correct[:100] = True
    correct[10] = False
    return confidence, correct


def test_threshold_keeps_the_most_answers_that_are_right_often_enough():
    confidence, correct = _ranked_scores()
    # 99 right of the top 101 is 98.0 %, of the top 102 it is 97.1 %.
    assert calibration.confidence_threshold(confidence, correct, 0.98) == confidence[100]
    assert calibration.confidence_threshold(confidence, correct, 0.99) == confidence[99]
    assert calibration.coverage_at_accuracy(confidence, correct, 0.98) == pytest.approx(101 / 200)
    assert calibration.coverage_at_accuracy(confidence, correct, 0.99) == pytest.approx(100 / 200)
    kept = confidence >= calibration.confidence_threshold(confidence, correct, 0.98)
    assert correct[kept].mean() >= 0.98


def test_threshold_never_splits_a_tie_and_gives_up_when_nothing_is_right():
    confidence = np.array([0.9, 0.8, 0.8, 0.7])
    correct = np.array([True, True, False, False])
    # A cut at 0.8 would keep both tied answers (2 of 3 right): only 0.9 reaches 90 %.
    assert calibration.confidence_threshold(confidence, correct, 0.9) == 0.9
    assert calibration.confidence_threshold(confidence, np.zeros(4, bool), 0.98) == 1.0


def test_risk_coverage_ends_at_the_overall_error():
    confidence, correct = _ranked_scores()
    curve = calibration.risk_coverage(confidence, correct)
    assert curve["coverage"][-1] == 1.0
    assert curve["risk"][-1] == pytest.approx(1 - correct.mean(), abs=1e-4)
    assert curve["risk"][0] == 0.0


def test_fit_calibration_measures_on_the_test_split_and_lowers_ece():
    rng = np.random.default_rng(3)
    calibrated_logits = rng.normal(0, 3, (4000, 10))
    labels = _sampled_labels(calibrated_logits, rng)
    logits = calibrated_logits * 3  # overconfident
    record = calibration.fit_calibration(logits[:2000], labels[:2000], logits[2000:], labels[2000:])
    assert record["measured_on"] == "test" and record["after"]["images"] == 2000
    assert record["after"]["ece"] < 0.03 < record["before"]["ece"]
    assert set(record["aurc_by_logit_norm"]) == {"none", "l2"}


def _gaussian_features(rng, n, shift=0.0):
    labels = rng.integers(0, 3, n)
    centres = np.array([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    return centres[labels] + rng.normal(0, 1, (n, 4)) + shift, labels


def test_ood_threshold_passes_95_percent_of_held_out_images_and_flags_strange_ones():
    rng = np.random.default_rng(4)
    fit, fit_labels = _gaussian_features(rng, 3000)
    heldout, heldout_labels = _gaussian_features(rng, 2000)
    logits = np.eye(3)[heldout_labels] * 5 + rng.normal(0, 1, (2000, 3))
    stats = ood.fit_ood(("block",), [fit], fit_labels, logits, [heldout], 3)
    assert (stats.scores(logits, [heldout]) <= stats.threshold).mean() == pytest.approx(0.95, abs=0.002)
    strange, _ = _gaussian_features(rng, 500, shift=8.0)
    flat_logits = rng.normal(0, 1, (500, 3))
    assert (stats.scores(flat_logits, [strange]) > stats.threshold).mean() > 0.95
    again = ood.OodStats.from_record(stats.to_record())
    # Stored at float32 precision: scores agree to well under a thousandth.
    np.testing.assert_allclose(again.scores(logits, [heldout]), stats.scores(logits, [heldout]), atol=1e-4)


def test_a_constant_part_is_left_out_of_the_score():
    parts = np.array([[1.0, 5.0], [3.0, 5.0]])
    spread = parts.std(axis=0)  # the second part (energy of a softmax model) never varies
    np.testing.assert_allclose(ood.standardised_sum(parts, parts.mean(axis=0), spread), [-1.0, 1.0])


def test_decisions_follow_the_thresholds_and_an_uncalibrated_model_is_always_confident():
    stats = ood.OodStats(("b",), (np.zeros((1, 1)),), (np.eye(1),), np.zeros(2), np.ones(2), threshold=2.0)
    calibrated = Calibration(temperature=1.5, confidence_threshold=0.8, ood=stats)
    assert calibrated.decide(0.95, 0.5) == "confident"
    assert calibrated.decide(0.6, 0.5) == "unsure"
    assert calibrated.decide(0.99, 2.5) == "unknown"
    plain = Calibration.from_record(None)
    assert not plain.calibrated and plain.decide(0.11, None) == "confident"
    logits = np.array([[2.0, 0.0, -1.0]])
    np.testing.assert_allclose(plain.probabilities(logits), softmax(logits))
    np.testing.assert_allclose(calibrated.probabilities(logits), softmax(logits / 1.5))


def test_mahalanobis_is_the_squared_distance_to_the_nearest_mean_with_or_without_kept_terms():
    rng = np.random.default_rng(5)
    means, features = rng.normal(size=(4, 6)), rng.normal(size=(7, 6))
    root = rng.normal(size=(6, 6))
    precision = root @ root.T + np.eye(6)
    brute = np.array([min((f - m) @ precision @ (f - m) for m in means) for f in features])
    np.testing.assert_allclose(ood.mahalanobis(features, means, precision), brute)
    kept = ood.mean_terms(means, precision)
    np.testing.assert_allclose(ood.mahalanobis(features, means, precision, kept), brute)
