"""Accuracy on delayed labels: the last N labels, the last T seconds, per-class recall, label delay.

Labels join predictions long after the window that held them closed, so this tracker is fed
joined labels as they arrive and summarised whenever a window closes. "Last T seconds" is
measured against the newest prediction time seen (event time), so replaying logs gives the
same numbers as watching them live.
"""

from __future__ import annotations

import numpy as np

from monitor.signals.results import AccuracyStats

_FIELDS = ("timestamp", "delay", "prediction", "label")


class AccuracyTracker:
    """Bounded history of joined labels for one model_version."""

    def __init__(self, *, last_n: int, last_seconds: float, max_history: int = 200_000):
        self.last_n = last_n
        self.last_seconds = last_seconds
        self.max_history = max(max_history, last_n)
        self.timestamp = np.zeros(0, dtype=np.float64)   # prediction time
        self.delay = np.zeros(0, dtype=np.float64)       # labeled_at - prediction time
        self.prediction = np.zeros(0, dtype=np.int64)
        self.label = np.zeros(0, dtype=np.int64)
        self.newest_prediction_time = -np.inf

    def add(self, timestamp: np.ndarray, delay: np.ndarray, prediction: np.ndarray, label: np.ndarray) -> None:
        """Append joined labels in arrival order."""
        self.timestamp = np.concatenate([self.timestamp, np.asarray(timestamp, dtype=np.float64)])
        self.delay = np.concatenate([self.delay, np.asarray(delay, dtype=np.float64)])
        self.prediction = np.concatenate([self.prediction, np.asarray(prediction, dtype=np.int64)])
        self.label = np.concatenate([self.label, np.asarray(label, dtype=np.int64)])
        self._trim()

    def observe_predictions(self, newest_timestamp: float) -> None:
        """Advance event time with the newest prediction seen (labelled or not)."""
        self.newest_prediction_time = max(self.newest_prediction_time, float(newest_timestamp))

    def _trim(self) -> None:
        keep = self.timestamp.size
        cutoff = self.newest_prediction_time - self.last_seconds
        # Keep the last N whatever their age, and anything young enough for the time window.
        young = self.timestamp >= cutoff
        mask = young.copy()
        mask[max(0, keep - self.last_n):] = True
        if keep > self.max_history:
            mask[: keep - self.max_history] = False
        if not mask.all():
            for name in _FIELDS:
                setattr(self, name, getattr(self, name)[mask])

    def stats(self) -> AccuracyStats:
        self._trim()
        n_total = self.label.size
        last = slice(max(0, n_total - self.last_n), n_total)
        hits = self.prediction == self.label
        recent = self.timestamp >= self.newest_prediction_time - self.last_seconds
        recall: dict[int, float] = {}
        labels_n = self.label[last]
        hits_n = hits[last]
        for cls in np.unique(labels_n):
            of_cls = labels_n == cls
            recall[int(cls)] = float(hits_n[of_cls].mean())
        delays = self.delay[last]
        return AccuracyStats(
            accuracy_last_n=float(hits_n.mean()) if hits_n.size else None,
            labels_last_n=int(hits_n.size),
            accuracy_last_seconds=float(hits[recent].mean()) if recent.any() else None,
            labels_last_seconds=int(recent.sum()),
            per_class_recall=recall,
            label_delay_p50_seconds=float(np.quantile(delays, 0.5)) if delays.size else None,
            label_delay_p90_seconds=float(np.quantile(delays, 0.9)) if delays.size else None,
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {name: getattr(self, name) for name in _FIELDS}
        state["newest_prediction_time"] = np.array(self.newest_prediction_time)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for name in _FIELDS:
            setattr(self, name, np.asarray(state[name]))
        self.newest_prediction_time = float(state["newest_prediction_time"])
