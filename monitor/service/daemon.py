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

This module is the lifecycle (start, the cycle job, reload, shutdown, persisted state); what the
daemon shows is monitor.service.status_view, how it acts on the policy's decisions
monitor.service.judging (both mixins of :class:`Daemon`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
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
from monitor.errors import ConfigError, ReferenceMissingError
from monitor.ingest.claim import claim_state_dir
from monitor.ingest.faults import classify_fault
from monitor.policy.policy import Policy
from monitor.service.http_server import ApiServer
from monitor.service.config import HttpConfig, load_token
from monitor.service.health import Health
from monitor.service.judging import Judging
from monitor.service.metrics import Metrics, MetricsSnapshot
from monitor.service.notify import Notifier
from monitor.service.retrain_queue import JobRecord, RetrainQueue
from monitor.service.retrain_scheduler import EXECUTOR, JOBSTORE, DaemonScheduler, RetrainExecutor
from monitor.service.status_view import StatusView
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


class Daemon(StatusView, Judging):
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


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
