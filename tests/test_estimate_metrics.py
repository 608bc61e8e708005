"""What Prometheus and the rule engine see of the estimate: the interval, the method in force, the prior."""

from __future__ import annotations

import dataclasses
import math

import pytest
from prometheus_client import CollectorRegistry

from daemon_helpers import make_window
from monitor.service.metrics import Metrics, MetricsSnapshot
from monitor.signals.results import SIGNAL_NAMES, EstimateStats, signal_values


def _window():
    w = make_window("v1", estimated_accuracy=0.7)
    estimate = EstimateStats(estimated_accuracy=0.7, reference_accuracy=0.94, lower=0.66, upper=0.74, method="cott",
                             typical_share=0.3, target_shift=0.05)
    predictions = dataclasses.replace(w.predictions, class_prior=(0.6, 0.4), class_prior_tvd=0.1)
    return dataclasses.replace(w, estimate=estimate, predictions=predictions)


def test_gauges_for_the_interval_the_method_and_the_prior():
    snapshot = MetricsSnapshot(model="digits", model_versions=("v1", "v2"), windows={"v1": _window()})
    registry = CollectorRegistry()
    Metrics(snapshot.model, registry, lambda: snapshot)
    v = registry.get_sample_value
    m = {"model": "digits", "model_version": "v1"}
    assert v("driftd_estimated_accuracy", m) == pytest.approx(0.7)
    assert v("driftd_estimated_accuracy_lower", m) == pytest.approx(0.66)
    assert v("driftd_estimated_accuracy_upper", m) == pytest.approx(0.74)
    assert v("driftd_estimate_method_info", {**m, "method": "cott"}) == 1
    assert v("driftd_estimate_method_info", {**m, "method": "cbpe"}) is None
    assert v("driftd_estimated_class_prior_tvd", m) == pytest.approx(0.1)
    # A version without a window yet: the gauges exist, not measured.
    assert math.isnan(v("driftd_estimated_accuracy_upper", {"model": "digits", "model_version": "v2"}))


def test_rules_can_use_the_bounds_and_the_prior():
    values = signal_values(_window())
    assert values["estimated_accuracy_lower"] == 0.66 and values["estimated_accuracy_upper"] == 0.74
    assert values["class_prior_tvd"] == 0.1
    assert {"estimated_accuracy_lower", "estimated_accuracy_upper", "class_prior_tvd"} <= set(SIGNAL_NAMES)
    # A window restored from a checkpoint written before the interval existed: no bounds, no rule fires on them.
    old = dataclasses.replace(_window(), estimate=EstimateStats(0.7, 0.94))
    assert "estimated_accuracy_upper" not in signal_values(old) and old.estimate.method == "cbpe"
