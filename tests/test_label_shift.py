"""The predicted-class shift test holds its level on undrifted windows; prior shifts are found and estimated."""

from __future__ import annotations

import numpy as np
import pytest

from engine_helpers import make_rows
from monitor.signals.label_shift import class_count_test, estimate_class_prior, total_variation
from monitor.signals.predictions import prediction_stats


@pytest.fixture(scope="module")
def stream() -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes and labels of a real (synthetic linear) model on 60k undrifted rows."""
    rows = make_rows(60_000, seed=41)
    return rows.probs.argmax(1), rows.label


def _counts(pred: np.ndarray, idx: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(pred[idx], minlength=classes)


def test_two_sample_test_holds_its_level_over_undrifted_windows(stream):
    # Each window against a 300-row reference drawn from the same stream: the reference is a
    # sample too, which the old one-sample test ignored (13 of 16 clean windows at p < 0.01).
    # The issue asks for <= 0.07 over 500 windows; 1000 keep the binomial noise (sd 0.007 at a
    # true 0.05) from deciding the outcome (500 windows ranged 0.040-0.066 over six seeds).
    pred, _ = stream
    rng = np.random.default_rng(0)
    p_values, methods = [], set()
    for _ in range(1000):
        idx = rng.choice(pred.size, size=300 + 200, replace=False)
        test = class_count_test(_counts(pred, idx[:300], 4), _counts(pred, idx[300:], 4), rng=rng)
        p_values.append(test.p_value)
        methods.add(test.method)
    rate = np.mean(np.array(p_values) < 0.05)
    assert rate <= 0.07, rate
    assert rate >= 0.02  # not a test that cannot fire
    assert methods == {"chi2"}


def test_exact_test_for_small_expected_counts_holds_its_level():
    # 12 classes, some rare: expected counts below 5, where chi-square is unreliable.
    prior = np.array([0.3, 0.2, 0.12, 0.1, 0.08, 0.06, 0.05, 0.03, 0.02, 0.02, 0.01, 0.01])
    rng = np.random.default_rng(1)
    # 1000 tables: 1500 gave 0.050-0.054 over three seeds; 300 are too few to tell 0.05 from 0.07.
    results = [class_count_test(rng.multinomial(60, prior), rng.multinomial(40, prior), rng=rng) for _ in range(1000)]
    assert {r.method for r in results} == {"exact"}
    rate = np.mean([r.p_value < 0.05 for r in results])
    assert rate <= 0.07, rate


def test_a_prior_shift_is_detected(stream):
    pred, label = stream
    rng = np.random.default_rng(2)
    # Resample classes: class 0 three times as frequent as the others (the images are unchanged).
    weight = np.where(label == 0, 1.0, 1 / 3)
    detected = 0
    for _ in range(50):
        ref = rng.choice(pred.size, size=300, replace=False)
        win = rng.choice(pred.size, size=200, replace=False, p=weight / weight.sum())
        detected += class_count_test(_counts(pred, ref, 4), _counts(pred, win, 4), rng=rng).p_value < 0.05
    assert detected >= 45


def test_bbsd_prior_follows_a_label_shift_and_stays_put_without_one(stream):
    pred, label = stream
    ref, rest = np.arange(20_000), np.arange(20_000, pred.size)
    confusion = np.zeros((4, 4), dtype=np.int64)
    np.add.at(confusion, (pred[ref], label[ref]), 1)
    reference_prior = confusion.sum(0) / confusion.sum()
    rng = np.random.default_rng(3)
    same = rng.choice(rest, size=2000, replace=False)
    target = np.array([0.55, 0.25, 0.15, 0.05])
    shifted = np.concatenate([rng.choice(rest[label[rest] == c], size=int(2000 * t), replace=False)
                              for c, t in enumerate(target)])
    est_same = estimate_class_prior(confusion, np.bincount(pred[same], minlength=4))
    est_shift = estimate_class_prior(confusion, np.bincount(pred[shifted], minlength=4))
    assert total_variation(est_same, reference_prior) < 0.03
    assert total_variation(est_shift, target) < 0.03
    # Seen through the predictions the shift looks smaller: the model confuses some classes.
    naive = np.bincount(pred[shifted], minlength=4) / shifted.size
    assert total_variation(est_shift, target) < total_variation(naive, target)


def test_prediction_stats_report_the_test_and_the_prior():
    ref = np.array([100, 100, 100, 100])
    confusion = np.diag([90, 90, 90, 90]) + 10 // 3
    stats = prediction_stats(entropy=np.full(200, 0.2), max_prob=np.full(200, 0.9),
                             class_counts=np.array([140, 20, 20, 20]), ref_class_counts=ref,
                             confusion=confusion, rng=np.random.default_rng(0))
    assert stats.class_test == "chi2" and stats.class_chi2_p_value < 1e-10
    assert stats.class_prior is not None and stats.class_prior[0] > 0.7
    assert stats.class_prior_tvd == pytest.approx(total_variation(stats.class_prior, np.full(4, 0.25)))
    unlabelled = prediction_stats(entropy=np.full(4, 0.2), max_prob=np.full(4, 0.9), class_counts=np.array([1, 1, 1, 1]),
                                  ref_class_counts=ref, rng=np.random.default_rng(0))
    assert unlabelled.class_prior is None and unlabelled.class_test == "exact"


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="one length"):
        class_count_test(np.ones(3, dtype=int), np.ones(4, dtype=int), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="non-negative"):
        class_count_test(np.array([1, -1]), np.array([1, 1]), rng=np.random.default_rng(0))
