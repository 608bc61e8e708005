"""Label-free accuracy estimate, confidence-based in the manner of NannyML's CBPE.

On the labelled reference, isotonic regression maps the model's max probability to the
observed chance that the prediction is right (neural nets are rarely calibrated). Averaged
over a window, the calibrated confidences estimate accuracy before any label arrives. It is
only as good as the assumption that P(correct | confidence) does not change; under concept
drift it is wrong, which is why the real accuracy is shown beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import isotonic_regression


@dataclass(frozen=True)
class Calibrator:
    """Piecewise-linear monotone map from max probability to P(correct)."""

    x: np.ndarray  # increasing confidences (float64)
    y: np.ndarray  # calibrated P(correct) at x, non-decreasing

    def __call__(self, confidence: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(confidence, dtype=np.float64), self.x, self.y)


def fit_calibrator(confidence: np.ndarray, correct: np.ndarray) -> Calibrator:
    """Fit on reference rows: ``confidence`` = max prob, ``correct`` = prediction == label."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if conf.shape != hit.shape or conf.ndim != 1:
        raise ValueError(f"confidence and correct must be 1-D of equal length, got {conf.shape} and {hit.shape}")
    if conf.size < 2:
        raise ValueError("a calibrator needs at least 2 labelled reference rows")
    order = np.argsort(conf, kind="stable")
    fitted = isotonic_regression(hit[order], increasing=True).x
    xs, first = np.unique(conf[order], return_index=True)
    # Ties share one x: take the mean fitted value of each tie group.
    sums = np.add.reduceat(fitted, first)
    counts = np.diff(np.append(first, conf.size))
    return Calibrator(x=xs, y=sums / counts)
