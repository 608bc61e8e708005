"""``driftd run``: the long-running process wiring engine, policy, retrain queue, HTTP and metrics.

Threads: the main thread waits for signals; APScheduler runs the ingest/evaluate cycle (one at a
time, coalesced) and the sd_notify watchdog on its default pool, and retrains on a one-worker
executor; the HTTP server has its own threads. The engine is only touched by the cycle job, which
also refreshes the snapshot that ``/metrics`` and ``/api/v1/status`` render, so a scrape never
waits on a cycle.

Signals: SIGTERM/SIGINT finish the current batch, checkpoint and exit 0 within
``scheduler.shutdown_grace_seconds`` (saying what could not be checkpointed, e.g. on a full
disk); SIGHUP re-reads the config (kept when invalid) and reloads references before the next cycle.

Start order: config and token, then the state directory's lock, then the HTTP port, so a second
daemon on the same state refuses before it listens. Health (``monitor.service.health``) is
progress: /healthz, /readyz and the watchdog fail once cycles stop getting work done.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from prometheus_client import CollectorRegistry

from monitor.config import Config, load_config
from monitor.errors import ConfigError, DriftdError, ReferenceMissingError
from monitor.ingest.store import claim_state_dir, classify_fault
from monitor.policy.decisions import Decision, ReferenceFacts, RetrainPlan, RetrainPreconditions
from monitor.policy.policy import Policy
from monitor.service.api import ApiServer
from monitor.service.config import HttpConfig, load_token
from monitor.service.health import Health
from monitor.service.metrics import Metrics, MetricsSnapshot, RetrainProgress
from monitor.service.notify import Notifier
from monitor.service.retrain_queue import JobRecord, RetrainQueue
from monitor.service.retrain_scheduler import EXECUTOR, JOBSTORE, DaemonScheduler, RetrainExecutor
from monitor.signals.results import LabelEvaluation, WindowSignals, signal_values, to_jsonable
from retrain.files import read_json, write_json_atomic
from retrain.launch.base import Launcher
from retrain.launch.choose import attach_external, make_launcher

log = logging.getLogger("driftd")

POLICY_STATE_FILE = "policy.json"


def build_version() -> str:
    from monitor import __version__

    return __version__


# http keys SIGHUP applies; every other http key (address, server bounds) needs a restart
_RELOADABLE_HTTP = ("token_file", "token_env")


def restart_keys(old: Config, new: Config) -> list[str]:
    """Keys that differ between two configs but only take effect after a restart."""
    keys = [f"http.{f.name}" for f in dataclasses.fields(HttpConfig)
            if f.name not in _RELOADABLE_HTTP and getattr(old.service.http, f.name) != getattr(new.service.http, f.name)]
    for f in dataclasses.fields(old.monitor):
        if getattr(old.monitor, f.name) != getattr(new.monitor, f.name):
            keys.append(f.name)
    return keys


class Daemon:
    """One driftd process. ``serve()`` blocks until SIGTERM/SIGINT and returns the exit code."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: str,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] = os.environ,
        notifier: Notifier | None = None,
        launcher: Launcher | None = None,
    ):
        self.config = config
        self.config_path = config_path
        self.clock = clock
        self.environ = environ
        self._token = load_token(config.service.http, environ)  # ConfigError (exit 2) before binding
        self.registry = registry if registry is not None else CollectorRegistry()
        self.notifier = notifier if notifier is not None else Notifier.from_env(environ)
        self._launcher = launcher if launcher is not None else make_launcher(config_path, lambda: self.config)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._hup = threading.Event()
        self._reload_refs = threading.Event()
        self._ready = False
        self._job_errors: Counter[str] = Counter()
        self._last_cycle: dict[str, Any] | None = None
        self._refs: dict[str, dict[str, Any]] = {}
        self._current_version: str | None = None
        self._served: set[str] = set()      # versions the rules judge (see _served_versions)
        self._shown: tuple[str, ...] = ()   # versions status and metrics show
        self.started_at = clock()
        self.policy = Policy(config.policy)
        self._load_policy_state()
        self._snap = MetricsSnapshot(model=config.monitor.model, build_version=build_version())
        self.metrics = Metrics(config.monitor.model, self.registry, self.metrics_snapshot)
        self.engine: Any = None
        self.scheduler: DaemonScheduler | None = None
        self.queue: RetrainQueue | None = None
        self.health = Health(config.service.scheduler.unhealthy_after_seconds, clock=clock)
        # The state directory's lock before the port: a second daemon on this state must refuse
        # without ever listening (the engine's StateStore adopts this claim when it opens).
        self._claim = claim_state_dir(config.monitor.state_dir)
        try:
            self.api = ApiServer(config.service.http, backend=self, registry=self.registry, token=lambda: self._token)
        except BaseException:
            self._claim.release()
            raise

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Serve HTTP, load references and state, start the scheduler (first cycle runs at once)."""
        from monitor.engine.cycle import Engine

        cfg = self.config
        self.api.start()
        log.info("driftd %s listening on %s (model %s)", build_version(), cfg.service.http.url, cfg.monitor.model)
        if self._token is None:
            log.warning("no control token configured: POST /api/v1/retrain is open to local users of this host")
        self.notifier.status("loading references")
        self.engine = Engine(cfg.monitor, clock=self.clock)
        self.engine.store.add_commit_listener(self.health.progress)  # a committed checkpoint is progress
        self.health.restart_clock()
        self._current_version = self._read_current_version()
        self._refresh_snapshot(None)
        state_dir = cfg.monitor.state_dir
        grace = cfg.service.scheduler.shutdown_grace_seconds
        self.queue = RetrainQueue(
            state_dir / "retrain", launcher=self._launcher, poll_seconds=cfg.service.scheduler.retrain_poll_seconds,
            grace_seconds=max(0.1, grace / 2), stop=self._stop, on_finish=self._retrain_finished,
            on_error=lambda: self.count_error("retrain"), attach=attach_external, clock=self.clock,
            current_version=self._read_current_version,
        )
        self.scheduler = DaemonScheduler(
            jobstores={"default": MemoryJobStore(), JOBSTORE: SQLAlchemyJobStore(url=f"sqlite:///{state_dir / 'scheduler.db'}")},
            executors={"default": ThreadPoolExecutor(4), EXECUTOR: RetrainExecutor(self.queue.run)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=dt.timezone.utc,
        )
        self.queue.scheduler = self.scheduler
        self.scheduler.start(paused=True)
        self.queue.recover()
        now = dt.datetime.now(dt.timezone.utc)
        self.scheduler.add_job(self._cycle_job, "interval", seconds=cfg.service.scheduler.interval_seconds,
                               id="cycle", name="ingest/evaluate cycle", next_run_time=now)
        interval = self.notifier.watchdog_interval
        if interval is not None:
            self.scheduler.add_job(self._watchdog, "interval", seconds=interval, id="watchdog",
                                   name="sd_notify watchdog", next_run_time=now)
        self.scheduler.resume()

    def serve(self) -> int:
        """Start, then wait for signals; returns the exit code (0 on a clean stop)."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            try:
                self.start()
            except BaseException:
                self._abandon_start()
                raise
            while not self._stop.wait(0.2):
                if self._hup.is_set():
                    self._hup.clear()
                    self.reload()
            return self.shutdown()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _abandon_start(self) -> None:
        """Start-up failed: free the port and the state directory for the next attempt."""
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if self.engine is not None:
            self.engine.close()
        self.api.close()
        self._claim.release()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            self._hup.set()
        else:
            log.info("%s received: finishing the current batch, then exiting", signal.Signals(signum).name)
            self._stop.set()

    def shutdown(self) -> int:
        """Stop within the grace period: current batch checkpointed, retrain subprocess terminated.

        Exit 0 even when a part could not be checkpointed (a full disk): what was committed
        before stays, the rows after it are read again at the next start, and the log says so.
        """
        with self._lock:
            self._stop.set()
            self.notifier.stopping()
        grace = self.config.service.scheduler.shutdown_grace_seconds
        code = 0
        if self.scheduler is not None:
            self.scheduler.pause()  # hand no further job to an executor that is shutting down
            stopper = threading.Thread(target=self.scheduler.shutdown, kwargs={"wait": True}, daemon=True)
            stopper.start()
            stopper.join(grace)
            if stopper.is_alive():
                log.error("shutdown grace (%ss) exceeded: a job did not stop in time; state after the last checkpoint is kept", grace)
                code = 1
        not_saved: list[str] = []
        with self._lock:
            try:
                self._save_policy_state()
            except OSError as exc:
                not_saved.append(f"the policy state ({self._policy_path()}: {exc.strerror or exc})")
        failure = self.health.failure
        if failure is not None:
            not_saved.append(f"the rows read since the last checkpoint ({failure.count} cycle(s) failed since "
                             f"{_iso(failure.since)}: {failure.fault.message})")
        if self.engine is not None and code == 0:
            try:
                self.engine.close()
            except Exception as exc:  # closing only rolls back; a fault here loses nothing committed
                not_saved.append(f"the checkpoint's clean close ({type(exc).__name__}: {exc})")
        self.api.close()
        self._claim.release()
        if not_saved:
            log.error("stopping without checkpointing %s; everything committed before is kept and the rows after it "
                      "are read again, exactly once, at the next start", "; ".join(not_saved))
        log.info("driftd stopped")
        return code

    def reload(self) -> bool:
        """SIGHUP: re-read and validate the config; on any error keep the running one."""
        try:
            new = load_config(self.config_path)
            token = load_token(new.service.http, self.environ)
        except ConfigError as exc:
            log.error("SIGHUP: config reload failed, keeping the running configuration: %s", exc)
            return False
        keys = restart_keys(self.config, new)
        if keys:
            log.warning("SIGHUP: %s changed; these take effect only after a restart (running values kept)", ", ".join(keys))
        with self._lock:
            if new.policy != self.config.policy:
                policy = Policy(new.policy)
                policy.load_state_dict(self.policy.state_dict())
                self.policy = policy
            self._token = token
            old_interval = self.config.service.scheduler.interval_seconds
            self.config = dataclasses.replace(
                new, monitor=self.config.monitor, service=dataclasses.replace(new.service, http=self.config.service.http)
            )
        interval = new.service.scheduler.interval_seconds
        if self.scheduler is not None and interval != old_interval:
            self.scheduler.reschedule_job("cycle", trigger="interval", seconds=interval)
        self._reload_refs.set()
        log.info("SIGHUP: configuration reloaded from %s; references reload before the next cycle", self.config_path)
        return True

    def _watchdog(self) -> None:
        """WATCHDOG=1 only while healthy (the /healthz rule: cycles make progress), so systemd
        restarts a driftd whose cycles stopped getting work done; the log says why once."""
        ok, _ = self.healthy()
        if ok:
            self.notifier.watchdog()

    # -- the cycle job -----------------------------------------------------------------------------
    def _cycle_job(self) -> None:
        try:  # the one catch point of the cycle job
            self.health.cycle_started()
            self._cycle()
        except Exception as exc:
            self.count_error("cycle")
            self._cycle_failed(exc)
        else:
            last = self._last_cycle
            backlog = last is None or bool(last["stopped_early"]) or last["lag_seconds"] > 0
            ended = self.health.cycle_succeeded(backlog=backlog)
            if ended is not None:
                log.info("ingest/evaluate cycle succeeded again after %d failed cycle(s) since %s (%s)",
                         ended.count, _iso(ended.since), ended.fault.kind)

    def _cycle_failed(self, exc: Exception) -> None:
        """Log a failure once per state (a full disk fails every cycle until space returns)."""
        interval = self.config.service.scheduler.interval_seconds
        fault = classify_fault(exc, self.config.monitor.state_dir)
        state, new = self.health.cycle_failed(fault)
        if not new:
            log.debug("ingest/evaluate cycle failed again (%d since %s): %s", state.count, _iso(state.since), fault.message)
        elif fault.is_state_fault:
            log.error("ingest/evaluate cycle failed: %s; retrying every %ss (logged again when this changes)",
                      fault.message, interval)
        else:
            log.exception("ingest/evaluate cycle failed; retrying in %ss", interval)

    def _cycle(self) -> None:
        engine = self.engine
        if self._reload_refs.is_set():
            self._reload_refs.clear()
            try:
                engine.reload_references()
            except ReferenceMissingError as exc:
                log.error("references not reloaded: %s", exc)
        report = engine.run_cycle(should_stop=self._stop.is_set, on_checkpoint=self._on_checkpoint)
        self.metrics.observe_cycle(report.finished_at - report.started_at, (j.delay_seconds for j in report.joined))
        now = self.clock()
        # Every closed window and label evaluation the policy has not acted on: this cycle's, and
        # any committed by a previous run that stopped before its policy state was saved.
        windows = engine.pending_windows()
        evaluations = engine.pending_evaluations()
        with self._lock:
            self._follow_versions()
            for window in windows:
                if self.policy.is_new(window):
                    self._judge(window)
            for evaluation in evaluations:
                if self.policy.is_new_evaluation(evaluation):
                    self._judge(evaluation)
            self._resolve_retrains(now)
            self._save_policy_state()
            self._last_cycle = {
                "started_at": report.started_at, "finished_at": report.finished_at, "rows": report.rows,
                "files": report.files, "windows": len(report.windows), "label_evaluations": len(report.evaluations),
                "lag_seconds": report.lag_seconds, "stopped_early": report.stopped_early,
                "event_time": report.watermark,
            }
            self._refresh_snapshot(report)
        engine.acknowledge(windows, evaluations)  # durable with the next checkpoint; the policy state already is
        status = f"last cycle: {report.rows} rows, {len(report.windows)} windows, lag {report.lag_seconds:.0f}s"
        with self._lock:  # shutdown() sets the stop flag and sends STOPPING=1 under this lock
            if self._stop.is_set():
                return  # after STOPPING=1 the supervisor hears nothing more from the cycle
            if not self._ready and not report.stopped_early:
                self._ready = True
                log.info("ready: %d reference(s) loaded, first scan done (%d rows)", len(engine.references), report.rows)
                self.notifier.ready(f"ready; {status}")
            else:
                self.notifier.status(status)

    def _on_checkpoint(self) -> None:
        """Mid-cycle commit (a long file): let /metrics show the rows counted so far."""
        counters = self.engine.counters()
        with self._lock:
            self._snap = dataclasses.replace(self._snap, counters=counters)

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

    # -- state --------------------------------------------------------------------------------------
    def _policy_path(self) -> Path:
        return self.config.monitor.state_dir / POLICY_STATE_FILE

    def _load_policy_state(self) -> None:
        path = self._policy_path()
        if path.exists():
            state = read_json(path)
            if state is None:
                log.error("%s is unreadable; starting with no alarms (it is rewritten after the next cycle)", path)
                return
            self.policy.load_state_dict(state)  # StateError (exit 1) names the file and the fix

    def _save_policy_state(self) -> None:
        self.config.monitor.state_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._policy_path(), self.policy.state_dict())

    def _read_current_version(self) -> str | None:
        registry_dir = Path(self.config.retrain.registry_dir)
        if not registry_dir.exists():
            return None
        try:
            from retrain.registry import Registry

            current = Registry(registry_dir).current()
        except Exception as exc:  # a broken registry must not stop monitoring
            log.warning("cannot read the current model version from %s: %s", registry_dir, exc)
            return None
        return None if current is None else current.version

    def _retrain_finished(self, rec: JobRecord, duration: float) -> None:
        outcome = None if rec.result is None else rec.result.outcome
        if outcome != "dropped":  # a dropped job never ran
            self.metrics.retrain_duration.observe(max(0.0, duration))
        if outcome == "promoted":
            self._reload_refs.set()  # the job writes the new version's reference; the cycle loads it

    def count_error(self, job: str) -> None:
        with self._lock:
            self._job_errors[job] += 1

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
        return to_jsonable({
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

    def retrain_info(self, job_id: str) -> dict[str, Any] | None:
        info = None if self.queue is None else self.queue.get(job_id)
        return None if info is None else to_jsonable(info)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _gauge_value(v: Any) -> float:
    """A progress line's value as a gauge reading: the number, NaN when absent or not a number."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
