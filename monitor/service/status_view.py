"""What the daemon shows: ``GET /api/v1/status``, ``/metrics``' snapshot, ``/healthz`` and ``/readyz``.

A mixin of :class:`monitor.service.daemon.Daemon`, apart from its lifecycle because these are
views: HTTP threads call them, and they only read what the cycle thread copied out of the
engine (:meth:`StatusView._refresh_snapshot`) under the daemon's lock, so a scrape never waits
on a cycle.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any

from monitor.policy.decisions import ReferenceFacts
from monitor.service.metrics import MetricsSnapshot, RetrainProgress
from monitor.signals.results import signal_values, to_json

if TYPE_CHECKING:
    import threading
    from collections import Counter
    from collections.abc import Callable

    from monitor.config import Config
    from monitor.policy.policy import Policy
    from monitor.service.health import Health
    from monitor.service.retrain_queue import RetrainQueue

log = logging.getLogger("driftd")


class StatusView:
    """The daemon's read-only views and the snapshot they render; the state is the Daemon's."""

    config: Config
    engine: Any
    policy: Policy
    queue: RetrainQueue | None
    scheduler: Any
    health: Health
    started_at: float
    _lock: threading.RLock
    _stop: threading.Event
    _ready: bool
    _snap: MetricsSnapshot
    _job_errors: Counter[str]
    _last_cycle: dict[str, Any] | None
    _refs: dict[str, dict[str, Any]]
    _current_version: str | None
    _served: set[str]
    _shown: tuple[str, ...]
    _shown_versions: Callable[[], tuple[str, ...]]  # Judging's

    # -- views (HTTP threads) -------------------------------------------------------------------------
    def metrics_snapshot(self) -> MetricsSnapshot:
        queue = self.queue
        with self._lock:
            snap, errors, deferred = self._snap, dict(self._job_errors), self.policy.deferred_total
        if queue is None:
            return dataclasses.replace(snap, job_errors=errors)
        running = queue.running()
        progress = RetrainProgress()
        if running is not None:
            p = running.progress
            progress = RetrainProgress(_gauge_value(p.get("epoch")), _gauge_value(p.get("grad_norm")),
                                       _gauge_value(p.get("weight_drift")))
        last_promotion = queue.last_promotion()
        return dataclasses.replace(
            snap, job_errors=errors, retrain_runs={**queue.outcome_counts(), "deferred": float(deferred)},
            retrain_in_progress=queue.active_job_id() is not None, progress=progress,
            last_promotion=math.nan if last_promotion is None else last_promotion,
            current_version=self._current_version,
        )

    def healthy(self) -> tuple[bool, str]:
        """``/healthz``: progress (see monitor.service.health); logs the turn to unhealthy once."""
        if self._stop.is_set():
            return False, "stopping"
        if self.scheduler is None or not self.scheduler.running:
            return False, "loading references" if self.engine is None else "scheduler not running"
        verdict, turned = self.health.check()
        if turned:
            log.error("unhealthy (/healthz 503, no WATCHDOG=1): %s", verdict.reason)
        return verdict.healthy, verdict.reason

    def ready(self) -> tuple[bool, str]:
        if self.engine is None:
            return False, "loading references"
        ok, why = self.healthy()
        if not self._ready:
            return False, "first scan not finished" + ("" if ok else f"; {why}")
        return (True, f"ready ({why})") if ok else (False, f"not ready: {why}")

    def health_view(self) -> dict[str, Any]:
        """The ``health`` block of ``GET /api/v1/status``."""
        ok, why = self.healthy()
        failure = self.health.failure
        return {
            "healthy": ok, "reason": why,
            "unhealthy_after_seconds": self.health.unhealthy_after,
            "last_success": self.health.last_success,
            "failure": None if failure is None else {
                "kind": failure.fault.kind, "message": failure.fault.message, "since": failure.since,
                "failed_cycles": failure.count},
        }

    def status(self) -> dict[str, Any]:
        """The JSON of ``GET /api/v1/status``: one view derived from the typed objects."""
        with self._lock:
            snap, policy, last_cycle, refs = self._snap, self.policy, self._last_cycle, dict(self._refs)
            shown = set(self._shown)
            alarms = [a for a in policy.active() if a["model_version"] in shown]
            rules = [dataclasses.asdict(r) for r in policy.config.rules]
            pending = policy.pending()
            cooldown_until, deferred = dict(policy.cooldown_until), policy.deferred_total
            job_errors = dict(self._job_errors)
        versions: dict[str, Any] = {}
        for mv in sorted(shown):
            window = snap.windows.get(mv)
            active = {a["rule"] for a in alarms if a["model_version"] == mv}
            signals: dict[str, Any] = {}
            if window is not None:
                for name, value in signal_values(window).items():
                    signals[name] = {"value": value, "rules": [
                        {"rule": r.name, "op": r.op, "threshold": snap.thresholds.get((r.name, mv), math.nan),
                         "action": r.action, "alarm": r.name in active}
                        for r in policy.config.rules if r.signal == name
                    ]}
            versions[mv] = {"reference": refs.get(mv), "signals": signals, "window": window,
                            "served": mv in self._served}
        queue = self.queue
        first = pending[0] if pending else None
        return to_json({
            "model": self.config.monitor.model,
            "current_version": self._current_version,
            "build_version": snap.build_version,
            "ready": self._ready,
            "health": self.health_view(),
            "started_at": self.started_at,
            "event_time": snap.watermark,
            "last_cycle": last_cycle,
            "versions": versions,
            "alarms": alarms,
            "rules": rules,
            "policy": {"cooldown_seconds": policy.config.cooldown_seconds, "cooldown_until": cooldown_until,
                       # "pending": the first version's ask, one line (kept for older clients)
                       "pending": None if first is None else {"rule": ", ".join(first["rules"]), **first},
                       "pending_retrains": pending, "deferred_total": deferred,
                       "default_rules": policy.config.default_rules},
            "labels": {"pending_predictions": snap.pending_predictions, "pending_labels": snap.pending_labels},
            "retrain": None if queue is None else {**queue.summary(), "counts": queue.outcome_counts()},
            "job_errors": job_errors,
        })

    def retrain_info(self, job_id: str) -> dict[str, Any] | None:
        info = None if self.queue is None else self.queue.get(job_id)
        return None if info is None else to_json(info)

    # -- the snapshot (cycle thread) ------------------------------------------------------------------
    def _refresh_snapshot(self, report: Any) -> None:
        """Cycle thread only: copy what scrapes and status need out of the engine."""
        engine = self.engine
        shown = self._shown_versions() if report is not None else tuple(sorted(engine.references))
        self._shown = shown
        ref_acc = {mv: (None if r.accuracy is None else float(r.accuracy)) for mv, r in engine.references.items()}
        facts = {mv: ReferenceFacts(float(r.accuracy), int(r.labelled_rows)) for mv, r in engine.references.items()
                 if r.accuracy is not None}
        self._refs = {mv: {"reference_id": r.reference_id, "accuracy": ref_acc[mv], "labelled_rows": r.labelled_rows,
                           "created_at": r.created_at, "feature_dim": r.feature_dim, "n_classes": r.n_classes}
                      for mv, r in engine.references.items()}
        pending_predictions, pending_labels = engine.pending_counts()
        self._snap = dataclasses.replace(
            self._snap,
            counters=engine.counters(),
            model_versions=shown,
            reference_accuracy={mv: ref_acc.get(mv) for mv in shown},
            windows={mv: w for mv, w in engine.latest_windows().items() if mv in shown},
            lag_seconds=math.nan if report is None else report.lag_seconds,
            last_success=self._snap.last_success if report is None else report.finished_at,
            alarms=self.policy.alarm_states(shown),
            thresholds=self.policy.thresholds(facts, shown),
            breaches={k: float(v) for k, v in self.policy.breaches.items()},
            top_k=self.config.monitor.signals.activations.top_k,
            watermark=math.nan if engine.watermark is None else engine.watermark,
            pending_predictions=float(pending_predictions),
            pending_labels=float(pending_labels),
            on_promote=self._on_promote_counts(),
        )

    def _on_promote_counts(self) -> dict[tuple[str, str], float]:
        """retrain.on_promote runs, counted in the registry (the job and the CLI run the hooks)."""
        from retrain.hooks import read_counts
        from retrain.registry import RegistryError

        try:
            return {k: float(v) for k, v in read_counts(self.config.retrain.registry_dir).items()}
        except RegistryError as exc:
            log.warning("cannot read the on_promote counts: %s", exc)
            return dict(self._snap.on_promote)


def _gauge_value(v: Any) -> float:
    """A progress line's value as a gauge reading: the number, NaN when absent or not a number."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
