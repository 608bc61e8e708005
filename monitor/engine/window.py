"""One model_version's running window and detectors: rows in, WindowSignals out.

A window closes after ``window.rows`` rows or once it spans ``window.seconds`` of event time,
whichever comes first; a window left open because traffic stopped closes ``window.seconds``
after its last row *arrived* (that is the one wall-clock rule: it is about arrivals, not ages).
Joined labels are judged in label time: :meth:`WindowTracker.add_labels` returns a
:class:`LabelEvaluation` every ``signals.accuracy.evaluate_every`` labels and
:meth:`WindowTracker.flush_labels` one for the rest at the end of a cycle.
Everything here is plain numpy state with ``state_dict``/``load_state_dict`` so the engine can
checkpoint it with the ingest cursor.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from monitor.engine.config import MonitorConfig
from monitor.ingest.records import InferenceBatch, JoinedLabel
from monitor.engine.reference import Reference
from monitor.signals.accuracy import AccuracyTracker
from monitor.signals.activations import activation_stats
from monitor.signals.estimate import WindowEstimator
from monitor.signals.kernels import median_bandwidth
from monitor.signals.mmd import PermutationSchedule, mmd_test
from monitor.signals.mmd_reference import MmdReference
from monitor.signals.online_mmd import OnlineMmd
from monitor.signals.projection import fit_projection
from monitor.signals.predictions import normalised_entropy, prediction_stats
from monitor.signals.results import LabelEvaluation, OnlineMmdStatus, WindowSignals

log = logging.getLogger("monitor.window")  # the logger name from before the move: log filters keep working


@dataclass
class _Window:
    """Running sums of the open window; O(D + rows) memory whatever the batch sizes."""

    rows: int
    start_time: float
    end_time: float
    feature_sum: np.ndarray
    feature_sumsq: np.ndarray
    entropy: np.ndarray
    max_prob: np.ndarray
    class_counts: np.ndarray
    top_prob: np.ndarray         # per row, the top-K probabilities (only when the estimator keeps rows)
    top_class: np.ndarray        # and their classes
    typical: np.ndarray          # and whether the row looks like the reference (monitor/signals/typicality.py)
    sample_keys: np.ndarray      # bottom-k keys: a uniform subsample for the MMD test
    sample: np.ndarray           # projected features of the subsample
    last_arrival: float          # wall time the last row was ingested (for idle close)

    @classmethod
    def empty(cls, dim: int, classes: int, projected_dim: int) -> "_Window":
        return cls(
            rows=0,
            start_time=0.0,
            end_time=0.0,
            feature_sum=np.zeros(dim),
            feature_sumsq=np.zeros(dim),
            entropy=np.zeros(0),
            max_prob=np.zeros(0),
            class_counts=np.zeros(classes, dtype=np.int64),
            top_prob=np.zeros((0, WindowEstimator.top_k(classes)), dtype=np.float32),
            top_class=np.zeros((0, WindowEstimator.top_k(classes)), dtype=np.int32),
            typical=np.zeros(0, dtype=bool),
            sample_keys=np.zeros(0),
            sample=np.zeros((0, projected_dim), dtype=np.float32),
            last_arrival=0.0,
        )


# Rows per float64 block in _accumulate_moments: 512 x 512 doubles stay in L2.
_MOMENT_ROWS = 512


def _accumulate_moments(x: np.ndarray, total: np.ndarray, total_sq: np.ndarray) -> None:
    """Add the column sums and sums of squares of float32 ``x`` into float64 ``total``/``total_sq``,
    in cache-sized float64 blocks: no float64 copy of the whole batch, squares taken in float64."""
    block = np.empty((min(_MOMENT_ROWS, len(x)), x.shape[1]))
    for lo in range(0, len(x), _MOMENT_ROWS):
        b = block[: min(_MOMENT_ROWS, len(x) - lo)]
        np.copyto(b, x[lo:lo + _MOMENT_ROWS])
        total += b.sum(0)
        np.multiply(b, b, out=b)
        total_sq += b.sum(0)


_WINDOW_ARRAYS = ("feature_sum", "feature_sumsq", "entropy", "max_prob", "class_counts", "sample_keys", "sample")
# Per-row estimator data; checkpoints written before it existed lack it (the estimator then
# skips that one window rather than guess).
_ESTIMATE_ARRAYS = ("top_prob", "top_class", "typical")
_WINDOW_SCALARS = ("rows", "start_time", "end_time", "last_arrival")


class WindowTracker:
    """Signals for the rows of one model_version against its reference."""

    def __init__(
        self, reference: Reference, config: MonitorConfig, state: tuple[dict[str, np.ndarray], dict] | None = None
    ):
        """``state`` (from :meth:`state_dict`) restores a checkpoint without recalibrating."""
        self.reference = reference
        self.config = config
        sig = config.signals
        projected = reference.projection.apply(reference.sample)
        self.projected_dim = int(projected.shape[1])
        # The batch MMD test: its reference lives in its permutation schedule (``.ref``), the one
        # place that uses it. None when signals.mmd is disabled.
        self.batch_mmd = (
            PermutationSchedule(
                MmdReference.build(projected[: sig.mmd.max_reference_rows], reference.bandwidth),
                permutations=sig.mmd.permutations,
                redraw_every=sig.mmd.redraw_permutations_every,
                seed=sig.mmd.seed,
            )
            if sig.mmd.enabled
            else None
        )
        self._projected_sample = projected
        # The sequential detector pays its kernel per row: it gets its own small projection of the
        # raw features (fitted here, deterministically from the reference sample and its seed, so a
        # restart rebuilds the same one) and its own median bandwidth in that space, whatever the
        # batch test uses (raw features by default, chosen by power: bench/README.md).
        on = sig.online_mmd
        self.online_projection = fit_projection(reference.sample, kind=on.projection, dims=on.projection_dims,
                                                seed=on.seed)
        self._online_sample = self.online_projection.apply(reference.sample[: on.max_reference_rows])
        self.online: OnlineMmd | None = None
        restored_online = state is not None and any(k.startswith("online.") for k in state[0])
        if sig.online_mmd.enabled and not restored_online:
            self.online = self._calibrate_online()
        self.accuracy = AccuracyTracker(last_n=sig.accuracy.last_n, last_seconds=sig.accuracy.last_seconds)
        est = sig.estimate
        self.estimator = WindowEstimator(reference.estimators, method=est.method, bootstraps=est.bootstraps,
                                         interval=est.interval, seed=est.seed, model_version=reference.model_version)
        self.rng = np.random.default_rng([sig.mmd.seed, 7])
        self.index = 0
        self.evaluation_index = 0
        self._unjudged_labels = 0          # joined since the last LabelEvaluation
        self._unjudged_since = math.inf    # oldest prediction time among them
        self.window = _Window.empty(reference.feature_dim, reference.n_classes, self.projected_dim)
        if state is not None:
            self.load_state_dict(*state)

    def _calibrate_online(self) -> OnlineMmd:
        on = self.config.signals.online_mmd
        return OnlineMmd.calibrate(
            self._online_sample,
            sigma=median_bandwidth(self._online_sample, seed=on.seed),
            window_rows=on.window_rows,
            ert_rows=on.ert_rows,
            stride_rows=on.stride_rows,
            bootstraps=on.bootstraps,
            seed=on.seed,
        )

    # -- rows ---------------------------------------------------------------------------------

    def add(self, batch: InferenceBatch, *, now: float) -> list[WindowSignals]:
        """Feed rows of this version in arrival order; returns the windows they closed."""
        closed: list[WindowSignals] = []
        n = len(batch)
        if n == 0:
            return closed
        ts = batch.timestamp
        limit_rows = self.config.window.rows
        limit_seconds = self.config.window.seconds
        projected = self.reference.projection.apply(batch.features)
        self.accuracy.observe_predictions(float(ts.max()))
        pos = 0
        while pos < n:
            w = self.window
            if w.rows == 0:
                w.start_time = float(ts[pos])
            need = limit_rows - w.rows
            segment = ts[pos : pos + need]
            late = np.nonzero(segment - w.start_time >= limit_seconds)[0]
            take = int(late[0]) if late.size else segment.size
            if take:
                self._absorb(batch, projected, pos, pos + take, now)
                pos += take
            if late.size or self.window.rows >= limit_rows:
                signals = self._close()
                if signals is not None:
                    closed.append(signals)
                elif take == 0:  # one row, too old to share a window with the next: no window to report
                    self.window = _Window.empty(self.reference.feature_dim, self.reference.n_classes,
                                                self.projected_dim)
        return closed

    def _absorb(self, batch: InferenceBatch, projected: np.ndarray, lo: int, hi: int, now: float) -> None:
        w = self.window
        x = batch.features[lo:hi]
        probs = batch.probs[lo:hi]
        max_prob = probs.max(axis=1).astype(np.float64)
        w.rows += hi - lo
        w.end_time = float(batch.timestamp[hi - 1])
        _accumulate_moments(x, w.feature_sum, w.feature_sumsq)
        w.entropy = np.concatenate([w.entropy, normalised_entropy(probs)])
        w.max_prob = np.concatenate([w.max_prob, max_prob])
        w.class_counts += np.bincount(batch.prediction[lo:hi], minlength=w.class_counts.size)[: w.class_counts.size]
        if self.estimator.keeps_rows:
            top_prob, top_class, typical = self.estimator.row_data(x, probs)
            w.top_prob = np.concatenate([w.top_prob, top_prob])
            w.top_class = np.concatenate([w.top_class, top_class])
            w.typical = np.concatenate([w.typical, typical])
        w.last_arrival = now
        keys = self.rng.random(hi - lo)
        cap = self.config.signals.mmd.max_window_rows
        all_keys = np.concatenate([w.sample_keys, keys])
        keep = np.argsort(all_keys, kind="stable")[:cap]
        w.sample_keys = all_keys[keep]
        w.sample = np.concatenate([w.sample, projected[lo:hi]])[keep]
        if self.online is not None:
            self.online.update(self.online_projection.apply(batch.features[lo:hi]))

    def add_labels(self, joined: list[JoinedLabel]) -> list[LabelEvaluation]:
        """Feed joined labels in join order; returns an evaluation for every
        ``signals.accuracy.evaluate_every`` of them (the rest wait for :meth:`flush_labels`)."""
        every = self.config.signals.accuracy.evaluate_every
        out: list[LabelEvaluation] = []
        pos = 0
        while pos < len(joined):
            part = joined[pos : pos + every - self._unjudged_labels]
            pos += len(part)
            self.accuracy.add(
                timestamp=np.array([j.timestamp for j in part]),
                delay=np.array([j.delay_seconds for j in part]),
                prediction=np.array([j.prediction for j in part]),
                label=np.array([j.label for j in part]),
            )
            self._unjudged_labels += len(part)
            self._unjudged_since = min(self._unjudged_since, min(j.timestamp for j in part))
            if self._unjudged_labels >= every:
                out.append(self._evaluate_labels())
        return out

    def flush_labels(self) -> LabelEvaluation | None:
        """An evaluation of the labels joined since the last one (None when there are none)."""
        return self._evaluate_labels() if self._unjudged_labels else None

    def _evaluate_labels(self) -> LabelEvaluation:
        evaluation = LabelEvaluation(
            model_version=self.reference.model_version, index=self.evaluation_index,
            start_time=self._unjudged_since, end_time=max(self.accuracy.newest_prediction_time, self._unjudged_since),
            new_labels=self._unjudged_labels, accuracy=self.accuracy.stats(), reference_id=self.reference.reference_id,
        )
        self.evaluation_index += 1
        self._unjudged_labels, self._unjudged_since = 0, math.inf
        return evaluation

    def close_if_idle(self, now: float) -> WindowSignals | None:
        """Close a window whose traffic stopped ``window.seconds`` of wall time ago."""
        w = self.window
        if w.rows >= self.config.window.min_rows and now - w.last_arrival >= self.config.window.seconds:
            return self._close()
        return None

    # -- closing ------------------------------------------------------------------------------

    def _close(self) -> WindowSignals | None:
        w = self.window
        if w.rows < 2:
            return None
        ref = self.reference
        sig = self.config.signals
        mmd = None
        if self.batch_mmd is not None and w.rows >= self.config.window.min_rows and w.sample.shape[0] >= 2:
            plan = self.batch_mmd.for_window(self.index, w.sample.shape[0])
            mmd = mmd_test(self.batch_mmd.ref, w.sample, plan=plan)
        online = self.online.status() if self.online is not None else _NO_ONLINE
        estimate = self.estimator.estimate(max_prob=w.max_prob, entropy=w.entropy, top_prob=w.top_prob,
                                           top_class=w.top_class, typical=w.typical, index=self.index)
        signals = WindowSignals(
            model_version=ref.model_version,
            index=self.index,
            start_time=w.start_time,
            end_time=w.end_time,
            rows=w.rows,
            activations=activation_stats(
                window_sum=w.feature_sum,
                window_sumsq=w.feature_sumsq,
                window_rows=w.rows,
                ref_mean=ref.feature_mean,
                ref_var=ref.feature_var,
                ref_rows=ref.rows_seen,
                alpha=sig.activations.alpha,
                top_k=sig.activations.top_k,
            ),
            predictions=prediction_stats(
                entropy=w.entropy, max_prob=w.max_prob, class_counts=w.class_counts, ref_class_counts=ref.class_counts,
                confusion=None if ref.estimators is None else ref.estimators.confusion,
                rng=np.random.default_rng([self.index, 0xC1A55]),  # the exact test (small counts), per window
            ),
            mmd=mmd,
            online=online,
            accuracy=self.accuracy.stats(),
            estimate=estimate,
            reference_id=ref.reference_id,
        )
        self.index += 1
        self.window = _Window.empty(ref.feature_dim, ref.n_classes, self.projected_dim)
        return signals

    # -- checkpoint ---------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        """Arrays (for an npz) and JSON-able metadata."""
        arrays: dict[str, np.ndarray] = {f"window.{k}": getattr(self.window, k) for k in _WINDOW_ARRAYS + _ESTIMATE_ARRAYS}
        arrays.update({f"accuracy.{k}": v for k, v in self.accuracy.state_dict().items()})
        if self.online is not None:
            arrays.update({f"online.{k}": np.asarray(v) for k, v in self.online.state_dict().items()})
        meta = {
            "reference_id": self.reference.reference_id,
            "index": self.index,
            "evaluation_index": self.evaluation_index,
            "unjudged_labels": self._unjudged_labels,
            "unjudged_since": self._unjudged_since if math.isfinite(self._unjudged_since) else None,
            "rng": self.rng.bit_generator.state,
            "window": {k: float(getattr(self.window, k)) for k in _WINDOW_SCALARS},
        }
        return arrays, meta

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        for k in _WINDOW_ARRAYS:
            setattr(self.window, k, arrays[f"window.{k}"])
        for k in _ESTIMATE_ARRAYS:
            empty = getattr(self.window, k)
            saved = arrays.get(f"window.{k}")
            if saved is not None and saved.shape[1:] == empty.shape[1:]:
                setattr(self.window, k, saved.astype(empty.dtype, copy=False))
        for k in _WINDOW_SCALARS:
            value = meta["window"][k]
            setattr(self.window, k, int(value) if k == "rows" else float(value))
        self.accuracy.load_state_dict({k[len("accuracy.") :]: v for k, v in arrays.items() if k.startswith("accuracy.")})
        online = {k[len("online.") :]: v for k, v in arrays.items() if k.startswith("online.")}
        if self.config.signals.online_mmd.enabled and online:
            try:
                self.online = OnlineMmd.from_state_dict(online)
            except ValueError as exc:  # e.g. state written by another driftd version
                log.warning("model_version %s: online detector state not restored (%s); recalibrating",
                            self.reference.model_version, exc)
                self.online = self._calibrate_online()
        self.index = int(meta["index"])
        self.evaluation_index = int(meta.get("evaluation_index", 0))  # absent in checkpoints before label time
        self._unjudged_labels = int(meta.get("unjudged_labels", 0))
        since = meta.get("unjudged_since")
        self._unjudged_since = math.inf if since is None else float(since)
        self.rng.bit_generator.state = meta["rng"]


_NO_ONLINE = OnlineMmdStatus(
    statistic=float("nan"), threshold=float("nan"), alarm=False, alarms_total=0, rows_since_reset=0, run_length_rows=None
)
