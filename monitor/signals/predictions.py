"""What the model's outputs say: normalised entropy, confidence, and predicted-class shift.

Entropy is divided by log(C) so 0 means certain and 1 means uniform whatever the class count.
The predicted-class distribution against the reference's is a label-shift proxy available
before any ground truth arrives: a two-sample test of the counts and, when the reference has
labels, the BBSD estimate of the window's class prior (monitor/signals/label_shift.py).
"""

from __future__ import annotations

import numpy as np
from monitor.signals.label_shift import class_count_test, estimate_class_prior, total_variation
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


def prediction_stats(
    *,
    entropy: np.ndarray,
    max_prob: np.ndarray,
    class_counts: np.ndarray,
    ref_class_counts: np.ndarray,
    rng: np.random.Generator,
    confusion: np.ndarray | None = None,
) -> PredictionStats:
    """Window summaries from per-row entropy/max-prob and predicted-class counts.

    ``confusion`` (predicted i, label j counts on the labelled reference) enables the class-prior
    estimate; ``rng`` drives the exact test when expected counts are small."""
    if entropy.size == 0:
        raise ValueError("prediction statistics need at least one row")
    counts = np.asarray(class_counts, dtype=np.float64)
    ref_counts = np.asarray(ref_class_counts)
    n = counts.sum()
    share = counts / n if n > 0 else counts
    tvd = total_variation(share, ref_counts / max(ref_counts.sum(), 1))
    test = class_count_test(ref_counts, np.asarray(class_counts), rng=rng)
    prior = prior_tvd = None
    if confusion is not None and confusion.sum() > 0:
        estimated = estimate_class_prior(confusion, counts)
        prior = tuple(float(v) for v in estimated)
        prior_tvd = total_variation(estimated, confusion.sum(axis=0) / confusion.sum())
    return PredictionStats(
        entropy_mean=float(entropy.mean()),
        entropy_p50=float(np.quantile(entropy, 0.5)),
        entropy_p90=float(np.quantile(entropy, 0.9)),
        max_prob_mean=float(max_prob.mean()),
        max_prob_p10=float(np.quantile(max_prob, 0.1)),
        max_prob_p50=float(np.quantile(max_prob, 0.5)),
        class_tvd=tvd,
        class_chi2_p_value=test.p_value,
        class_share=tuple(float(s) for s in share),
        class_test=test.method,
        class_prior=prior,
        class_prior_tvd=prior_tvd,
    )
