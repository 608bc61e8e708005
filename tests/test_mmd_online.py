"""Sequential MMD detector: calibration matches the plain recipe, mini-batches give the per-row
statistics, state survives a restart, false alarms come at the rate ERT promises, and drift
is caught fast."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monitor.signals.bootstraps import required_bootstraps
from monitor.signals.kernels import gaussian_kernel, kernel_row_sums, median_bandwidth
from monitor.signals.online_band import kernel_band, window_offdiag
from monitor.signals.online_calibration import bootstrap_thresholds, extended_windows
from monitor.signals.online_mmd import OnlineMmd
from mmd_helpers import gaussian_rows, naive_mmd2, naive_online_thresholds, one_thread, prefix_sum_online, run_lengths

import torch


def _detector(seed: int = 0, rows: int = 300, dims: int = 4, window: int = 8, ert: float = 30.0) -> OnlineMmd:
    x = gaussian_rows(np.random.default_rng(seed), rows, dims)
    return OnlineMmd.calibrate(
        x, sigma=median_bandwidth(x), window_rows=window, ert_rows=ert, bootstraps=400, seed=seed
    )


@pytest.mark.parametrize("kept", [True, False], ids=["kernel-kept", "blocks-from-rows"])
def test_thresholds_match_the_plain_bootstrap_recipe(kept: bool) -> None:
    """Small references gather bootstrap blocks from the kept kernel; large ones (above
    DENSE_KERNEL_ROWS) compute them from the rows: both give alibi's recipe."""
    x = gaussian_rows(np.random.default_rng(1), 40, 3)
    sigma, window, ert = median_bandwidth(x), 4, 10.0
    xt = torch.from_numpy(x)
    k = gaussian_kernel(xt, xt, sigma, same=True)
    cols = k.sum(0, dtype=torch.float64) if kept else kernel_row_sums(xt, sigma)
    fast = bootstrap_thresholds(xt, sigma, cols, window, ert, 150, np.random.default_rng(5), kernel=k if kept else None)
    extended = np.concatenate(list(extended_windows(np.random.default_rng(5), 40, 150, 2 * window - 1)))
    np.testing.assert_allclose(fast, naive_online_thresholds(x, sigma, window, ert, extended), rtol=1e-5)


def test_extended_windows_are_distinct_rows_in_uniform_random_order() -> None:
    ext = np.concatenate(list(extended_windows(np.random.default_rng(0), 10, 4000, 5)))
    assert all(len(set(row)) == 5 for row in ext)
    # Every row index is equally likely at every position: 4000 / 10 = 400 each, sd ~19.
    counts = np.stack([np.bincount(ext[:, p], minlength=10) for p in range(5)])
    assert counts.min() > 300 and counts.max() < 500


def test_statistics_are_mmd2_of_sub_reference_against_the_sliding_window() -> None:
    det = _detector()
    state = det.state_dict()
    sub, init = state["sub_reference"], state["init_window"]
    y = gaussian_rows(np.random.default_rng(9), 20, 4, shift=1.0, shifted_dims=4)
    update = det.update(y)
    stream = np.concatenate([init, y])
    w = det.window_rows
    first_alarm = update.alarm_rows[0] if update.alarm_rows else len(y)
    for i in range(min(first_alarm + 1, len(y))):
        expected = naive_mmd2(sub, stream[i + 1:i + 1 + w], det.sigma)
        assert update.statistics[i] == pytest.approx(expected, rel=1e-5, abs=1e-8)
    assert update.thresholds[0] == det.thresholds[1]


@pytest.fixture(scope="module")
def row_by_row() -> tuple[np.ndarray, np.ndarray, list[int], OnlineMmd]:
    """A stream of null then drifted rows (several alarms and resets), fed one row at a time."""
    rng = np.random.default_rng(3)
    stream = np.concatenate([gaussian_rows(rng, 200, 4), gaussian_rows(rng, 200, 4, shift=1.5, shifted_dims=4)])
    det = _detector()
    with one_thread():
        single = [det.update(row[None]) for row in stream]
    alarms = [i for i, u in enumerate(single) if u.alarm_rows == [0]]
    return stream, np.array([u.statistics[0] for u in single]), alarms, det


@pytest.mark.parametrize("batch", [7, 64, 1000], ids=["rows-7", "rows-64", "rows-1000"])
def test_mini_batches_give_the_per_row_statistics_and_alarms(row_by_row, batch: int) -> None:
    stream, per_row, alarms_one, one = row_by_row
    many = _detector()
    stats, alarms = [], []
    for start in range(0, len(stream), batch):
        update = many.update(stream[start:start + batch])
        stats.append(update.statistics)
        alarms += [start + a for a in update.alarm_rows]
    # Kernel entries come from differently shaped float32 products; sums are float64.
    np.testing.assert_allclose(np.concatenate(stats), per_row, rtol=1e-5, atol=1e-9)
    assert alarms == alarms_one and len(alarms) >= 3
    got, want = many.status(since_last=False), one.status(since_last=False)
    assert got.statistic == pytest.approx(want.statistic, rel=1e-5)
    assert (got.alarm, got.alarms_total, got.rows_since_reset, got.run_length_rows) == (
        want.alarm, want.alarms_total, want.rows_since_reset, want.run_length_rows
    )


def _feed(det: OnlineMmd, stream: np.ndarray, sizes: list[int]) -> tuple[np.ndarray, list[int]]:
    """Feed ``stream`` in batches cycling through ``sizes``; (statistics, alarm rows)."""
    stats, alarms, start, i = [], [], 0, 0
    while start < len(stream):
        update = det.update(stream[start:start + sizes[i % len(sizes)]])
        stats.append(update.statistics)
        alarms += [start + a for a in update.alarm_rows]
        start, i = start + len(update.statistics), i + 1
    return np.concatenate(stats), alarms


def test_banded_recurrence_equals_the_prefix_sum_statistics_over_a_long_stream_with_restarts() -> None:
    det = _detector(seed=5)
    # One threshold between null (max ~0.2 here) and shifted (median ~0.5) statistics: null stretches
    # run past the 4096-row anchor without alarms, the shifted stretch alarms and restarts often.
    state = {**det.state_dict(), "thresholds": np.full(len(det.thresholds), 0.3)}
    rng = np.random.default_rng(11)
    stream = np.concatenate(
        [gaussian_rows(rng, 5000, 4), gaussian_rows(rng, 300, 4, shift=1.5, shifted_dims=4), gaussian_rows(rng, 5000, 4)]
    )
    want, want_alarms = prefix_sum_online(state, stream)
    with one_thread():
        got, alarms = _feed(OnlineMmd.from_state_dict(state), stream, [1, 37, 500, 4100, 999])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    assert alarms == want_alarms and len(alarms) >= 10
    assert alarms[0] > 4096 and len(stream) - alarms[-1] > 4096


def test_window_kernel_sum_does_not_drift_over_100k_rows() -> None:
    det = _detector(seed=3)
    # A narrow kernel spreads values over many magnitudes, so float64 sums round at every step.
    state = {**det.state_dict(), "thresholds": np.full(len(det.thresholds), np.inf), "sigma": det.sigma / 3}
    narrow = OnlineMmd.from_state_dict(state)
    rng = np.random.default_rng(12)
    sizes = [997, 1, 3000] * 25 + [50]
    with one_thread():
        for size in sizes:
            narrow.update(gaussian_rows(rng, size, 4))
    window = torch.from_numpy(narrow.state_dict()["window"])
    direct = window_offdiag(kernel_band(window, narrow.window_rows, narrow.sigma), 0, narrow.window_rows)
    assert narrow.rows_total == sum(sizes) == 100_000 and narrow.t == narrow.rows_total
    assert narrow.state_dict()["window_offdiag"] == pytest.approx(direct, rel=1e-9)
    # and the same sum from the plain kernel (other float32 products: ~1e-7 apart)
    plain = float(gaussian_kernel(window, window, narrow.sigma, same=True).sum(dtype=torch.float64)) - narrow.window_rows
    assert direct == pytest.approx(plain, rel=1e-6)


def test_state_round_trip_continues_exactly(tmp_path) -> None:
    rng = np.random.default_rng(4)
    stream = gaussian_rows(rng, 250, 4, shift=0.8, shifted_dims=2)
    straight, stopped = _detector(seed=2), _detector(seed=2)
    expected = straight.update(stream)
    first = stopped.update(stream[:150])
    np.savez(tmp_path / "online.npz", **stopped.state_dict())
    with np.load(tmp_path / "online.npz", allow_pickle=False) as data:
        restored = OnlineMmd.from_state_dict(dict(data))
    rest = restored.update(stream[150:])
    np.testing.assert_array_equal(np.concatenate([first.statistics, rest.statistics]), expected.statistics)
    assert first.alarm_rows + [150 + a for a in rest.alarm_rows] == expected.alarm_rows
    assert restored.status() == straight.status()


def test_null_stream_false_alarms_arrive_at_the_expected_run_time() -> None:
    # ERT = 50, window 10, 1000-row reference: collect 100 run lengths on fresh null rows.
    rng = np.random.default_rng(6)
    x = gaussian_rows(rng, 1000, 4)
    det = OnlineMmd.calibrate(x, sigma=median_bandwidth(x), window_rows=10, ert_rows=50, bootstraps=1000, seed=6)
    alarms: list[int] = []
    seen = 0
    with one_thread():
        while len(alarms) < 100:
            alarms += [seen + a for a in det.update(gaussian_rows(rng, 1000, 4)).alarm_rows]
            seen += 1000
    mean_run = float(np.mean(run_lengths(alarms)[:100]))
    # Run lengths are ~geometric: the mean of 100 has a relative sd of ~10%. The thresholds
    # are 98% quantiles of 1000 bootstraps (fpr estimate sd ~22% relative) taken on the same
    # finite reference, so the realised ERT varies across references by about as much
    # (ERT 35-53 over six seeds). A factor of 2 either way is > 3 sd of both combined.
    assert 25 <= mean_run <= 100, mean_run
    assert det.status().alarms_total == len(alarms)


def test_drifted_stream_alarms_within_a_few_windows() -> None:
    det = _detector(seed=7, window=10, ert=100.0)
    update = det.update(gaussian_rows(np.random.default_rng(8), 100, 4, shift=1.0, shifted_dims=4))
    assert update.alarm_rows and update.alarm_rows[0] < 30
    status = det.status()
    assert status.alarm and status.run_length_rows == update.alarm_rows[-1] - (
        update.alarm_rows[-2] if len(update.alarm_rows) > 1 else -1
    )


def test_status_reports_what_happened_since_the_previous_call() -> None:
    det = _detector(seed=1, ert=100.0)
    fresh = det.status()
    assert math.isnan(fresh.statistic) and not fresh.alarm and fresh.rows_since_reset == 0
    det.update(gaussian_rows(np.random.default_rng(2), 40, 4, shift=3.0, shifted_dims=4))
    peek = det.status(since_last=False)
    seen = det.status()
    assert peek == seen and seen.alarm and seen.run_length_rows is not None
    det.update(gaussian_rows(np.random.default_rng(3), 1, 4))
    quiet = det.status()
    assert quiet.alarms_total == seen.alarms_total or quiet.alarm
    assert quiet.rows_since_reset == (0 if quiet.alarm else seen.rows_since_reset + 1)


def test_required_bootstraps_is_the_exact_minimum_calibration_accepts() -> None:
    x = gaussian_rows(np.random.default_rng(0), 60, 3)
    need = required_bootstraps(20.0, 5)
    assert 20 < need < 40
    OnlineMmd.calibrate(x, sigma=1.0, window_rows=5, ert_rows=20, bootstraps=need, seed=0)
    with pytest.raises(ValueError, match=f"set bootstraps >= {need}"):
        OnlineMmd.calibrate(x, sigma=1.0, window_rows=5, ert_rows=20, bootstraps=need - 1, seed=0)


def test_bad_calibration_requests_and_rows_are_rejected() -> None:
    x = gaussian_rows(np.random.default_rng(0), 50, 3)
    with pytest.raises(ValueError, match="more than 2 x window_rows"):
        OnlineMmd.calibrate(x, sigma=1.0, window_rows=25, ert_rows=10, bootstraps=100, seed=0)
    with pytest.raises(ValueError, match="cannot estimate"):
        OnlineMmd.calibrate(x, sigma=1.0, window_rows=5, ert_rows=1000, bootstraps=100, seed=0)
    with pytest.raises(ValueError, match="ert_rows must be finite and > 1"):
        OnlineMmd.calibrate(x, sigma=1.0, window_rows=5, ert_rows=1, bootstraps=100, seed=0)
    det = _detector()
    with pytest.raises(ValueError, match="expected 4 feature columns"):
        det.update(np.zeros((3, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="newer driftd"):
        OnlineMmd.from_state_dict({**det.state_dict(), "version": 99})
    with pytest.raises(ValueError, match="older driftd"):
        OnlineMmd.from_state_dict({**det.state_dict(), "version": 1})
    without_stride = {k: v for k, v in det.state_dict().items() if k != "stride"}
    with pytest.raises(ValueError, match=r"missing key\(s\) \['stride'\]"):
        OnlineMmd.from_state_dict(without_stride)
    with pytest.raises(ValueError, match="missing key"):
        OnlineMmd.from_state_dict({"sigma": 1.0})
