"""The OOD threshold that people's labels support (no Flask, no database).

The calibration fits the "none of these" threshold on held-out images: the score that lets
HELDOUT_PASS_RATE (95 %) of them pass, so 5 % of in-scope images are wrongly called "unknown"
(inference/ood.py). Served images drift from held-out ones; the label queue's labels measure the
same rate on served images:

- in-scope evidence: the random lane's items labelled with a class (right or wrong). The lane is
  a uniform sample of the served predictions, so their stored OOD scores are an unbiased sample
  of in-scope scores; the items labelled "none of these" there are out of scope and left out;
- out-of-scope evidence: the items of the ood and random lanes labelled "none of these".

The proposal applies the calibration's own rule to the served in-scope images: the quantile of
their scores at the calibration's pass rate (np.quantile, as the fit). A lower threshold would
call more than the target share of in-scope images "unknown"; a higher one would let more
out-of-scope images through. The "none of these" answers say what the change does: the share of
them caught (scored above the threshold) now and with the proposal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

# The rule of thumb for a binomial count (n * p >= 5): at the 5 % target the proposal needs 100
# in-scope labels, so that about five of them lie above it; with fewer the quantile is little
# more than the largest score (at 20 labels, exactly the largest).
EXPECTED_ABOVE = 5
# The catch rate is reported in steps of at most 10 %; fewer answers say little about it.
MIN_NONE_LABELS = 10


class TooFewLabels(ValueError):
    """The labels cannot support a threshold yet: the message says what is missing."""


def minimum_in_scope(pass_rate: float) -> int:
    """In-scope labels needed so that EXPECTED_ABOVE of them are expected above the threshold."""
    return math.ceil(round(EXPECTED_ABOVE / (1 - pass_rate), 9))


@dataclass(frozen=True)
class Proposal:
    """What the labels support, beside what the model has now. Shares are of the labelled images:
    `false_unknown_*` of the in-scope ones scored above a threshold, `caught_*` of the "none of
    these" ones."""

    current: float
    proposed: float
    target_false_unknown: float
    in_scope_labels: int
    none_labels: int
    false_unknown_now: float
    false_unknown_proposed: float
    caught_now: float
    caught_proposed: float

    def to_dict(self) -> dict:
        return asdict(self)


def above(scores: np.ndarray, threshold: float) -> float:
    """The share of scores above the threshold (what serving calls "unknown": score > threshold)."""
    return float(np.mean(scores > threshold))


def propose(in_scope: Sequence[float], none: Sequence[float], current: float, pass_rate: float) -> Proposal:
    """The threshold the labels support (see the module's docstring), or TooFewLabels."""
    in_scope_scores, none_scores = np.asarray(in_scope, np.float64), np.asarray(none, np.float64)
    needed = minimum_in_scope(pass_rate)
    missing = []
    if len(in_scope_scores) < needed:
        missing.append(f"{len(in_scope_scores)} of {needed} in-scope labels from the random lane")
    if len(none_scores) < MIN_NONE_LABELS:
        missing.append(f'{len(none_scores)} of {MIN_NONE_LABELS} "none of these" labels from the ood or random lane')
    if missing:
        raise TooFewLabels("too few labels to tune the OOD threshold: " + "; ".join(missing))
    proposed = float(np.quantile(in_scope_scores, pass_rate))
    return Proposal(
        current=current,
        proposed=proposed,
        target_false_unknown=round(1 - pass_rate, 9),
        in_scope_labels=len(in_scope_scores),
        none_labels=len(none_scores),
        false_unknown_now=above(in_scope_scores, current),
        false_unknown_proposed=above(in_scope_scores, proposed),
        caught_now=above(none_scores, current),
        caught_proposed=above(none_scores, proposed),
    )
