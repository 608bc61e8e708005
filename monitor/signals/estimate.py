"""Label-free accuracy estimates, fitted on the labelled reference, with a bootstrap interval.

Methods (``signals.estimate.method``; bench/estimate_bench.py measures them on a real backbone):

- ``cbpe``: isotonic regression maps max probability to the chance the prediction is right,
  averaged over the window (in the manner of NannyML's CBPE). Confidence calibrated on the
  reference stays high on corrupted inputs, so it barely moves under a harmful covariate shift.
- ``doc``: difference of confidences (Guillory et al., 2021): the reference accuracy moved by
  the change of mean max probability.
- ``atc_mc`` / ``atc_ne``: average thresholded confidence (Garg et al., ICLR 2022): the share of
  window rows whose max probability (``mc``) or negative entropy (``ne``) exceeds a threshold
  chosen on the reference so that the share there equals the reference accuracy.
- ``cott``: thresholded confidence optimal transport, label-shift aware (monitor/signals/cott.py).

Every method is fitted when the reference is built and stored in it, so switching methods needs
no rebuild. Each also stores its parameter refitted on ``REPLICATES`` bootstrap resamples of the
reference; the interval pairs each resample of the window's rows with one of them, so it covers
the sampling noise of both the window and a small reference. It does not cover the bias of a
method under a shift it cannot see (bench/README.md gives the measured errors).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import isotonic_regression

from monitor.signals.config import ESTIMATE_METHODS
from monitor.signals.cott import CottFit, correct_mass, cott_window, fit_cott
from monitor.signals.results import EstimateStats
from monitor.signals.transport import TOP_K, top_k
from monitor.signals.typicality import TypicalityBank

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ESTIMATE_METHODS  # the config's choices (monitor.signals.config), in fitting order
# Rows of a window COTT transports (a seeded uniform sample above it). The bench measured its
# error on ~500-row windows; at 2000 rows its sampling error (~0.01) is within its bias, and a
# 5000-row window's close no longer waits ~170 ms on the plan.
COTT_MAX_ROWS = 2000
# When the configured method cannot be used with a reference (one built by an older driftd, or
# without the rows a method needs), the best available one in this order is used instead: the
# bench's ranking (bench/README.md).
PREFERENCE: tuple[str, ...] = ("cott", "atc_ne", "atc_mc", "doc", "cbpe")
REPLICATES = 200        # reference bootstrap refits stored per method
_GRID = 101             # confidence grid on which CBPE's replicate calibrators are stored


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


def atc_threshold(score: np.ndarray, accuracy: float) -> float:
    """The score at or above which the share of rows equals ``accuracy`` (ATC's threshold)."""
    s = np.sort(np.asarray(score, dtype=np.float64))
    k = min(max(int(round(accuracy * s.size)), 1), s.size)
    return float(s[s.size - k])


@dataclass(frozen=True)
class LabelledRows:
    """The labelled reference rows the estimators are fitted on."""

    confidence: np.ndarray      # float64[n], max probability
    entropy: np.ndarray         # float64[n], normalised (monitor.signals.predictions)
    correct: np.ndarray         # float64[n], 1 where the logged prediction equals the label
    label: np.ndarray           # int64[n]
    top_prob: np.ndarray        # float32[n, K], descending
    top_class: np.ndarray       # int32[n, K]


@dataclass(frozen=True)
class Fitted:
    """One method's scalar parameter and its bootstrap refits."""

    value: float
    replicates: np.ndarray      # float64[R]


@dataclass(frozen=True, eq=False)
class EstimatorFit:
    """Everything the estimators learned from the labelled reference."""

    accuracy: float
    calibrator: Calibrator
    calibrator_grid: np.ndarray | None        # float64[G]; None in references of format 1
    calibrator_replicates: np.ndarray | None  # float64[R, G]: replicate calibrators on the grid
    doc: Fitted | None                        # offset: reference accuracy - mean max probability
    atc_mc: Fitted | None                     # threshold on max probability
    atc_ne: Fitted | None                     # threshold on negative normalised entropy
    confusion: np.ndarray | None              # int64[C, C] (predicted i, label j), all labelled rows
    cott: CottFit | None

    def methods(self) -> tuple[str, ...]:
        fitted = {"cbpe": True, "doc": self.doc is not None, "atc_mc": self.atc_mc is not None,
                  "atc_ne": self.atc_ne is not None, "cott": self.cott is not None}
        return tuple(m for m in METHODS if fitted[m])

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {"accuracy": np.float64(self.accuracy),
                                         "calibrator.x": self.calibrator.x, "calibrator.y": self.calibrator.y}
        if self.calibrator_grid is not None and self.calibrator_replicates is not None:
            arrays["calibrator.grid"] = self.calibrator_grid
            arrays["calibrator.replicates"] = self.calibrator_replicates
        for name in ("doc", "atc_mc", "atc_ne"):
            fitted: Fitted | None = getattr(self, name)
            if fitted is not None:
                arrays[f"{name}.value"] = np.float64(fitted.value)
                arrays[f"{name}.replicates"] = fitted.replicates
        if self.confusion is not None:
            arrays["confusion"] = self.confusion
        if self.cott is not None:
            arrays.update({f"cott.{k}": v for k, v in self.cott.to_arrays().items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], *, accuracy: float) -> "EstimatorFit":
        """From :meth:`to_arrays`, or from a format-1 reference (a calibrator only)."""
        def fitted(name: str) -> Fitted | None:
            if f"{name}.value" not in arrays:
                return None
            return Fitted(value=float(arrays[f"{name}.value"]), replicates=arrays[f"{name}.replicates"])

        confusion = arrays.get("confusion")
        cott = None
        if confusion is not None and "cott.threshold" in arrays:
            cott = CottFit.from_arrays({k[len("cott."):]: v for k, v in arrays.items() if k.startswith("cott.")},
                                       confusion)
        return cls(
            accuracy=float(arrays["accuracy"]) if "accuracy" in arrays else accuracy,
            calibrator=Calibrator(x=arrays["calibrator.x"], y=arrays["calibrator.y"]),
            calibrator_grid=arrays.get("calibrator.grid"),
            calibrator_replicates=arrays.get("calibrator.replicates"),
            doc=fitted("doc"), atc_mc=fitted("atc_mc"), atc_ne=fitted("atc_ne"),
            confusion=confusion, cott=cott,
        )


def fit_estimators(
    rows: LabelledRows, *, confusion: np.ndarray, typicality: TypicalityBank | None, seed: int,
    replicates: int = REPLICATES,
) -> EstimatorFit:
    """Fit every method on the labelled reference rows (at least 2)."""
    n = rows.label.size
    if n < 2:
        raise ValueError("the accuracy estimators need at least 2 labelled reference rows")
    rng = np.random.default_rng([seed, 0xE57])
    correct = rows.correct
    accuracy = float(correct.mean())
    calibrator = fit_calibrator(rows.confidence, correct)
    grid = np.unique(np.quantile(rows.confidence, np.linspace(0.0, 1.0, _GRID)))
    neg_entropy = -rows.entropy
    cal_reps = np.empty((replicates, grid.size))
    doc = np.empty(replicates)
    mc = np.empty(replicates)
    ne = np.empty(replicates)
    for r in range(replicates):
        idx = rng.integers(0, n, size=n)
        acc = float(correct[idx].mean())
        cal_reps[r] = fit_calibrator(rows.confidence[idx], correct[idx])(grid)
        doc[r] = acc - float(rows.confidence[idx].mean())
        mc[r] = atc_threshold(rows.confidence[idx], acc)
        ne[r] = atc_threshold(neg_entropy[idx], acc)
    cott = None
    if typicality is not None:
        cott = fit_cott(top_prob=rows.top_prob, top_class=rows.top_class, label=rows.label, correct=correct,
                        confusion=confusion, typicality=typicality, rng=rng, replicates=replicates)
    return EstimatorFit(
        accuracy=accuracy,
        calibrator=calibrator,
        calibrator_grid=grid,
        calibrator_replicates=cal_reps,
        doc=Fitted(accuracy - float(rows.confidence.mean()), doc),
        atc_mc=Fitted(atc_threshold(rows.confidence, accuracy), mc),
        atc_ne=Fitted(atc_threshold(neg_entropy, accuracy), ne),
        confusion=confusion,
        cott=cott,
    )


def resolve_method(requested: str, fit: EstimatorFit, *, model_version: str) -> str:
    """The method in force for a reference: ``requested`` if the reference supports it."""
    available = fit.methods()
    if requested in available:
        return requested
    chosen = next(m for m in PREFERENCE if m in available)
    log.warning(
        "model_version %s: signals.estimate.method %r needs a reference built by this driftd from labelled "
        "rows; using %r until the reference is rebuilt (`driftd reference build`)", model_version, requested, chosen,
    )
    return chosen


class WindowEstimator:
    """The estimate for one model_version's windows: the method in force, what it needs per row
    (``row_data``, at ingest), and the estimate with its interval (``estimate``, at close)."""

    def __init__(self, fit: EstimatorFit | None, *, method: str, bootstraps: int, interval: float, seed: int,
                 model_version: str):
        self.fit = fit
        self.method = None if fit is None else resolve_method(method, fit, model_version=model_version)
        self.bootstraps = bootstraps
        self.interval = interval
        self.seed = seed
        self.model_version = model_version

    @property
    def keeps_rows(self) -> bool:
        """Whether the method needs :meth:`row_data` for every row (COTT does)."""
        return self.method == "cott"

    @staticmethod
    def top_k(n_classes: int) -> int:
        return min(n_classes, TOP_K)

    def row_data(self, features: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: top-K probabilities and classes, and whether it looks like the reference
        (only COTT keeps these; see :attr:`keeps_rows`)."""
        top_prob, top_class = top_k(probs, self.top_k(probs.shape[1]))
        cott = None if self.fit is None else self.fit.cott
        if cott is None:
            raise ValueError(f"model_version {self.model_version}: the reference has no COTT fit to score rows with")
        typical = cott.typicality.typical(features, top_class[:, 0])
        return top_prob, top_class, typical

    def estimate(
        self, *, max_prob: np.ndarray, entropy: np.ndarray, top_prob: np.ndarray, top_class: np.ndarray,
        typical: np.ndarray, index: int,
    ) -> EstimateStats | None:
        """The window's estimate, or None when the reference has no labels (or, for COTT, the
        window's per-row data was not kept, e.g. a window restored from an older checkpoint)."""
        fit, method = self.fit, self.method
        if fit is None or method is None or max_prob.size == 0:
            return None
        extra: dict[str, float] = {}
        # Each method is a mean over rows of per-row values that depend on one fitted parameter;
        # ``params[0]`` is the fit on the whole reference, the rest its bootstrap refits.
        if method == "cott" and fit.cott is not None:
            if typical.size != max_prob.size:
                log.info("model_version %s: window %d has no per-row data for COTT (restored from an older "
                         "checkpoint or kept for another method); no estimate for it", self.model_version, index)
                return None
            if max_prob.size > COTT_MAX_ROWS:
                # the transport plan is the costly part; a uniform sample of the window (seeded by
                # the window, so a replay gives the same estimate) keeps its cost bounded, and the
                # interval, resampling these rows, says what the sample costs in precision
                keep = np.sort(np.random.default_rng([self.seed, index, 1]).choice(
                    max_prob.size, size=COTT_MAX_ROWS, replace=False))
                max_prob, top_prob, top_class, typical = max_prob[keep], top_prob[keep], top_class[keep], typical[keep]
            window = cott_window(fit.cott, top_prob=top_prob, top_class=top_class, typical=typical)
            if not window.plan.converged:
                log.warning("model_version %s: window %d: the COTT transport plan did not converge; "
                            "its estimate may be off", self.model_version, index)
            extra = {"typical_share": window.typical_share,
                     "target_shift": 0.5 * float(np.abs(window.target - fit.cott.label_share).sum())}
            params = np.concatenate([[fit.cott.threshold], fit.cott.replicates])

            def values(t: float) -> np.ndarray:
                return correct_mass(window.plan, t)
        elif method == "cbpe":
            grid, reps = fit.calibrator_grid, fit.calibrator_replicates
            # -1 is the exact calibrator; r >= 0 a replicate (format-1 references have none)
            params = np.arange(-1.0, 0.0 if reps is None else float(reps.shape[0]))

            def values(r: float) -> np.ndarray:
                if r < 0 or grid is None or reps is None:
                    return fit.calibrator(max_prob)
                return np.interp(max_prob, grid, reps[int(r)])
        else:
            fitted: Fitted = getattr(fit, method)
            params = np.concatenate([[fitted.value], fitted.replicates])
            score = max_prob if method == "atc_mc" else -entropy

            def values(p: float) -> np.ndarray:
                if method == "doc":
                    return max_prob + p
                return (score >= p).astype(np.float64)
        point = _clip(float(values(params[0]).mean()))
        lower, upper = self._interval(values, params, max_prob.size, index)
        return EstimateStats(
            estimated_accuracy=point, reference_accuracy=fit.accuracy, lower=lower, upper=upper, method=method,
            interval=self.interval, **extra,
        )

    def _interval(self, values, params: np.ndarray, n: int, index: int) -> tuple[float, float]:
        """Percentile bootstrap: resample the window's rows, each time with one reference refit
        (``params[1:]`` in turn; the whole-reference fit when there are none)."""
        rng = np.random.default_rng([self.seed, index])
        refits = params[1:] if params.size > 1 else params[:1]
        cache: dict[int, np.ndarray] = {}
        draws = np.empty(self.bootstraps)
        for b in range(self.bootstraps):
            r = b % refits.size
            if r not in cache:
                cache[r] = values(refits[r])
            draws[b] = cache[r][rng.integers(0, n, size=n)].mean()
        lo, hi = np.quantile(draws, [(1.0 - self.interval) / 2.0, (1.0 + self.interval) / 2.0])
        return _clip(float(lo)), _clip(float(hi))


def _clip(x: float) -> float:
    return min(1.0, max(0.0, x))
