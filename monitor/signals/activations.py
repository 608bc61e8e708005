"""Backbone activation statistics of a window against the reference, dimension by dimension.

The shift of dimension j is a Welch z-score: the difference of window and reference means in
units of its standard error, sqrt(var_ref/n_ref + var_win/n_win). With hundreds of dims, some
are "significant" by chance, so the share of shifted dims is counted after Benjamini-Hochberg.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from monitor.signals.results import ActivationStats, DimShift

_VAR_FLOOR = 1e-12  # dead units (ReLU dims that never fire) have zero variance
LARGE_SHIFT_SD = 0.5  # a dim "moved" when its mean shifted by more than this many pooled sd


def benjamini_hochberg(p_values: np.ndarray, alpha: float) -> np.ndarray:
    """Boolean mask of discoveries at false discovery rate ``alpha``."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    if m == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(p)
    thresholds = alpha * np.arange(1, m + 1) / m
    below = p[order] <= thresholds
    mask = np.zeros(m, dtype=bool)
    if below.any():
        last = int(np.nonzero(below)[0].max())
        mask[order[: last + 1]] = True
    return mask


def activation_stats(
    *,
    window_sum: np.ndarray,
    window_sumsq: np.ndarray,
    window_rows: int,
    ref_mean: np.ndarray,
    ref_var: np.ndarray,
    ref_rows: int,
    alpha: float,
    top_k: int,
) -> ActivationStats:
    """Summarise per-dimension shifts from running sums of the window (float64, shape [D]).

    Running sums rather than the rows themselves keep a window's memory at O(D) whatever its size.
    """
    if window_rows < 2:
        raise ValueError(f"activation statistics need at least 2 rows, got {window_rows}")
    n = float(window_rows)
    mean = window_sum / n
    var = np.maximum((window_sumsq - n * mean * mean) / (n - 1.0), 0.0)
    se = np.sqrt(ref_var / max(ref_rows, 1) + var / n)
    diff = mean - ref_mean
    # Dims constant in both sets have se == 0: no evidence of shift unless the constants differ.
    shift = np.where(se > _VAR_FLOOR, diff / np.maximum(se, _VAR_FLOOR), np.where(np.abs(diff) > 0, np.inf, 0.0))
    abs_shift = np.abs(shift)
    p_values = 2.0 * stats.norm.sf(abs_shift)
    significant = benjamini_hochberg(p_values, alpha)
    ratio = (var + _VAR_FLOOR) / (ref_var + _VAR_FLOOR)
    pooled_sd = np.sqrt(0.5 * (ref_var + var)) + 1e-6  # as retrain.strategy.domain_gap measures it
    large = np.abs(diff) / pooled_sd > LARGE_SHIFT_SD
    log_ratio = np.abs(np.log(ratio))
    finite_abs = np.where(np.isfinite(abs_shift), abs_shift, np.finfo(np.float64).max)
    k = min(top_k, shift.size)
    top = np.argsort(-finite_abs, kind="stable")[:k]
    return ActivationStats(
        max_abs_shift=float(finite_abs.max()),
        mean_abs_shift=float(finite_abs.mean()),
        share_significant=float(significant.mean()),
        max_abs_log_variance_ratio=float(log_ratio.max()),
        mean_variance_ratio=float(ratio.mean()),
        top_dims=tuple(DimShift(dim=int(j), shift=float(shift[j]), variance_ratio=float(ratio[j])) for j in top),
        share_large_shift=float(large.mean()),
    )
