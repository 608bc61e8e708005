"""How many bootstraps the online MMD detector needs: arithmetic only, no torch.

Kept apart from ``monitor.signals.online_mmd`` so config validation (``driftd config validate``
and every command that reads a config) can reject impossible settings without importing torch.
"""

from __future__ import annotations

import math


def required_bootstraps(ert_rows: float, window_rows: int, stride_rows: int = 1) -> int:
    """Fewest bootstraps that let calibration estimate the 1 - stride/ert_rows quantile at each
    calibrated step (each step keeps only the bootstraps below its threshold, and a quantile q
    needs q <= (N - 1) / N of N values). About ert_rows / stride_rows; config validation calls
    this to reject impossible settings early."""
    ert_steps = ert_rows / stride_rows
    steps = calibrated_steps(window_rows, stride_rows)

    def enough(n: int) -> bool:
        q = 1.0 - 1.0 / ert_steps
        for _ in range(steps):
            if n < 2 or q > (n - 1) / n:
                return False
            # Values strictly below the type-7 quantile; h = (n-1)q landing on an integer keeps
            # only h, and the 1e-9 counts near-integers that way too (never overestimates).
            n = math.ceil((n - 1) * q - 1e-9)
        return True

    high = max(2, math.ceil(ert_steps))
    while not enough(high):
        high *= 2
    low = high // 2
    while low + 1 < high:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return high


def calibrated_steps(window_rows: int, stride_rows: int) -> int:
    """Thresholds kept: one per tested offset 0, s, 2s, ... below W (offset 0 is the restart)."""
    return (window_rows - 1) // stride_rows + 1
