"""A short learning-rate range test (Smith 2017, the fastai "LR finder") on the head-trained model.

The fine-tune phase's base LR is swept geometrically from ``start`` to ``end`` over ``steps``
real training steps; the test stops early once the smoothed loss exceeds ``diverge`` x its
minimum. The suggestion is the LR at the smoothed minimum divided by ``divisor``: the minimum
is already where steps start to overshoot. The caller restores the weights afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RangeTest:
    lrs: tuple[float, ...]
    losses: tuple[float, ...]       # smoothed (bias-corrected EMA) training loss at each LR
    suggestion: float
    reason: str

    def to_json(self) -> dict:
        return {"suggestion": self.suggestion, "reason": self.reason,
                "lrs": list(self.lrs), "losses": list(self.losses)}


def range_test(step: Callable[[float], float], *, start: float = 1e-7, end: float = 1.0, steps: int = 30,
               divisor: float = 10.0, diverge: float = 4.0, smoothing: float = 0.7) -> RangeTest:
    """Run ``step(lr) -> training loss`` at geometrically increasing LRs; suggest one.

    A non-finite loss ends the test (that LR diverged). Raises ValueError on bad bounds.
    """
    if not 0 < start < end or steps < 3:
        raise ValueError(f"range test needs 0 < start < end and >= 3 steps, got {start}, {end}, {steps}")
    ratio = (end / start) ** (1.0 / (steps - 1))
    lrs: list[float] = []
    losses: list[float] = []
    avg = 0.0
    best = math.inf
    for i in range(steps):
        lr = start * ratio**i
        loss = step(lr)
        if not math.isfinite(loss):
            break
        avg = smoothing * avg + (1 - smoothing) * loss
        smoothed = avg / (1 - smoothing ** (i + 1))
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > diverge * best:
            break
    if not losses:
        return RangeTest((), (), start, f"the first step at lr {start:.2g} diverged")
    at = min(range(len(losses)), key=losses.__getitem__)
    suggestion = max(start, lrs[at] / divisor)
    return RangeTest(tuple(lrs), tuple(losses), suggestion,
                     f"smoothed loss lowest ({losses[at]:.3g}) at lr {lrs[at]:.2g} over {len(lrs)} steps "
                     f"{lrs[0]:.1g}..{lrs[-1]:.2g}; using 1/{divisor:g} of it")
