"""The statistics of drift monitoring: is a window of served predictions unlike the model's reference?

Flask-free, NumPy and SciPy only. A window is compared with the reference fitted beside the model's
calibration (monitoring/reference.py) by three groups of tests:

- input ("the photos changed"): KS on each image statistic, and MMD² with a permutation test on
  the PCA embeddings of the pooled features (RBF kernel, bandwidth by the median heuristic);
- prediction: chi-square on the predicted classes (Jensen-Shannon distance reported as the size of
  the shift), KS on the calibrated top probability and on the OOD score, binomial tests on the
  unsure and unknown rates;
- model ("the model is likely hurt"): the estimated accuracy (mean calibrated top probability)
  more than 3 standard errors below the reference's, or the unknown rate significantly higher.

The drift tests share ALPHA by a weighted Bonferroni correction over both groups (not only the
input tests): the target is at most 1 % of unshifted windows with any alarm, and ten tests at 1 %
each would raise several times that. The chi-square on predicted classes holds 4 of the 13 shares:
a change of class priors shows in it alone, while a change of the photos moves several tests at
once to p-values far below any level.

SciPy is imported inside the functions that use it: a web worker that has not closed a window
yet does not hold its memory (the lean worker's PSS budget).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ALPHA = 0.01
ACCURACY_SIGMAS = 3.0
# Shares of ALPHA in the weighted Bonferroni correction; a test not named has one.
WEIGHTS = {"chi2_classes": 4.0}
# Enough permutations that the smallest p-value, 1 / (n + 1), is below one share (ALPHA / 13).
MMD_PERMUTATIONS = 1500
# Points per side in the MMD test: the kernel matrix of both sides is (2 x this)², and each
# permutation costs one pass over it.
MMD_SAMPLE = 250
IMAGE_STATISTICS = ("brightness_mean", "brightness_std", "saturation_mean", "sharpness")
ALERTS = ("input", "prediction", "model")


@dataclass(frozen=True)
class Sample:
    """What drift is measured on, for the reference's images or a window's predictions (n rows).

    `classes` are predicted class indexes; `ood_scores` is None for a model without an OOD score;
    `statistics` is n x 4 in IMAGE_STATISTICS order; `embeddings` n x k PCA coordinates (None when
    the model has no pooled features)."""

    classes: np.ndarray
    top_probability: np.ndarray
    decisions: np.ndarray
    ood_scores: np.ndarray | None
    statistics: np.ndarray
    embeddings: np.ndarray | None

    def __len__(self) -> int:
        return len(self.classes)

    def rate(self, decision: str) -> float:
        return float(np.mean(self.decisions == decision)) if len(self) else 0.0


@dataclass(frozen=True)
class TestResult:
    """One test on one window: its statistic, p-value and whether it rejects at the corrected level."""

    name: str
    group: str  # "input" or "prediction"
    statistic: float
    p_value: float
    drift: bool = False
    # The size of the shift where the statistic alone does not say it (Jensen-Shannon distance).
    effect: float | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "group": self.group,
            "statistic": self.statistic,
            "p_value": self.p_value,
            "drift": self.drift,
            "effect": self.effect,
        }


@dataclass(frozen=True)
class AccuracyEstimate:
    """Mean calibrated top probability of a window, its standard error, and the reference's."""

    value: float
    se: float
    reference: float
    reference_se: float

    @property
    def z(self) -> float:
        """Standard errors (of the difference) the window's estimate lies below the reference's."""
        spread = float(np.hypot(self.se, self.reference_se))
        return (self.reference - self.value) / spread if spread > 0 else 0.0

    @property
    def fell(self) -> bool:
        return self.z > ACCURACY_SIGMAS

    def to_dict(self) -> dict:
        return {"value": self.value, "se": self.se, "reference": self.reference, "z_below": self.z}


@dataclass(frozen=True)
class WindowReport:
    """Every test's result on a window, the accuracy estimate and the alerts they raise."""

    count: int
    tests: list[TestResult]
    accuracy: AccuracyEstimate
    unknown_rose: bool
    alerts: list[str] = field(default_factory=list)

    @property
    def min_p_value(self) -> float:
        return min((t.p_value for t in self.tests), default=1.0)

    def to_dict(self) -> dict:
        return {
            "count": self.count,
            "estimated_accuracy": self.accuracy.to_dict(),
            "unknown_rose": self.unknown_rose,
            "alerts": list(self.alerts),
            "tests": [t.to_dict() for t in self.tests],
        }


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    """The mean and its standard error (0 for fewer than two values)."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return (float(values.mean()) if len(values) else 0.0), 0.0
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def estimate_accuracy(window: np.ndarray, reference: np.ndarray) -> AccuracyEstimate:
    """The window's estimated accuracy (mean calibrated top probability) against the reference's."""
    value, se = mean_and_se(window)
    ref_value, ref_se = mean_and_se(reference)
    return AccuracyEstimate(value, se, ref_value, ref_se)


def class_shift(window: np.ndarray, reference: np.ndarray, num_classes: int) -> tuple[float, float, float]:
    """Chi-square test of homogeneity of predicted-class counts (2 x classes table, classes that
    neither side predicts left out): (statistic, p-value, Jensen-Shannon distance, base 2)."""
    from scipy import stats
    from scipy.spatial.distance import jensenshannon

    counts = np.stack([np.bincount(reference, minlength=num_classes), np.bincount(window, minlength=num_classes)])
    counts = counts[:, counts.sum(axis=0) > 0]

    distance = float(jensenshannon(counts[0] / counts[0].sum(), counts[1] / counts[1].sum(), base=2))
    if counts.shape[1] < 2:
        return 0.0, 1.0, distance
    result = stats.chi2_contingency(counts, correction=False)
    return float(result.statistic), float(result.pvalue), distance


def ks(window: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test: (statistic, p-value)."""
    from scipy import stats

    result = stats.ks_2samp(window, reference)
    return float(result.statistic), float(result.pvalue)


def rate_test(successes: int, trials: int, reference_rate: float, alternative: str = "two-sided") -> float:
    """Binomial test of a window's rate against the reference's; its p-value."""
    if trials == 0:
        return 1.0
    from scipy import stats

    rate = min(max(reference_rate, 1e-6), 1 - 1e-6)  # a rate of exactly 0 or 1 makes any other count impossible
    return float(stats.binomtest(successes, trials, rate, alternative=alternative).pvalue)


def rbf_kernel(points: np.ndarray, bandwidth: float | None = None) -> np.ndarray:
    """exp(-|x - y|² / (2 h²)) for every pair; h by the median heuristic (median pairwise distance)."""
    squared = np.sum(points**2, axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2 * points @ points.T, 0.0)
    if bandwidth is None:
        upper = distances[np.triu_indices(len(points), k=1)]
        median = float(np.median(upper)) if len(upper) else 1.0
        bandwidth = np.sqrt(median / 2) if median > 0 else 1.0
    return np.exp(-distances / (2 * bandwidth**2))


def _mmd2_of_assignments(kernel: np.ndarray, in_x: np.ndarray) -> np.ndarray:
    """Biased MMD² for each row of a boolean (assignments x points) matrix, True marking sample x:
    s' K s with s = 1/n_x on x and -1/n_y on y, one matrix product for all rows."""
    n_x = in_x.sum(axis=1, keepdims=True)
    weights = np.where(in_x, 1.0 / n_x, -1.0 / (in_x.shape[1] - n_x)).astype(kernel.dtype)
    return np.einsum("ij,ij->i", weights @ kernel, weights).astype(np.float64)


def mmd_test(
    window: np.ndarray, reference: np.ndarray, permutations: int = MMD_PERMUTATIONS, seed: int = 0
) -> tuple[float, float]:
    """MMD² between two samples (RBF kernel, median heuristic) and its permutation p-value,
    (1 + permutations at least as large) / (1 + permutations). Each side is subsampled to MMD_SAMPLE."""
    rng = np.random.default_rng(seed)
    window, reference = (_at_most(rng, np.asarray(s, np.float64), MMD_SAMPLE) for s in (window, reference))
    # float32 halves the cost of the permutations; MMD² is compared with itself, not with a constant.
    kernel = rbf_kernel(np.concatenate([window, reference])).astype(np.float32)
    total, n_x = len(kernel), len(window)
    observed = np.zeros((1, total), bool)
    observed[0, :n_x] = True
    statistic = float(_mmd2_of_assignments(kernel, observed)[0])
    exceed = 0
    for start in range(0, permutations, 250):  # in blocks: a (block x points) matrix at a time
        block = min(250, permutations - start)
        order = np.argsort(rng.random((block, total)), axis=1)
        assigned = np.zeros((block, total), bool)
        np.put_along_axis(assigned, order[:, :n_x], True, axis=1)
        exceed += int(np.sum(_mmd2_of_assignments(kernel, assigned) >= statistic * (1 - 1e-5)))
    return statistic, (1 + exceed) / (1 + permutations)


def _at_most(rng: np.random.Generator, values: np.ndarray, limit: int) -> np.ndarray:
    return values if len(values) <= limit else values[rng.choice(len(values), limit, replace=False)]


def drift_tests(window: Sample, reference: Sample, num_classes: int, seed: int = 0) -> list[TestResult]:
    """Every drift test of a window against the reference, p-values uncorrected."""
    results = [
        TestResult(f"ks_{name}", "input", *ks(window.statistics[:, i], reference.statistics[:, i]))
        for i, name in enumerate(IMAGE_STATISTICS)
    ]
    if window.embeddings is not None and reference.embeddings is not None:
        results.append(
            TestResult("mmd_embeddings", "input", *mmd_test(window.embeddings, reference.embeddings, seed=seed))
        )
    chi2, p, distance = class_shift(window.classes, reference.classes, num_classes)
    results.append(TestResult("chi2_classes", "prediction", chi2, p, effect=distance))
    results.append(
        TestResult("ks_top_probability", "prediction", *ks(window.top_probability, reference.top_probability))
    )
    if window.ood_scores is not None and reference.ood_scores is not None:
        results.append(TestResult("ks_ood_score", "prediction", *ks(window.ood_scores, reference.ood_scores)))
    for decision in ("unsure", "unknown"):
        count = int(np.sum(window.decisions == decision))
        p = rate_test(count, len(window), reference.rate(decision))
        results.append(TestResult(f"binomial_{decision}_rate", "prediction", window.rate(decision), p))
    return results


def bonferroni(results: list[TestResult], alpha: float = ALPHA) -> list[TestResult]:
    """The results with `drift` set where p < alpha x (the test's weight / all the tests' weights)."""
    total = sum(WEIGHTS.get(r.name, 1.0) for r in results)
    return [
        TestResult(
            r.name, r.group, r.statistic, r.p_value, r.p_value < alpha * WEIGHTS.get(r.name, 1.0) / total, r.effect
        )
        for r in results
    ]


def evaluate(window: Sample, reference: Sample, num_classes: int, seed: int = 0) -> WindowReport:
    """The tests, accuracy estimate and alerts of one window against the reference."""
    results = bonferroni(drift_tests(window, reference, num_classes, seed))
    accuracy = estimate_accuracy(window.top_probability, reference.top_probability)
    unknown = next(r for r in results if r.name == "binomial_unknown_rate")
    unknown_rose = unknown.drift and window.rate("unknown") > reference.rate("unknown")
    alerts = [group for group in ("input", "prediction") if any(r.drift for r in results if r.group == group)]
    if accuracy.fell or unknown_rose:
        alerts.append("model")
    return WindowReport(len(window), results, accuracy, unknown_rose, alerts)
