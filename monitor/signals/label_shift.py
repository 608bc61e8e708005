"""Label shift from predictions: a two-sample test of predicted-class counts, and the class prior.

The test compares the window's predicted-class counts with the reference's as two samples (a
2 x C contingency table), because the reference proportions are themselves estimated: testing
the window against them as if they were exact rejected 13 of 16 undrifted windows at p < 0.01
against a 300-row reference. Pearson's chi-square is used when every expected cell count is at
least 5; otherwise the same statistic is referred to its exact conditional distribution (tables
with the observed margins, drawn from the multivariate hypergeometric), since the chi-square
approximation is unreliable with small expected counts.

The class prior is estimated BBSD-style (Lipton et al., 2018) by maximum likelihood (MLLS,
Saerens et al., 2002; Garg et al., 2020): under pure label shift the predicted-class shares are
``confusion @ prior``, with ``confusion[i, j] = P(predicted i | label j)`` measured on the
labelled reference; EM finds the prior on the simplex that explains the window's counts best.
It is only meaningful under label shift (p(x | y) unchanged); a covariate shift that makes the
model predict one class reads as a prior that favours it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

# Cochran's rule, strict form: every expected count >= 5 for the chi-square approximation.
MIN_EXPECTED = 5.0
EXACT_DRAWS = 2000      # Monte Carlo tables for the exact conditional test: p-value sd <= 0.011
_PRIOR_ITERATIONS = 2000
_PRIOR_TOLERANCE = 1e-10


@dataclass(frozen=True)
class ClassCountTest:
    statistic: float        # Pearson's X^2 of the 2 x C table (classes unseen in both dropped)
    p_value: float
    method: str             # "chi2" (asymptotic) or "exact" (Monte Carlo conditional test)


def _pearson(table: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """X^2 of one table (2, C) or many (B, 2, C) against ``expected`` (2, C)."""
    return ((table - expected) ** 2 / expected).sum(axis=(-2, -1))


def class_count_test(
    reference_counts: np.ndarray, window_counts: np.ndarray, *, rng: np.random.Generator, draws: int = EXACT_DRAWS
) -> ClassCountTest:
    """Do the reference and the window predict classes in the same proportions?

    Both are samples: the p-value is for the 2 x C contingency table (reference counts, window
    counts), not for the window against the reference shares taken as exact."""
    ref = np.asarray(reference_counts, dtype=np.int64)
    win = np.asarray(window_counts, dtype=np.int64)
    if ref.shape != win.shape or ref.ndim != 1:
        raise ValueError(f"reference and window counts must be 1-D of one length, got {ref.shape} and {win.shape}")
    if (ref < 0).any() or (win < 0).any():
        raise ValueError("class counts must be non-negative")
    seen = (ref + win) > 0
    table = np.stack([ref[seen], win[seen]]).astype(np.float64)
    if table.shape[1] < 2 or ref.sum() == 0 or win.sum() == 0:
        return ClassCountTest(statistic=0.0, p_value=1.0, method="chi2")  # nothing to compare
    rows = table.sum(axis=1, keepdims=True)
    cols = table.sum(axis=0, keepdims=True)
    expected = rows * cols / table.sum()
    observed = float(_pearson(table, expected))
    if expected.min() >= MIN_EXPECTED:
        p = float(stats.chi2.sf(observed, df=table.shape[1] - 1))
        return ClassCountTest(statistic=observed, p_value=p, method="chi2")
    # Exact conditional test: under the null, given both margins, the window's counts are a
    # multivariate hypergeometric draw of its size from the pooled counts.
    window_draws = rng.multivariate_hypergeometric(cols[0].astype(np.int64), int(rows[1, 0]), size=draws)
    tables = np.stack([cols[0] - window_draws, window_draws], axis=1).astype(np.float64)
    null = _pearson(tables, expected)
    # Statistics equal to the observed one up to float noise count as exceedances (a discrete null).
    exceed = int((null >= observed - 1e-9 * max(1.0, observed)).sum())
    return ClassCountTest(statistic=observed, p_value=(1 + exceed) / (1 + draws), method="exact")


def confusion_rates(confusion_counts: np.ndarray) -> np.ndarray:
    """``counts[i, j]`` (predicted i, label j) -> ``P(predicted i | label j)``; zero columns stay zero."""
    counts = np.asarray(confusion_counts, dtype=np.float64)
    totals = counts.sum(axis=0, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def estimate_class_prior(confusion_counts: np.ndarray, predicted_counts: np.ndarray) -> np.ndarray:
    """Maximum-likelihood class prior of the window under label shift (EM on the simplex).

    Classes without a labelled reference row cannot be told apart from anything and get 0."""
    rates = confusion_rates(confusion_counts)
    counts = np.asarray(predicted_counts, dtype=np.float64)
    if rates.shape != (counts.size, counts.size):
        raise ValueError(f"confusion is {rates.shape} but there are {counts.size} predicted-class counts")
    known = rates.sum(axis=0) > 0
    prior = np.where(known, 1.0, 0.0)
    if counts.sum() == 0 or not known.any():
        return prior / max(prior.sum(), 1.0)
    prior /= prior.sum()
    share = counts / counts.sum()
    for _ in range(_PRIOR_ITERATIONS):
        predicted = rates @ prior
        ratio = np.divide(share, predicted, out=np.zeros_like(share), where=predicted > 0)
        updated = prior * (rates.T @ ratio)
        updated /= updated.sum()
        if np.abs(updated - prior).max() < _PRIOR_TOLERANCE:
            return updated
        prior = updated
    return prior


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum())
