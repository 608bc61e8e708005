"""A short learning-rate range test (Smith 2017, the fastai "LR finder") on the head-trained model.

The fine-tune phase's base LR is swept geometrically from ``start`` to ``end`` over ``steps``
real training steps; the test stops early once the smoothed loss exceeds ``diverge`` x its
minimum. The suggestion is the onset of divergence (the last LR before the smoothed loss rises
above ``rise`` x its running minimum plus twice the batch noise, on two steps in a row) divided
by ``divisor``, 1 by default: the onset itself. The recipe corrects a rate that is too high (its
guards trip and phase 2 retries at ``backoff_factor`` x the rate) but nothing corrects one that is
too low, and the onset moves 3-5x with the batches the test draws; a third of it put the 2000-row
bench case at 2.6e-5 and 0.605 target accuracy, the onset itself at 7.9e-5 and 0.737 (a fixed
1e-4: 0.793; bench/README.md). The noise is the spread of the raw losses over the first ``settle`` steps, whose
LRs are too small to change anything: at a low loss (0.15 after the head phase on blur) batch
to batch variation alone exceeds 1.5x, and without the margin the onset fell on step 3. Not the classic "1/10 of the
minimum": on a head-trained model the loss hardly falls over 30 steps, so the minimum lands on
batch noise anywhere on the flat part (measured on the pretrained MobileNetV2: flat 0.81-0.96
from 1e-7 to 4.5e-5, rising from 7.9e-5; the minimum rule said 4.5e-6). The caller restores
the weights afterwards.
"""

from __future__ import annotations

import math
import statistics
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
               divisor: float = 1.0, rise: float = 1.5, diverge: float = 4.0, smoothing: float = 0.7,
               settle: int = 5) -> RangeTest:
    """Run ``step(lr) -> training loss`` at geometrically increasing LRs; suggest one.

    A non-finite loss ends the test (that LR diverged). Raises ValueError on bad bounds.
    """
    if not 0 < start < end or steps < 3:
        raise ValueError(f"range test needs 0 < start < end and >= 3 steps, got {start}, {end}, {steps}")
    ratio = (end / start) ** (1.0 / (steps - 1))
    lrs: list[float] = []
    losses: list[float] = []
    raw: list[float] = []
    avg = 0.0
    best = math.inf
    for i in range(steps):
        lr = start * ratio**i
        loss = step(lr)
        if not math.isfinite(loss):
            break
        raw.append(loss)
        avg = smoothing * avg + (1 - smoothing) * loss
        smoothed = avg / (1 - smoothing ** (i + 1))
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if i >= settle and smoothed > diverge * best:
            break
    if not losses:
        return RangeTest((), (), start, f"the first step at lr {start:.2g} diverged")
    margin = 2 * statistics.stdev(raw[:settle]) if len(raw) >= max(2, settle) else 0.0
    onset = len(losses) - 1
    for i in range(max(1, settle), len(losses)):
        limit = rise * min(losses[:i]) + margin
        if losses[i] > limit and (i + 1 == len(losses) or losses[i + 1] > limit):
            onset = i - 1
            break
    suggestion = max(start, lrs[onset] / divisor)
    return RangeTest(tuple(lrs), tuple(losses), suggestion,
                     f"smoothed loss first rose above {rise:g}x its minimum + {margin:.2g} after lr {lrs[onset]:.2g} "
                     f"({len(lrs)} steps {lrs[0]:.1g}..{lrs[-1]:.2g}); "
                     + ("using it" if divisor == 1 else f"using 1/{divisor:g} of it"))
