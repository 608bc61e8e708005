"""Shared helpers for the daemon tests: typed fake windows for unit tests, and a real daemon process."""

from __future__ import annotations

import socket

from monitor.signals.results import (
    AccuracyStats,
    ActivationStats,
    DimShift,
    EstimateStats,
    MmdResult,
    OnlineMmdStatus,
    PredictionStats,
    WindowSignals,
)


def make_window(
    model_version: str = "v1",
    *,
    index: int = 0,
    rows: int = 500,
    mmd_p_value: float | None = 0.5,
    accuracy: float | None = None,
    labels: int = 0,
    estimated_accuracy: float | None = None,
    online_alarm: bool = False,
    max_abs_shift: float = 1.0,
) -> WindowSignals:
    """A WindowSignals with plausible values; override the ones a test is about."""
    return WindowSignals(
        model_version=model_version,
        index=index,
        start_time=1_700_000_000.0 + 60 * index,
        end_time=1_700_000_059.0 + 60 * index,
        rows=rows,
        activations=ActivationStats(
            max_abs_shift=max_abs_shift, mean_abs_shift=0.5, share_significant=0.0,
            max_abs_log_variance_ratio=0.1, mean_variance_ratio=1.0,
            top_dims=(DimShift(7, max_abs_shift, 1.1), DimShift(3, -0.8, 0.9)),
        ),
        predictions=PredictionStats(
            entropy_mean=0.3, entropy_p50=0.25, entropy_p90=0.6, max_prob_mean=0.8, max_prob_p10=0.5,
            max_prob_p50=0.85, class_tvd=0.05, class_chi2_p_value=0.4, class_share=(0.5, 0.5),
        ),
        mmd=None if mmd_p_value is None else MmdResult(0.001, mmd_p_value, 100, rows, 1000, 1.5),
        online=OnlineMmdStatus(0.01, 0.05, online_alarm, 1 if online_alarm else 0, rows, rows if online_alarm else None),
        accuracy=AccuracyStats(
            accuracy_last_n=accuracy, labels_last_n=labels, accuracy_last_seconds=accuracy,
            labels_last_seconds=labels, per_class_recall={}, label_delay_p50_seconds=None, label_delay_p90_seconds=None,
        ),
        estimate=None if estimated_accuracy is None else EstimateStats(estimated_accuracy, 0.9),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
