"""Online MMD tested every ``stride_rows`` rows: what makes a production-sized ERT calibratable."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.signals.bootstraps import required_bootstraps
from monitor.signals.kernels import median_bandwidth
from monitor.signals.online_mmd import OnlineMmd


def _rows(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    x = rng.normal(size=(n, 4)).astype(np.float32)
    x[:, 0] += shift
    return x


def test_stride_divides_the_bootstraps_needed():
    assert required_bootstraps(100_000, 100, 100) < 1_100
    assert required_bootstraps(100_000, 100, 1) > 100_000
    assert required_bootstraps(50, 10, 1) == required_bootstraps(50, 10)


def test_alarms_only_on_tested_rows_and_state_keeps_the_stride():
    rng = np.random.default_rng(0)
    x = _rows(rng, 600)
    det = OnlineMmd.calibrate(x, sigma=median_bandwidth(x), window_rows=20, ert_rows=400, bootstraps=600,
                              seed=1, stride_rows=5)
    shifted = _rows(rng, 400, shift=2.0)
    update = det.update(shifted)
    assert update.alarm_rows, "a 2-sd shift must alarm"
    # rows since restart at each alarm are multiples of the stride
    restart = 0
    for row in update.alarm_rows:
        assert (row + 1 - restart) % 5 == 0
        restart = row + 1
    restored = OnlineMmd.from_state_dict(det.state_dict())
    assert restored.stride == 5
    more = _rows(rng, 50)
    np.testing.assert_array_equal(restored.update(more).statistics, det.update(more).statistics)


def test_null_run_length_with_stride_is_consistent_with_ert():
    # ERT 400 rows tested every 10 rows = 40 tests between false alarms on average.
    rng = np.random.default_rng(3)
    x = _rows(rng, 800)
    det = OnlineMmd.calibrate(x, sigma=median_bandwidth(x), window_rows=10, ert_rows=400, bootstraps=1500,
                              seed=2, stride_rows=10)
    alarms: list[int] = []
    seen = 0
    while len(alarms) < 60 and seen < 200_000:
        alarms += [seen + a for a in det.update(_rows(rng, 2000)).alarm_rows]
        seen += 2000
    runs = np.diff([-1] + alarms[:60])
    # Runs are ~geometric in tests (mean 40, sd ~40): the mean of 60 has ~13% relative sd, and the
    # thresholds themselves come from 1500 bootstraps of one finite reference (another ~20%).
    # A factor of 2 either way is beyond 3 sd of both.
    assert 200 <= runs.mean() <= 800, runs.mean()


def test_stride_must_fit_the_window():
    x = _rows(np.random.default_rng(0), 100)
    with pytest.raises(ValueError, match="stride_rows must be an integer in"):
        OnlineMmd.calibrate(x, sigma=1.0, window_rows=10, ert_rows=100, bootstraps=100, seed=0, stride_rows=11)


def test_strided_statistics_equal_the_every_row_statistics_on_tested_rows():
    rng = np.random.default_rng(7)
    x = _rows(rng, 500)
    det = OnlineMmd.calibrate(x, sigma=median_bandwidth(x), window_rows=12, ert_rows=300, bootstraps=400,
                              seed=3, stride_rows=4)
    state = det.state_dict()
    state["thresholds"] = np.full(12, np.inf)  # no alarms: compare the raw statistics
    every_row = OnlineMmd.from_state_dict({**state, "stride": 1})
    strided = OnlineMmd.from_state_dict({**state, "thresholds": np.full(len(det.thresholds), np.inf)})
    y = _rows(rng, 300, shift=0.3)
    got = np.concatenate([strided.update(y[:101]).statistics, strided.update(y[101:]).statistics])
    want = every_row.update(y).statistics
    tested = (np.arange(300) + 1) % 4 == 0
    np.testing.assert_allclose(got[tested], want[tested], rtol=1e-5, atol=1e-9)
    assert np.isnan(got[~tested]).all()
    assert strided.status().statistic == pytest.approx(want[299], rel=1e-5)
