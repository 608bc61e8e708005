"""Batch MMD permutation test: exact against a naive implementation, calibrated under the null,
powerful under a shift, and strict about its inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from monitor.signals.kernels import median_bandwidth
from monitor.signals.mmd import (
    DRAWS_IN_ROTATION,
    PermutationPlan,
    PermutationSchedule,
    mmd_test,
    permuted_mmd2,
)
from monitor.signals.mmd_reference import MmdReference
from mmd_helpers import gaussian_rows, naive_mmd2, naive_permuted_mmd2, one_thread


def fresh_test(ref: MmdReference, y: np.ndarray, permutations: int, rng: np.random.Generator):
    """The test with a freshly drawn plan (as with redraw_permutations_every: 1)."""
    return mmd_test(ref, y, plan=PermutationPlan.draw(ref, len(y), permutations, rng))


@pytest.mark.parametrize(
    ("m", "n", "dims", "shift"),
    [(300, 60, 16, 0.5), (40, 200, 8, 1.0), (2, 2, 3, 2.0), (120, 5, 32, 0.0)],
    ids=["ref-larger", "window-larger", "two-rows-each", "null-tiny-window"],
)
def test_mmd2_matches_naive_pooled_computation(m: int, n: int, dims: int, shift: float) -> None:
    rng = np.random.default_rng(m * 1000 + n)
    x = gaussian_rows(rng, m, dims)
    y = gaussian_rows(rng, n, dims, shift=shift, shifted_dims=2)
    sigma = median_bandwidth(x)
    result = fresh_test(MmdReference.build(x, sigma), y, 20, np.random.default_rng(0))
    expected = naive_mmd2(x, y, sigma)
    # A null MMD^2 can sit arbitrarily close to 0, so an absolute floor too: float32 kernel
    # entries carry ~6e-8 relative rounding, and a 5-row window averages only 20 of them.
    assert result.mmd2 == pytest.approx(expected, rel=1e-6, abs=2e-8)
    assert (result.window_rows, result.reference_rows, result.bandwidth) == (n, m, sigma)


def test_permuted_statistics_match_naive_on_the_same_permutations() -> None:
    rng = np.random.default_rng(7)
    x, y = gaussian_rows(rng, 150, 12), gaussian_rows(rng, 40, 12, shift=0.3, shifted_dims=3)
    sigma = median_bandwidth(x)
    perm_rng = np.random.default_rng(3)
    window_sets = np.stack([perm_rng.permutation(190)[150:] for _ in range(12)])
    window_sets[0] = np.arange(150, 190)  # identity: the observed statistic
    window_sets[1] = np.arange(40)  # only reference rows in the window
    fast = permuted_mmd2(MmdReference.build(x, sigma), y, window_sets)
    naive = naive_permuted_mmd2(x, y, sigma, window_sets)
    # Null-size statistics are ~1e-3; float32 kernels give ~1e-9 absolute error.
    np.testing.assert_allclose(fast, naive, rtol=1e-5, atol=1e-8)


def test_median_bandwidth_is_median_euclidean_distance() -> None:
    x = gaussian_rows(np.random.default_rng(1), 50, 4).astype(np.float64)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    assert median_bandwidth(x) == pytest.approx(np.median(d[np.triu_indices(50, 1)]), rel=1e-6)
    # Subsampling is seeded, so the reference build is reproducible.
    big = gaussian_rows(np.random.default_rng(2), 400, 4)
    assert median_bandwidth(big, max_rows=100, seed=5) == median_bandwidth(big, max_rows=100, seed=5)


def test_null_p_values_are_uniform_and_never_zero() -> None:
    rng = np.random.default_rng(11)
    p_values = []
    with one_thread():
        for _ in range(200):
            x = gaussian_rows(rng, 120, 6)
            ref = MmdReference.build(x, median_bandwidth(x))
            p_values.append(fresh_test(ref, gaussian_rows(rng, 30, 6), 99, rng).p_value)
    p = np.array(p_values)
    assert p.min() >= 0.01  # (1 + k) / (1 + B) with B = 99
    assert stats.kstest(p, "uniform").pvalue > 0.01
    # P(p <= 0.05) is exactly 5/100 under the null; 200 windows -> Binomial(200, 0.05), mean 10,
    # sd 3.1. [2, 21] holds it with probability > 0.998.
    assert 2 <= int((p <= 0.05).sum()) <= 21


def test_mean_shift_of_half_an_sd_in_a_few_dims_is_detected() -> None:
    rng = np.random.default_rng(5)
    x = gaussian_rows(rng, 500, 32)
    ref = MmdReference.build(x, median_bandwidth(x))
    detected = [
        fresh_test(ref, gaussian_rows(rng, 200, 32, shift=0.5, shifted_dims=4), 100, rng).p_value
        < 0.05
        for _ in range(5)
    ]
    assert all(detected)


def test_an_extreme_shift_gets_the_smallest_p_value_not_zero() -> None:
    rng = np.random.default_rng(9)
    x = gaussian_rows(rng, 100, 5)
    result = fresh_test(MmdReference.build(x, 2.0), x[:20] + 50.0, 49, rng)
    assert result.p_value == pytest.approx(1 / 50)
    assert result.permutations == 49


def test_reference_round_trips_through_plain_arrays(tmp_path) -> None:
    rng = np.random.default_rng(4)
    x, y = gaussian_rows(rng, 80, 6), gaussian_rows(rng, 25, 6, shift=0.4, shifted_dims=2)
    ref = MmdReference.build(x, median_bandwidth(x))
    np.savez(tmp_path / "ref.npz", **ref.to_arrays())
    with np.load(tmp_path / "ref.npz", allow_pickle=False) as data:
        loaded = MmdReference.from_arrays(dict(data))
    first = fresh_test(ref, y, 30, np.random.default_rng(1))
    again = fresh_test(loaded, y, 30, np.random.default_rng(1))
    assert first == again


@pytest.mark.parametrize(
    ("window", "message"),
    [
        (np.zeros((10,), dtype=np.float32), "2-D"),
        (np.zeros((1, 4), dtype=np.float32), "at least 2 rows"),
        (np.zeros((10, 5), dtype=np.float32), "expected 4 feature columns"),
        (np.where(np.arange(40).reshape(10, 4) == 13, np.nan, 0.0), "row 3, column 1"),
        (np.array([["a"] * 4] * 3), "numeric"),
    ],
    ids=["one-dimensional", "single-row", "wrong-dims", "nan", "strings"],
)
def test_bad_windows_are_rejected_with_the_fault_named(window: np.ndarray, message: str) -> None:
    ref = MmdReference.build(gaussian_rows(np.random.default_rng(0), 20, 4), 1.0)
    with pytest.raises(ValueError, match=message):
        fresh_test(ref, window, 10, np.random.default_rng(0))


def test_bad_reference_bandwidth_and_permutations_are_rejected() -> None:
    x = gaussian_rows(np.random.default_rng(0), 20, 4)
    with pytest.raises(ValueError, match="sigma"):
        MmdReference.build(x, 0.0)
    with pytest.raises(ValueError, match="identical"):
        median_bandwidth(np.ones((10, 3)))
    with pytest.raises(ValueError, match="permutations"):
        fresh_test(MmdReference.build(x, 1.0), x, 0, np.random.default_rng(0))
    ref = MmdReference.build(x, 1.0)
    with pytest.raises(ValueError, match="plan is for 10 window rows"):
        mmd_test(ref, x[:12], plan=PermutationPlan.draw(ref, 10, 5, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="redraw_every"):
        PermutationSchedule(ref, permutations=5, redraw_every=0, seed=0)
    with pytest.raises(ValueError, match="missing key"):
        MmdReference.from_arrays({"x_ref": x})


def test_one_draw_reused_over_many_null_windows_keeps_p_values_uniform() -> None:
    """The daemon reuses a draw of permutations for a run of windows. Held FIXED over 300
    independent null (reference, window) pairs, one draw still gives uniform p-values: the
    draw never depends on the rows it is used on. (With the reference held fixed too, p-values
    are not exactly uniform whether or not the draw is reused: a fixed reference sample is
    itself one draw; bench/README.md.)"""
    m, n = 200, 40
    sets = np.random.default_rng(3).random((99, m + n)).argpartition(m, axis=1)[:, m:]
    rng = np.random.default_rng(21)
    p_values = []
    with one_thread():
        for _ in range(300):
            x = gaussian_rows(rng, m, 6)
            ref = MmdReference.build(x, median_bandwidth(x))
            plan = PermutationPlan.from_window_sets(ref, sets)
            p_values.append(mmd_test(ref, gaussian_rows(rng, n, 6), plan=plan).p_value)
    p = np.array(p_values)
    assert stats.kstest(p, "uniform").pvalue > 0.01
    # Binomial(300, 0.05): mean 15, sd 3.8; [4, 29] holds it with probability > 0.999.
    assert 4 <= int((p <= 0.05).sum()) <= 29


def test_schedule_rotates_draws_replaces_each_after_n_uses_and_survives_a_restart() -> None:
    x = gaussian_rows(np.random.default_rng(2), 60, 4)
    ref = MmdReference.build(x, median_bandwidth(x))
    schedule = PermutationSchedule(ref, permutations=20, redraw_every=3, seed=7)
    rotation = DRAWS_IN_ROTATION
    plans = [schedule.for_window(i, 30) for i in range(3 * rotation + 1)]
    # adjacent windows (fewer than the rotation apart) never share a draw...
    for i in range(len(plans)):
        for j in range(i + 1, min(i + rotation, len(plans))):
            assert not torch.equal(plans[i].lhs, plans[j].lhs)
    # ...each draw serves redraw_every windows, one rotation apart, then is replaced
    assert plans[0] is plans[rotation] is plans[2 * rotation]
    assert not torch.equal(plans[3 * rotation].lhs, plans[0].lhs)
    assert schedule.for_window(7, 12).window_rows == 12  # a short window gets its own draw
    # A restarted daemon (a new schedule) recomputes the very same permutations for a window.
    restarted = PermutationSchedule(ref, permutations=20, redraw_every=3, seed=7)
    assert torch.equal(restarted.for_window(rotation + 5, 30).lhs, plans[5].lhs)
    assert torch.equal(restarted.for_window(rotation + 5, 30).ss, plans[5].ss)


def test_bad_window_sets_and_a_plan_for_another_reference_are_rejected() -> None:
    rng = np.random.default_rng(3)
    x = gaussian_rows(rng, 20, 4)
    ref, other = MmdReference.build(x, 1.0), MmdReference.build(x, 1.0)
    with pytest.raises(ValueError, match="in \\[0, 25\\)"):
        PermutationPlan.from_window_sets(ref, np.array([[0, 25, 3, 4, 5]]))
    with pytest.raises(ValueError, match="repeats an index"):
        PermutationPlan.from_window_sets(ref, np.array([[0, 1, 1, 4, 5]]))
    with pytest.raises(ValueError, match="another reference"):
        mmd_test(ref, gaussian_rows(rng, 5, 4), plan=PermutationPlan.draw(other, 5, 9, rng))


def test_a_permutation_that_keeps_the_window_ties_and_counts_as_exceeding() -> None:
    """Tiny windows often draw the identity grouping; its statistic ties the observed one but is
    summed along another float path, so it must still count (ties are exceedances)."""
    rng = np.random.default_rng(8)
    x, y = gaussian_rows(rng, 30, 5), gaussian_rows(rng, 6, 5, shift=3.0, shifted_dims=5)
    ref = MmdReference.build(x, median_bandwidth(x))
    # 9 groupings of reference rows only (far below the shifted window's statistic) + 3 identities
    sets = np.vstack([np.tile(np.arange(6), (9, 1)) + np.arange(9)[:, None] * 2, np.tile(np.arange(30, 36), (3, 1))])
    assert mmd_test(ref, y, plan=PermutationPlan.from_window_sets(ref, sets)).p_value == pytest.approx(4 / 13)


def test_windows_of_any_size_in_any_order_match_the_naive_value() -> None:
    """A reference keeps scratch rows between windows (grown for a larger one): sizes that
    shrink and grow must not leak rows of an earlier window into the next."""
    rng = np.random.default_rng(12)
    x = gaussian_rows(rng, 80, 6)
    sigma = median_bandwidth(x)
    ref = MmdReference.build(x, sigma)
    for rows in (30, 60, 12, 60, 31):
        y = gaussian_rows(rng, rows, 6, shift=0.3, shifted_dims=2)
        assert fresh_test(ref, y, 5, rng).mmd2 == pytest.approx(naive_mmd2(x, y, sigma), rel=1e-6, abs=2e-8)
