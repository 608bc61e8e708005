"""Shared helpers for the mmd tests: naive float64 references to check the fast paths against."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from monitor.signals.kernels import gaussian_kernel
from monitor.signals.online_calibration import window_statistics


def naive_kernel(a: np.ndarray, b: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian kernel in float64, straight from pairwise differences (no norm expansion)."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d2 = ((a64[:, None, :] - b64[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2.0 * sigma * sigma))


def naive_mmd2(x: np.ndarray, y: np.ndarray, sigma: float) -> float:
    """Unbiased MMD^2 built from the full pooled kernel, O((m + n)^2), float64."""
    z = np.concatenate([x, y]).astype(np.float64)
    k = naive_kernel(z, z, sigma)
    m, n = len(x), len(y)
    kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2.0 * kxy.mean()
    )


def naive_permuted_mmd2(x: np.ndarray, y: np.ndarray, sigma: float, window_sets: np.ndarray) -> np.ndarray:
    """MMD^2 after moving the pooled rows in each row of ``window_sets`` into the window."""
    z = np.concatenate([x, y])
    out = []
    for window in window_sets:
        mask = np.zeros(len(z), dtype=bool)
        mask[window] = True
        out.append(naive_mmd2(z[~mask], z[mask], sigma))
    return np.array(out)


def gaussian_rows(rng: np.random.Generator, rows: int, dims: int, *, shift: float = 0.0, shifted_dims: int = 0) -> np.ndarray:
    """Standard normal rows (float32), the first ``shifted_dims`` dims moved by ``shift`` sd."""
    x = rng.standard_normal((rows, dims))
    x[:, :shifted_dims] += shift
    return x.astype(np.float32)


def naive_online_thresholds(
    x: np.ndarray, sigma: float, window: int, ert: float, extended_windows: np.ndarray
) -> np.ndarray:
    """alibi-detect's threshold recipe written plainly: for each bootstrap's extended window
    (2W - 1 reference indices in order) and each step w, the MMD^2 between the other reference
    rows and rows [w, w + W) of the extended window; thresholds are the 1 - 1/ERT quantiles among
    bootstraps that stayed below every earlier threshold."""
    mmd = np.array(
        [
            [naive_mmd2(np.delete(x, ext, axis=0), x[ext[w:w + window]], sigma) for w in range(window)]
            for ext in extended_windows
        ]
    )
    alive = np.ones(len(mmd), dtype=bool)
    thresholds = []
    for w in range(window):
        thresholds.append(np.quantile(mmd[alive, w], 1.0 - 1.0 / ert))
        alive &= mmd[:, w] < thresholds[-1]
    return np.array(thresholds)


def run_lengths(alarm_positions: list[int]) -> list[int]:
    """Rows from each (re)start to its alarm, given alarm positions in the whole stream (0-based)."""
    starts = [-1] + alarm_positions[:-1]
    return [a - s for a, s in zip(alarm_positions, starts)]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run many tiny kernels on one thread: on a shared 2-core box, waking a second OpenMP
    thread per small op costs more than the op itself."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prefix_sum_online(state: dict, stream: np.ndarray, segment: int = 256) -> tuple[np.ndarray, list[int]]:
    """The every-row online update as it was before the banded recurrence, as a reference: per
    segment, the kernel among the last W - 1 window rows and the new rows, window sums read off
    2-D prefix sums (``online_calibration.window_statistics``). Starts from ``state``
    (``OnlineMmd.state_dict()``, stride 1); returns (per-row statistics, alarm rows)."""
    sigma, thresholds, sub_mean = float(state["sigma"]), np.asarray(state["thresholds"]), float(state["sub_mean"])
    sub = torch.from_numpy(np.asarray(state["sub_reference"]))
    window, colsums, t = np.asarray(state["window"]), np.asarray(state["window_colsums"]), int(state["t"])
    w = len(window)
    new_colsums = gaussian_kernel(sub, torch.from_numpy(stream), sigma).sum(0, dtype=torch.float64).numpy()
    stats, alarms, pos = np.empty(len(stream)), [], 0
    while pos < len(stream):
        end = min(pos + segment, len(stream))
        z = np.concatenate([window[1:], stream[pos:end]])
        zc = np.concatenate([colsums[1:], new_colsums[pos:end]])
        zt = torch.from_numpy(z)
        seg = window_statistics(
            gaussian_kernel(zt, zt, sigma, same=True), torch.from_numpy(zc), w, sub_mean, len(sub)
        ).numpy()
        crossed = np.flatnonzero(seg > thresholds[np.minimum(t + 1 + np.arange(end - pos), len(thresholds) - 1)])
        taken = len(seg) if len(crossed) == 0 else int(crossed[0]) + 1
        stats[pos:pos + taken] = seg[:taken]
        if len(crossed):
            alarms.append(pos + taken - 1)
            t, window, colsums = 0, np.asarray(state["init_window"]), np.asarray(state["init_colsums"])
        else:
            t, window, colsums = t + taken, z[-w:], zc[-w:]
        pos += taken
    return stats, alarms
