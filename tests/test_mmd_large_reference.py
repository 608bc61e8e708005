"""Large references: without the dense K_rr (blocked row sums, S x S kernels from the rows,
chunked window blocks) the batch test gives the dense path's statistics, and a 100k-row
reference builds and tests in memory linear in its rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from monitor.signals.kernels import DENSE_KERNEL_ROWS, gaussian_kernel, kernel_row_sums, median_bandwidth
from monitor.signals.mmd import PermutationPlan, mmd_test, permuted_mmd2
from monitor.signals.mmd_reference import MmdReference
from monitor.signals.online_mmd import OnlineMmd
from mmd_helpers import gaussian_rows, naive_kernel, naive_mmd2, naive_permuted_mmd2, one_thread

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("block_entries", [1, 700, 10_000, 1 << 24], ids=["row-by-row", "blocks", "few-blocks", "one-block"])
def test_blocked_row_sums_equal_the_dense_kernel_row_sums(block_entries: int) -> None:
    x = torch.from_numpy(gaussian_rows(np.random.default_rng(0), 97, 5))
    dense = naive_kernel(x.numpy(), x.numpy(), 1.7).sum(1)
    np.testing.assert_allclose(kernel_row_sums(x, 1.7, block_entries=block_entries).numpy(), dense, rtol=1e-6)


def _blocked(x: np.ndarray, sigma: float) -> MmdReference:
    """A reference that keeps no K_rr and sums windows in several chunks, at a size the dense
    path and the naive float64 computation can check."""
    return MmdReference.build(x, sigma, dense_kernel_rows=0, block_entries=1500)


def test_a_reference_without_the_dense_kernel_gives_the_same_statistics() -> None:
    rng = np.random.default_rng(3)
    x, y = gaussian_rows(rng, 240, 10), gaussian_rows(rng, 40, 10, shift=0.4, shifted_dims=3)
    sigma = median_bandwidth(x)
    dense, blocked = MmdReference.build(x, sigma), _blocked(x, sigma)
    assert dense.k_rr is not None and blocked.k_rr is None
    assert blocked.offset == dense.offset
    # Shifted row sums are differences of sums of 240 kernel values (~100): float32 entries
    # summed in another order agree to ~1e-7 of those, i.e. ~1e-5 absolute.
    np.testing.assert_allclose(blocked.rr_row_sums.numpy(), dense.rr_row_sums.numpy(), atol=1e-4)
    perm_rng = np.random.default_rng(1)
    sets = np.stack([perm_rng.permutation(280)[240:] for _ in range(15)])
    sets[0] = np.arange(240, 280)  # the identity grouping: the observed statistic
    sets[1] = np.arange(40)        # reference rows only
    naive = naive_permuted_mmd2(x, y, sigma, sets)
    np.testing.assert_allclose(permuted_mmd2(blocked, y, sets), naive, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(permuted_mmd2(dense, y, sets), naive, rtol=1e-5, atol=1e-8)
    plan_rng = [np.random.default_rng(5), np.random.default_rng(5)]
    a = mmd_test(dense, y, plan=PermutationPlan.draw(dense, 40, 99, plan_rng[0]))
    b = mmd_test(blocked, y, plan=PermutationPlan.draw(blocked, 40, 99, plan_rng[1]))
    assert b.mmd2 == pytest.approx(naive_mmd2(x, y, sigma), rel=1e-6, abs=2e-8)
    assert (b.p_value, b.reference_rows) == (a.p_value, a.reference_rows)


def test_null_p_values_without_the_dense_kernel_hold_their_level() -> None:
    rng = np.random.default_rng(11)
    p = []
    with one_thread():
        for _ in range(100):
            x = gaussian_rows(rng, 150, 4)
            ref = _blocked(x, median_bandwidth(x))
            y = gaussian_rows(rng, 30, 4)
            p.append(mmd_test(ref, y, plan=PermutationPlan.draw(ref, 30, 99, rng)).p_value)
    # Binomial(100, 0.05): mean 5, sd 2.2; [0, 13] holds it with probability > 0.999.
    assert int((np.array(p) <= 0.05).sum()) <= 13
    assert 0.35 < float(np.mean(p)) < 0.65


_BUILD_100K = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from monitor.signals.kernels import gaussian_kernel
    from monitor.signals.mmd import PermutationPlan, mmd_test
    from monitor.signals.mmd_reference import MmdReference
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100_000, 4)).astype(np.float32)
    ref = MmdReference.build(x, 2.0)
    rows = [0, 4_321, 99_999]  # a few row sums, checked against a direct float64 sum
    xt = torch.from_numpy(x).double() - ref.center.double()
    direct = [float(gaussian_kernel(xt[[i]], xt, 2.0).sum()) - 100_000 * ref.offset for i in rows]
    null = rng.standard_normal((300, 4)).astype(np.float32)
    shifted = null + np.float32(0.3)
    out = {"k_rr": ref.k_rr is not None, "row_sums": [float(ref.rr_row_sums[i]) for i in rows], "direct": direct}
    for name, y in (("null", null), ("shifted", shifted)):
        r = mmd_test(ref, y, plan=PermutationPlan.draw(ref, 300, 49, rng))
        out[name] = [r.mmd2, r.p_value]
    with open("/proc/self/status") as fh:
        out["peak_mb"] = next(int(l.split()[1]) for l in fh if l.startswith("VmHWM")) / 1024
    json.dump(out, sys.stdout)
    """
)


def test_a_100k_row_reference_builds_and_tests_in_memory_linear_in_its_rows() -> None:
    """The dense K_rr of 100k rows is a 40 GB allocation; the blocked build peaks far below."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _BUILD_100K], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    out = json.loads(done.stdout)
    assert out["k_rr"] is False
    np.testing.assert_allclose(out["row_sums"], out["direct"], rtol=1e-6)
    assert out["shifted"][1] == pytest.approx(1 / 50) and out["shifted"][0] > 10 * abs(out["null"][0])
    assert out["null"][1] > 0.02
    # torch and numpy alone take ~400 MB; x, its centred copy and one window's chunks ~50 MB more.
    assert out["peak_mb"] < 1500, out


def test_online_calibration_of_a_reference_too_large_to_keep_its_kernel() -> None:
    """Above DENSE_KERNEL_ROWS the online detector calibrates from column sums in blocks and
    bootstrap blocks computed from the rows; its sub-reference sums and first statistics equal
    direct float64 computations."""
    rows, window = DENSE_KERNEL_ROWS + 904, 8
    x = gaussian_rows(np.random.default_rng(2), rows, 3)
    sigma = median_bandwidth(x)
    with one_thread():
        det = OnlineMmd.calibrate(x, sigma=sigma, window_rows=window, ert_rows=30.0, bootstraps=400, seed=1)
    state = det.state_dict()
    sub = torch.from_numpy(state["sub_reference"]).double()
    init = torch.from_numpy(state["init_window"]).double()
    s = len(sub)
    assert s == rows - (2 * window - 1)
    assert state["sub_mean"] == pytest.approx((float(kernel_row_sums(sub, sigma).sum()) - s) / (s * (s - 1)), rel=1e-6)
    np.testing.assert_allclose(state["init_colsums"], gaussian_kernel(sub, init, sigma).sum(0).numpy(), rtol=1e-6)
    y = gaussian_rows(np.random.default_rng(3), 5, 3)
    got = det.update(y).statistics
    stream = torch.cat([init, torch.from_numpy(y).double()])
    for i in range(len(y)):
        w = stream[i + 1:i + 1 + window]
        within = float(gaussian_kernel(w, w, sigma, same=True).sum()) - window
        cross = float(gaussian_kernel(sub, w, sigma).sum())
        want = state["sub_mean"] + within / (window * (window - 1)) - 2.0 * cross / (s * window)
        assert got[i] == pytest.approx(want, rel=1e-5, abs=1e-8)
