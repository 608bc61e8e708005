"""What the model's outputs say: normalised entropy, confidence, and predicted-class shift.

Entropy is divided by log(C) so 0 means certain and 1 means uniform whatever the class count.
The predicted-class distribution against the reference's is a label-shift proxy available
before any ground truth arrives.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from monitor.signals.results import PredictionStats

_EPS = 1e-12


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Per-row entropy / log(C), in [0, 1]; probs is [n, C] with rows summing to 1."""
    c = probs.shape[1]
    if c < 2:
        return np.zeros(probs.shape[0], dtype=np.float64)
    p = probs.astype(np.float64, copy=False)
    h = -(p * np.log(np.clip(p, _EPS, 1.0))).sum(axis=1)
    return np.clip(h / np.log(c), 0.0, 1.0)


def smoothed_share(counts: np.ndarray) -> np.ndarray:
    """Class shares with add-half smoothing, so a class unseen in the reference is not impossible."""
    counts = np.asarray(counts, dtype=np.float64)
    return (counts + 0.5) / (counts.sum() + 0.5 * counts.size)


def prediction_stats(
    *,
    entropy: np.ndarray,
    max_prob: np.ndarray,
    class_counts: np.ndarray,
    ref_class_counts: np.ndarray,
) -> PredictionStats:
    """Window summaries from per-row entropy/max-prob and predicted-class counts."""
    if entropy.size == 0:
        raise ValueError("prediction statistics need at least one row")
    counts = np.asarray(class_counts, dtype=np.float64)
    n = counts.sum()
    share = counts / n if n > 0 else counts
    ref_share = smoothed_share(ref_class_counts)
    tvd = 0.5 * float(np.abs(share - np.asarray(ref_class_counts) / max(np.sum(ref_class_counts), 1)).sum())
    chi2_p = float(stats.chisquare(counts, f_exp=ref_share * n).pvalue) if n > 0 else 1.0
    return PredictionStats(
        entropy_mean=float(entropy.mean()),
        entropy_p50=float(np.quantile(entropy, 0.5)),
        entropy_p90=float(np.quantile(entropy, 0.9)),
        max_prob_mean=float(max_prob.mean()),
        max_prob_p10=float(np.quantile(max_prob, 0.1)),
        max_prob_p50=float(np.quantile(max_prob, 0.5)),
        class_tvd=tvd,
        class_chi2_p_value=chi2_p,
        class_share=tuple(float(s) for s in share),
    )
