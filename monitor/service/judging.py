"""The daemon acting on the policy: which versions are judged, the decisions on each closed window
and label evaluation, and the retrains they queue or join (also a retrain asked for through the API).

A mixin of :class:`monitor.service.daemon.Daemon`, apart from its lifecycle (start, cycle,
reload, shutdown) because it is the one place that turns decisions into actions. It runs on the
cycle thread under the daemon's lock, except :meth:`Judging.request_retrain` (HTTP threads).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from monitor.errors import DriftdError
from monitor.policy.decisions import ReferenceFacts, RetrainPreconditions
from monitor.signals.results import LabelEvaluation, WindowSignals

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable

    from monitor.config import Config
    from monitor.policy.decisions import Decision, RetrainPlan
    from monitor.policy.policy import Policy
    from monitor.service.retrain_queue import RetrainQueue

log = logging.getLogger("driftd")


class Judging:
    """Served versions, judging and retrain requests; the state it uses is the Daemon's."""

    config: Config
    clock: Callable[[], float]
    engine: Any
    policy: Policy
    queue: RetrainQueue | None
    _lock: threading.RLock
    _current_version: str | None
    _served: set[str]
    _read_current_version: Callable[[], str | None]  # the Daemon's (state)
    _save_policy_state: Callable[[], None]

    # -- versions -----------------------------------------------------------------------------------
    def _follow_versions(self) -> None:
        """Which versions the rules judge, and retire the rest (cycle thread, under the lock).

        With a registry, the served version is CURRENT: when it changes (promotion, rollback,
        `driftd models promote`) every other version is retired at once, even while its last
        rows still arrive, so a replaced model never pages. Without one, a version is retired
        when another one's rows started after its last row (the traffic moved over) or when it
        has had no rows for window.seconds of event time. Retiring clears its alarms, streaks and
        pending retrain, with one log line."""
        current = self._read_current_version()
        if current != self._current_version and self._current_version is not None:
            log.info("CURRENT changed from %s to %s", self._current_version, current)
        self._current_version = current
        self._served = self._served_versions()
        for version in sorted(self.policy.versions() - self._served):
            was = self.policy.retire(version)
            if was:
                log.info("model_version %s is no longer served (%s): cleared its alarms and pending retrain (%s)",
                         version, f"CURRENT is {current}" if current is not None else "its traffic moved on or stopped",
                         ", ".join(was))

    def _served_versions(self) -> set[str]:
        if self._current_version is not None:
            return {self._current_version}
        times, mark = self.engine.version_times, self.engine.watermark
        idle = self.config.monitor.window.seconds
        return {v for v, (_, last) in times.items()
                if not any(first > last for w, (first, _) in times.items() if w != v)
                and (mark is None or mark - last <= idle)}

    def _shown_versions(self) -> tuple[str, ...]:
        """Versions status and metrics show: served ones, ones with rows within window.seconds of
        event time, and references not seen in the logs yet. A retired version drops out once its
        rows have stopped for window.seconds."""
        engine = self.engine
        times, mark = engine.version_times, engine.watermark
        recent = {v for v, (_, last) in times.items() if mark is None or mark - last <= self.config.monitor.window.seconds}
        unseen = {v for v in engine.references if v not in times}
        current = {self._current_version} if self._current_version is not None else set()
        return tuple(sorted(self._served | recent | unseen | current))

    # -- judging ------------------------------------------------------------------------------------
    def _judge(self, item: WindowSignals | LabelEvaluation) -> None:
        if item.model_version not in self._served:
            log.debug("not judging %s of model_version %s: it is not served", type(item).__name__, item.model_version)
            return
        facts = self._reference_facts(item.model_version, item)
        if isinstance(item, WindowSignals):
            decisions = self.policy.evaluate(item, reference=facts)
        else:
            decisions = self.policy.evaluate_labels(item, reference=facts)
        for decision in decisions:
            if decision.outcome != "ask":  # asks are logged once resolved, with what happens next
                self._log_decision(decision)

    def _resolve_retrains(self, now: float) -> None:
        engine, rc = self.engine, self.config.retrain
        mark = engine.watermark
        pre = RetrainPreconditions(
            labelled=lambda after, since, version: engine.count_labelled(after_join=after, predicted_since=since,
                                                                         model_version=version),
            min_labelled_rows=rc.min_labelled_rows, join_seq=engine.join_seq, active_job_id=self.queue.active_job_id(),
            lookback_start=None if mark is None else mark - rc.lookback_seconds,
            served=lambda version: version in self._served,
        )
        decisions, plan = self.policy.resolve(now=now, pre=pre)
        job_id = None
        if plan is not None:
            job_id = self._submit(plan, now, pre.join_seq)
        joined: dict[str, list[dict[str, Any]]] = {}
        for d in decisions:
            self._log_decision(d, job_id)
            # record on the job it joined: the one queued now, the one already running, or the
            # one whose cooldown holds it back
            if d.outcome == "joined":
                target = job_id if plan is not None and d.model_version == plan.model_version else pre.active_job_id
            elif d.outcome == "cooldown":
                target = self.policy.last_job.get(d.model_version)
            else:
                target = None
            if target is not None:
                joined.setdefault(target, []).append({**dataclasses.asdict(d), "at": now})
        for target, items in joined.items():
            self.queue.note_joined(target, items)

    def _submit(self, plan: RetrainPlan, now: float, join_seq: int) -> str:
        window = self.engine.latest_windows().get(plan.model_version)
        monitor = {
            "rules": list(plan.rules), "onset": plan.onset, "label_free": plan.label_free,
            # the monitor's own measure of the shift, for the job's strategy: the share of dims whose
            # mean moved by more than half a standard deviation (the scale the strategy is tuned on)
            "domain_gap": None if window is None else window.activations.share_large_shift,
            "share_significant": None if window is None else window.activations.share_significant,
            "mmd2": None if window is None or window.mmd is None else window.mmd.mmd2,
            "event_time": self.engine.watermark,
        }
        job_id = self.queue.submit(plan.reason(), source=f"rule:{plan.rules[0]}", model_version=plan.model_version,
                                   monitor=monitor)
        self.policy.note_retrain(plan.model_version, now=now, join_seq=join_seq, job_id=job_id)
        return job_id

    def _log_decision(self, d: Decision, job_id: str | None = None) -> None:
        if d.outcome == "cleared":
            log.info(d.message())
        else:
            log.warning(d.message(job_id))

    def _reference_facts(self, version: str, item: WindowSignals | LabelEvaluation) -> ReferenceFacts | None:
        ref = self.engine.references.get(version)
        if ref is not None and ref.accuracy is not None:
            return ReferenceFacts(float(ref.accuracy), int(ref.labelled_rows))
        if isinstance(item, WindowSignals) and item.estimate is not None:
            return ReferenceFacts(item.estimate.reference_accuracy)
        return None

    def request_retrain(self, reason: str) -> dict[str, Any]:
        """Queue a retrain of the served version, or join the one already queued or running (one
        retrain at a time: a second job would retrain the same data, or a version that the first
        is about to replace). Returns ``{"job_id", "joined"}``."""
        if self.queue is None:
            raise DriftdError("driftd is still starting; retry in a few seconds")
        active = self.queue.active_job_id()
        if active is not None:
            self.queue.note_joined(active, [{"source": "api", "reason": reason, "outcome": "joined", "at": self.clock()}])
            log.info("retrain requested through the API (%s): joined job %s, already queued or running", reason, active)
            return {"job_id": active, "joined": True}
        with self._lock:
            served = sorted(self._served)
            version = self._current_version or (served[-1] if len(served) == 1 else None)
            join_seq = self.engine.join_seq
        job_id = self.queue.submit(reason, source="api", model_version=version,
                                   monitor={"event_time": self.engine.watermark})
        with self._lock:
            if version is not None:
                self.policy.note_retrain(version, now=self.clock(), join_seq=join_seq, job_id=job_id)
            self._save_policy_state()
        return {"job_id": job_id, "joined": False}
