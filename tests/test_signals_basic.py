"""Activation shifts, prediction statistics, the confidence calibrator and delayed-label accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.signals.accuracy import AccuracyTracker
from monitor.signals.activations import activation_stats, benjamini_hochberg
from monitor.signals.estimate import fit_calibrator
from monitor.signals.predictions import normalised_entropy, prediction_stats


def _stats(x: np.ndarray, ref: np.ndarray, **kw):
    return activation_stats(
        window_sum=x.sum(0),
        window_sumsq=(x * x).sum(0),
        window_rows=x.shape[0],
        ref_mean=ref.mean(0),
        ref_var=ref.var(0, ddof=1),
        ref_rows=ref.shape[0],
        alpha=kw.get("alpha", 0.05),
        top_k=kw.get("top_k", 3),
    )


def test_activation_shift_is_found_in_the_shifted_dims_only():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(5000, 64))
    window = rng.normal(size=(500, 64))
    window[:, [3, 17]] += 0.5  # half a standard deviation in two dims
    s = _stats(window, ref)
    assert {d.dim for d in s.top_dims[:2]} == {3, 17}
    assert s.max_abs_shift > 8  # ~0.5 / sqrt(1/5000 + 1/500) = 10.7
    assert s.share_significant == pytest.approx(2 / 64, abs=1 / 64)


def test_activation_null_window_has_few_discoveries():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(5000, 256))
    shares = [_stats(rng.normal(size=(300, 256)), ref).share_significant for _ in range(20)]
    assert np.mean(shares) < 0.01


def test_variance_ratio_catches_a_scale_change_without_a_mean_shift():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(4000, 8))
    window = rng.normal(size=(400, 8))
    window[:, 5] *= 3.0
    s = _stats(window, ref)
    assert s.max_abs_log_variance_ratio == pytest.approx(np.log(9.0), rel=0.2)


def test_dead_dimensions_do_not_produce_infinities():
    ref = np.zeros((100, 4))
    ref[:, 0] = np.random.default_rng(3).normal(size=100)
    window = np.zeros((50, 4))
    window[:, 0] = np.random.default_rng(4).normal(size=50)
    s = _stats(window, ref)
    assert np.isfinite(s.max_abs_shift) and s.share_significant == 0.0


def test_benjamini_hochberg_matches_the_textbook_example():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.2])
    # sorted 0.005,0.01,0.03,0.04,0.2 vs 0.01,0.02,0.03,0.04,0.05 -> first four are discoveries
    assert benjamini_hochberg(p, 0.05).tolist() == [True, True, True, True, False]


def test_entropy_is_normalised_and_class_shift_detected():
    uniform = np.full((10, 4), 0.25)
    certain = np.eye(4)[np.arange(10) % 4]
    assert normalised_entropy(uniform) == pytest.approx(np.ones(10))
    assert normalised_entropy(certain) == pytest.approx(np.zeros(10), abs=1e-9)
    ref_counts = np.array([250, 250, 250, 250])
    same = prediction_stats(
        entropy=np.full(400, 0.3), max_prob=np.full(400, 0.8), class_counts=np.array([100, 100, 100, 100]),
        ref_class_counts=ref_counts, rng=np.random.default_rng(0),
    )
    shifted = prediction_stats(
        entropy=np.full(400, 0.3), max_prob=np.full(400, 0.8), class_counts=np.array([250, 50, 50, 50]),
        ref_class_counts=ref_counts, rng=np.random.default_rng(0),
    )
    assert same.class_tvd == pytest.approx(0.0) and same.class_chi2_p_value > 0.5
    assert shifted.class_tvd == pytest.approx(0.375) and shifted.class_chi2_p_value < 1e-10


def test_calibrator_recovers_accuracy_of_an_overconfident_model():
    rng = np.random.default_rng(5)
    conf = rng.uniform(0.5, 1.0, size=20000)
    true_p = 0.5 + (conf - 0.5) * 0.6  # the model is overconfident
    correct = rng.random(conf.size) < true_p
    cal = fit_calibrator(conf, correct)
    assert np.all(np.diff(cal.y) >= 0)
    test_conf = rng.uniform(0.5, 1.0, size=5000)
    estimated = cal(test_conf).mean()
    assert estimated == pytest.approx((0.5 + (test_conf - 0.5) * 0.6).mean(), abs=0.01)
    assert test_conf.mean() - estimated > 0.05  # raw confidence would overestimate


def test_calibrator_rejects_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        fit_calibrator(np.ones(3), np.ones(4))


def test_accuracy_tracker_last_n_last_seconds_recall_and_delay():
    t = AccuracyTracker(last_n=4, last_seconds=100.0)
    t.observe_predictions(1000.0)
    t.add(
        timestamp=np.array([800.0, 950.0, 960.0, 970.0, 990.0]),
        delay=np.array([10.0, 20.0, 30.0, 40.0, 50.0]),
        prediction=np.array([0, 1, 1, 0, 1]),
        label=np.array([0, 1, 0, 0, 0]),
    )
    s = t.stats()
    assert s.labels_last_n == 4 and s.accuracy_last_n == pytest.approx(0.5)  # last four: hit, miss, hit, miss
    assert s.labels_last_seconds == 4 and s.accuracy_last_seconds == pytest.approx(0.5)
    assert s.per_class_recall == {0: pytest.approx(1 / 3), 1: 1.0}
    assert s.label_delay_p50_seconds == pytest.approx(35.0)
    restored = AccuracyTracker(last_n=4, last_seconds=100.0)
    restored.load_state_dict(t.state_dict())
    assert restored.stats() == s


def test_accuracy_tracker_before_any_label_reports_none():
    s = AccuracyTracker(last_n=10, last_seconds=60).stats()
    assert s.accuracy_last_n is None and s.labels_last_n == 0 and s.label_delay_p50_seconds is None
