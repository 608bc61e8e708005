"""Typed results of every signal, and the per-window record that bundles them.

These are what the engine hands to the policy, the metrics exporter, the status API and
``driftd check``. The JSON view is derived in one place: :func:`to_json`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DimShift:
    """One feature dimension's departure from the reference."""

    dim: int
    shift: float            # (window mean - reference mean) / standard error, signed
    variance_ratio: float   # window variance / reference variance


@dataclass(frozen=True)
class ActivationStats:
    max_abs_shift: float            # max over dims of |shift| (standard-error units)
    mean_abs_shift: float
    share_significant: float        # share of dims significant after Benjamini-Hochberg
    max_abs_log_variance_ratio: float
    mean_variance_ratio: float
    top_dims: tuple[DimShift, ...]  # most shifted dims, for attribution
    # share of dims whose mean moved more than half a pooled standard deviation: an effect size,
    # not a significance (a 5000-row window makes tiny moves significant); the retrain job's
    # strategy reads the domain gap on this scale (retrain.strategy.domain_gap)
    share_large_shift: float = 0.0


@dataclass(frozen=True)
class PredictionStats:
    entropy_mean: float             # normalised to [0, 1] by log(C)
    entropy_p50: float
    entropy_p90: float
    max_prob_mean: float
    max_prob_p10: float
    max_prob_p50: float
    class_tvd: float                # total variation distance of predicted classes vs reference
    class_chi2_p_value: float       # two-sample test of predicted-class counts, window vs reference sample
    class_share: tuple[float, ...]  # predicted-class distribution in the window
    # Defaults keep checkpoints written before these fields loadable.
    class_test: str = "chi2"        # "chi2" (asymptotic) or "exact" (small expected counts)
    class_prior: tuple[float, ...] | None = None  # BBSD (MLLS) estimate of the window's class prior
    class_prior_tvd: float | None = None          # its total variation from the reference's label prior

    def __post_init__(self) -> None:
        # A window read back from the checkpoint's JSON has lists; keep the tuple (hashable, equal).
        if isinstance(self.class_prior, list):
            object.__setattr__(self, "class_prior", tuple(self.class_prior))


@dataclass(frozen=True)
class MmdResult:
    mmd2: float                     # unbiased MMD^2 estimate
    p_value: float                  # (1 + k) / (1 + B), never 0
    permutations: int
    window_rows: int                # rows of the window used (after subsampling)
    reference_rows: int
    bandwidth: float                # Gaussian kernel sigma, fixed at reference build


@dataclass(frozen=True)
class OnlineMmdStatus:
    statistic: float                # latest sequential MMD^2 statistic
    threshold: float                # threshold in force at the latest step
    alarm: bool                     # an alarm was raised during this window
    alarms_total: int               # alarms since the detector was created
    rows_since_reset: int           # steps since the last reset
    run_length_rows: int | None     # rows between the last reset and the alarm, when alarm


@dataclass(frozen=True)
class AccuracyStats:
    accuracy_last_n: float | None       # over the last N joined labels (None before any label)
    labels_last_n: int
    accuracy_last_seconds: float | None  # over predictions within the last T seconds that have labels
    labels_last_seconds: int
    per_class_recall: dict[int, float]  # over the last N labels
    label_delay_p50_seconds: float | None
    label_delay_p90_seconds: float | None


@dataclass(frozen=True)
class EstimateStats:
    estimated_accuracy: float       # label-free estimate of the window's accuracy (``method``)
    reference_accuracy: float       # accuracy on the labelled reference, for scale
    # Defaults keep checkpoints written before these fields (CBPE only, no interval) loadable.
    lower: float | None = None      # bootstrap interval (signals.estimate.interval) over window rows
    upper: float | None = None      # and reference refits
    method: str = "cbpe"            # the estimator in force (signals.estimate.method, or its fallback)
    typical_share: float | None = None  # cott: share of rows that look like reference rows of their class
    target_shift: float | None = None   # cott: total variation of the label prior it assumed vs the reference's
    interval: float = 0.9           # confidence level of [lower, upper] (two-sided)


@dataclass(frozen=True)
class WindowSignals:
    """Every signal of one closed window of one model_version."""

    model_version: str
    index: int                      # window sequence number for this model_version
    start_time: float               # event time of the first row, epoch seconds
    end_time: float                 # event time of the last row
    rows: int
    activations: ActivationStats
    predictions: PredictionStats
    mmd: MmdResult | None           # None when the window had too few rows for a test
    online: OnlineMmdStatus
    accuracy: AccuracyStats
    estimate: EstimateStats | None  # None when the reference has no labels to fit a calibrator
    reference_id: str = ""          # which reference the window was compared against


@dataclass(frozen=True)
class LabelEvaluation:
    """Accuracy of one model_version judged when labels arrive (label time), not when a feature
    window closes: labels come long after their window, often all at once when driftd catches up
    on a backlog, and the accuracy rules must see them as they come."""

    model_version: str
    index: int                      # evaluation sequence number for this model_version
    start_time: float               # event time of the oldest prediction among the labels it added
    end_time: float                 # the version's newest prediction time when it was made
    new_labels: int                 # labels joined since the previous evaluation
    accuracy: AccuracyStats
    reference_id: str = ""


def to_json(value: Any) -> Any:
    """Dataclasses -> plain JSON types; NaN/inf become None (JSON has no NaN)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return to_json(value.item())
    return value


def signal_values(window: WindowSignals) -> dict[str, float]:
    """Flat ``name -> value`` view of the scalar signals; the names policy rules refer to.

    Missing values (no labels yet, no MMD this window) are left out rather than zeroed, so a
    rule never fires on a value that was not measured.
    """
    out: dict[str, float] = {
        "activation_max_abs_shift": window.activations.max_abs_shift,
        "activation_mean_abs_shift": window.activations.mean_abs_shift,
        "activation_share_significant": window.activations.share_significant,
        "activation_max_abs_log_variance_ratio": window.activations.max_abs_log_variance_ratio,
        "entropy_mean": window.predictions.entropy_mean,
        "entropy_p90": window.predictions.entropy_p90,
        "max_prob_mean": window.predictions.max_prob_mean,
        "class_tvd": window.predictions.class_tvd,
        "class_chi2_p_value": window.predictions.class_chi2_p_value,
        "class_prior_tvd": window.predictions.class_prior_tvd,
        "online_mmd_statistic": window.online.statistic,
        "online_mmd_threshold": window.online.threshold,
        "online_mmd_alarm": 1.0 if window.online.alarm else 0.0,
    }
    if window.mmd is not None:
        out["mmd2"] = window.mmd.mmd2
        out["mmd_p_value"] = window.mmd.p_value
    if window.accuracy.accuracy_last_n is not None:
        out["accuracy"] = window.accuracy.accuracy_last_n
        out["accuracy_labels"] = float(window.accuracy.labels_last_n)
    if window.accuracy.accuracy_last_seconds is not None:
        out["accuracy_last_seconds"] = window.accuracy.accuracy_last_seconds
    if window.estimate is not None:
        out["estimated_accuracy"] = window.estimate.estimated_accuracy
        out["estimated_accuracy_lower"] = window.estimate.lower
        out["estimated_accuracy_upper"] = window.estimate.upper
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def label_signal_values(evaluation: LabelEvaluation) -> dict[str, float]:
    """The label-time signals (``LABEL_SIGNALS``) of one evaluation, as :func:`signal_values` names them."""
    acc = evaluation.accuracy
    out: dict[str, float] = {}
    if acc.accuracy_last_n is not None:
        out["accuracy"] = acc.accuracy_last_n
        out["accuracy_labels"] = float(acc.labels_last_n)
    if acc.accuracy_last_seconds is not None:
        out["accuracy_last_seconds"] = acc.accuracy_last_seconds
    return {k: float(v) for k, v in out.items() if math.isfinite(float(v))}


# Judged on label evaluations; every other signal is judged on feature windows.
LABEL_SIGNALS: tuple[str, ...] = ("accuracy", "accuracy_labels", "accuracy_last_seconds")

SIGNAL_NAMES: tuple[str, ...] = (
    "activation_max_abs_shift",
    "activation_mean_abs_shift",
    "activation_share_significant",
    "activation_max_abs_log_variance_ratio",
    "entropy_mean",
    "entropy_p90",
    "max_prob_mean",
    "class_tvd",
    "class_chi2_p_value",
    "class_prior_tvd",
    "online_mmd_statistic",
    "online_mmd_threshold",
    "online_mmd_alarm",
    "mmd2",
    "mmd_p_value",
    "accuracy",
    "accuracy_labels",
    "accuracy_last_seconds",
    "estimated_accuracy",
    "estimated_accuracy_lower",
    "estimated_accuracy_upper",
)
