"""Two classifiers scored on the same rows: is the candidate better, or no worse than a margin?

Both models answer the same rows, so only the rows where exactly one of them is right carry
evidence (McNemar's insight): ``better`` (candidate right, current wrong) and ``worse`` (the
reverse). The difference of accuracies is ``(better - worse) / rows``; testing it on the same rows
removes the row-to-row variation that two independent accuracies would carry.

- margin 0: the exact one-sided McNemar test (a binomial test on the discordant rows),
  H1: the candidate is more accurate.
- margin m > 0: Tango's score test for paired proportions (Tango 1998, Statistics in Medicine
  17:891-908), H0: candidate - current <= -m, H1: candidate - current > -m (non-inferiority: the
  candidate loses less than m). It keeps its level near nominal down to a few hundred rows and,
  unlike a Wald interval, does not collapse to zero width when no row disagrees.

The one-sided bounds invert the same tests, so a bound and its p-value never disagree.

Rows that belong together (renders or photos of one object, one patient's scans: the ``groups``
retrain.group_pattern names) are not independent: when the candidate forgets an object it tends
to miss all its rows at once, and a test that counts them as independent is overconfident. For
grouped rows the tests use the Rao-Scott adjustment (Rao & Scott 1992, Biometrics 48:577-585):
the design effect (the cluster-robust variance of the paired difference, from the groups' sums,
over the variance independent rows would give; never below 1) divides every count, so a slice of
300 rows whose disagreements come in fours weighs about as much as 75 independent rows. The
floors (``floor_rows``) stay in rows: they are about a candidate identical to the current model,
whose design effect is 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

MCNEMAR = "exact McNemar (one-sided)"
TANGO = "Tango score test (one-sided, non-inferiority)"


@dataclass(frozen=True)
class PairedCounts:
    """Outcomes of candidate and current on the same ``rows``."""

    rows: int
    better: int             # candidate right, current wrong
    worse: int              # candidate wrong, current right
    candidate_correct: int
    current_correct: int
    groups: int | None = None     # distinct groups the rows came in (None: every row its own)
    design_effect: float = 1.0    # variance inflation from grouping (>= 1); the tests divide counts by it

    @property
    def effective_rows(self) -> float:
        """How many independent rows the slice weighs as (rows / design effect)."""
        return self.rows / self.design_effect

    @property
    def difference(self) -> float:
        """Candidate accuracy minus current accuracy (0 on an empty slice)."""
        return (self.better - self.worse) / self.rows if self.rows else 0.0

    @property
    def candidate_accuracy(self) -> float:
        return self.candidate_correct / self.rows if self.rows else 0.0

    @property
    def current_accuracy(self) -> float:
        return self.current_correct / self.rows if self.rows else 0.0


def paired_counts(candidate_correct: np.ndarray, current_correct: np.ndarray) -> PairedCounts:
    """Counts from per-row correctness (bool arrays of the same length, one entry per row)."""
    a = np.asarray(candidate_correct, dtype=bool)
    b = np.asarray(current_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"per-row correctness must be two 1-D arrays of one length, got {a.shape} and {b.shape}")
    return PairedCounts(rows=int(a.size), better=int((a & ~b).sum()), worse=int((~a & b).sum()),
                        candidate_correct=int(a.sum()), current_correct=int(b.sum()))


def grouped_counts(candidate_correct: np.ndarray, current_correct: np.ndarray, groups: np.ndarray) -> PairedCounts:
    """Counts of rows that come in ``groups`` (one key per row), with their Rao-Scott design effect.

    The design effect is the cluster-robust (between-group) variance of the mean paired difference
    over its independent-rows variance, at least 1: grouping can only widen the evidence. With no
    disagreement at all the ratio is undefined and taken as 1 (its limit as disagreements become
    rare and scattered); a slice that is one group weighs as one row."""
    counts = paired_counts(candidate_correct, current_correct)
    keys = np.asarray(groups)
    if keys.shape != (counts.rows,):
        raise ValueError(f"groups must have one key per row: {keys.shape} for {counts.rows} rows")
    if counts.rows == 0:
        return counts
    _, group_of = np.unique(keys, return_inverse=True)
    k = int(group_of.max()) + 1
    n = counts.rows
    d = np.asarray(candidate_correct, dtype=np.float64) - np.asarray(current_correct, dtype=np.float64)
    mean = d.mean()
    sums = np.bincount(group_of, weights=d, minlength=k)
    sizes = np.bincount(group_of, minlength=k)
    independent = (counts.better + counts.worse) / n - mean * mean  # per-row variance of d
    if k == n:  # every row its own group: independent rows, exactly the ungrouped test
        effect = 1.0
    elif k < 2:
        effect = float(n)
    elif independent <= 0.0:
        effect = 1.0
    else:
        between = k / (k - 1) * float(((sums - sizes * mean) ** 2).sum()) / n
        effect = max(1.0, float(between / independent))
    return PairedCounts(n, counts.better, counts.worse, counts.candidate_correct, counts.current_correct,
                        groups=k, design_effect=effect)


def _effective(counts: PairedCounts) -> tuple[float, float, float]:
    """(rows, better, worse) as independent-row equivalents: each divided by the design effect."""
    e = counts.design_effect
    return counts.rows / e, counts.better / e, counts.worse / e


def _restricted_better(worse: float, better: float, rows: float, delta: float) -> float:
    """Tango's restricted MLE of P(better) under H0: P(worse) - P(better) = delta (delta >= 0)."""
    a = 2.0 * rows
    b = (2.0 * rows + better - worse) * delta - worse - better
    c = -better * delta * (1.0 - delta)
    return (math.sqrt(max(b * b - 4.0 * a * c, 0.0)) - b) / (2.0 * a)


def score_z(counts: PairedCounts, delta: float) -> float:
    """Tango's z for H0: P(worse) - P(better) = ``delta`` (negative when the data say less)."""
    if delta < 0:  # the same test with the roles of the two models swapped
        swapped = PairedCounts(counts.rows, counts.worse, counts.better, counts.current_correct,
                               counts.candidate_correct, counts.groups, counts.design_effect)
        return -score_z(swapped, -delta)
    n, better, worse = _effective(counts)
    variance = n * (2.0 * _restricted_better(worse, better, n, delta) + delta - delta * delta)
    numerator = worse - better - n * delta
    if variance <= 0.0:  # delta 0 and no discordant row: no evidence either way
        return 0.0 if numerator == 0 else math.copysign(math.inf, numerator)
    return numerator / math.sqrt(variance)


def p_value(counts: PairedCounts, margin: float) -> float:
    """One-sided p-value for H1: candidate - current > -``margin`` (margin >= 0)."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if margin == 0:
        _, better, worse = _effective(counts)
        discordant = round(better + worse)  # the exact test counts whole rows
        if discordant == 0:
            return 1.0
        return float(stats.binomtest(min(round(better), discordant), discordant, 0.5, alternative="greater").pvalue)
    return float(stats.norm.cdf(score_z(counts, margin)))


def lower_bound(counts: PairedCounts, alpha: float) -> float:
    """One-sided (1 - alpha) lower confidence bound on candidate - current (Tango score inversion)."""
    if counts.rows == 0:
        return -1.0
    level = stats.norm.ppf(alpha)  # z below which H0: P(worse) - P(better) = delta is rejected
    lo, hi = -counts.difference, 1.0 - 1e-12  # score_z falls from ~0 at the estimate to -inf at 1
    if score_z(counts, lo) <= level:
        return counts.difference
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if score_z(counts, mid) > level:
            lo = mid
        else:
            hi = mid
    return -hi


def floor_rows(margin: float, alpha: float) -> int | None:
    """The smallest slice on which even a candidate identical to the current model could show that
    it loses less than ``margin`` (Tango, no discordant row: z = -sqrt(n m / (1 - m))); None for
    margin 0, where an identical candidate never passes whatever the size."""
    if margin <= 0:
        return None
    z = stats.norm.ppf(1.0 - alpha)
    return math.ceil(z * z * (1.0 - margin) / margin - 1e-9)


def rows_needed(counts: PairedCounts, margin: float, alpha: float) -> int | None:
    """Rows at which the test would pass if the observed rates held (None: no size would do,
    because the observed difference is at or below -margin). Grouped rows: rows in groups like
    these, so the design effect times the independent rows needed."""
    if counts.rows == 0:
        return None
    d = counts.difference + margin
    if d <= 0:
        return None
    z = stats.norm.ppf(1.0 - alpha)
    pb, pw = counts.better / counts.rows, counts.worse / counts.rows
    if margin == 0:
        variance = pb + pw  # McNemar's, per row
    else:
        x = _restricted_better(counts.worse, counts.better, counts.rows, margin)
        variance = 2.0 * x + margin - margin * margin
    return max(counts.rows, math.ceil(counts.design_effect * z * z * variance / (d * d)))
