"""The daemon's retrain queue: requests persisted as job directories, run one at a time by APScheduler.

The APScheduler side (the daemon's scheduler, the one-worker executor) is monitor.service.retrain_scheduler.

Each request gets a unique id and a directory ``<state_dir>/retrain/<id>/`` holding
``request.json`` (written here), and ``progress.jsonl`` / ``result.json`` (written by the job;
the files and their types are ``retrain.jobdir``'s). The APScheduler job (id
``retrain-<id>-a<attempt>``, SQLite job store, ``misfire_grace_time=None``) is what runs it; it
is never re-added blindly. A directory with a request but no result and no stored entry for its
next attempt was interrupted by a restart: it is re-queued at start-up as a new attempt (an
entry left for the interrupted attempt is removed), and says so in the log and in its status. A job that
outlives the daemon (a Kubernetes Job: its handle has an ``external_ref``) is left running at
shutdown and re-attached at the next start instead.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apscheduler.schedulers.base import BaseScheduler

from monitor.service.retrain_scheduler import EXECUTOR, JOBSTORE
from retrain.jobdir import JobRequest, last_progress, read_request, read_result_if_valid, write_request, write_result
from retrain.launch.base import Attacher, JobHandle, Launcher
from retrain.result import JobResult

log = logging.getLogger(__name__)

OUTCOMES = ("promoted", "rejected", "failed", "dropped")  # dropped: its model_version was no longer CURRENT
MAX_ATTEMPTS = 3  # a job interrupted this often is recorded as failed rather than re-run forever


def _entry_id(job_id: str, attempt: int) -> str:
    """The scheduler entry that runs ``attempt`` of a job (one entry per attempt, never reused)."""
    return f"retrain-{job_id}-a{attempt}"


def run_queued_retrain(job_id: str) -> None:
    """Importable target stored with each persisted retrain job.

    :class:`RetrainExecutor` runs the job through the daemon's :class:`RetrainQueue` instead of
    calling this; reaching it means the job was given to another executor, which is a bug.
    """
    raise RuntimeError(f"retrain job {job_id} must run on the daemon's {EXECUTOR!r} executor")


@dataclass
class JobRecord(JobRequest):
    """What the daemon knows about one retrain request (the status API's view): its request
    (request.json) and what the daemon follows of it."""

    state: str = "queued"            # queued | running | finished
    resumed: bool = False            # re-queued after a restart interrupted it
    result: JobResult | None = None
    progress: dict[str, Any] = field(default_factory=dict)  # last progress line of the job

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "reason": self.reason, "source": self.source, "state": self.state,
            "requested_at": self.requested_at, "started_at": self.started_at, "attempts": self.attempts,
            "resumed": self.resumed, "external": self.external, "outcome": None if self.result is None else self.result.outcome,
            "result": None if self.result is None else self.result.to_json(), "progress": self.progress,
            "model_version": self.model_version, "monitor": self.monitor, "joined": self.joined,
        }


class RetrainQueue:
    """Submits, runs and reports retrain jobs. Thread-safe; ``run`` executes on the retrain executor."""

    def __init__(
        self,
        root: Path,
        *,
        launcher: Launcher,
        poll_seconds: float,
        grace_seconds: float,
        stop: threading.Event,
        on_finish: Callable[[JobRecord, float], None],
        on_error: Callable[[], None],
        attach: Attacher | None = None,
        clock: Callable[[], float] = time.time,
        current_version: Callable[[], str | None] = lambda: None,
    ):
        self.root = root
        self.launcher = launcher
        self.poll_seconds = poll_seconds
        self.grace_seconds = grace_seconds
        self.stop = stop
        self.on_finish = on_finish
        self.on_error = on_error
        self.attach = attach
        self.clock = clock
        self.current_version = current_version  # the registry's CURRENT when a job starts
        self.scheduler: BaseScheduler | None = None
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()  # the cycle (joined rules) and the executor both save requests
        self._jobs: dict[str, JobRecord] = {}
        root.mkdir(parents=True, exist_ok=True)
        for job_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            rec = self._load(job_dir)
            if rec is not None:
                self._jobs[rec.job_id] = rec

    def _load(self, job_dir: Path) -> JobRecord | None:
        try:
            rec = read_request(job_dir, JobRecord)
        except ValueError:
            log.warning("ignoring retrain job dir %s: request.json is malformed", job_dir)
            return None
        if rec is None:
            return None
        rec.result = read_result_if_valid(job_dir)
        rec.state = "finished" if rec.result is not None else "queued"
        rec.progress = last_progress(job_dir)
        return rec

    def _save_request(self, rec: JobRecord) -> None:
        with self._save_lock:
            self._write_request(rec)

    def _write_request(self, rec: JobRecord) -> None:
        write_request(self.root / rec.job_id, rec)

    def _schedule(self, rec: JobRecord) -> None:
        if self.scheduler is None:
            raise RuntimeError("RetrainQueue.scheduler is not set")
        self.scheduler.add_job(
            run_queued_retrain, trigger="date", args=[rec.job_id], id=_entry_id(rec.job_id, rec.attempts + 1),
            name=f"retrain {rec.job_id}", jobstore=JOBSTORE, executor=EXECUTOR,
            misfire_grace_time=None, coalesce=True, max_instances=1, replace_existing=False,
        )

    # -- public -----------------------------------------------------------------------------
    def submit(self, reason: str, source: str, *, model_version: str | None = None,
               monitor: dict[str, Any] | None = None) -> str:
        """Queue a retrain of ``model_version``; returns its job id. The request (with the
        monitor's evidence: rules, onset, domain gap) is on disk before this returns."""
        job_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.clock())) + "-" + secrets.token_hex(3)
        rec = JobRecord(job_id, reason, source, self.clock(), model_version=model_version, monitor=dict(monitor or {}))
        (self.root / job_id).mkdir(parents=True)
        self._save_request(rec)
        with self._lock:
            self._jobs[job_id] = rec
        self._schedule(rec)
        log.info("retrain job %s queued (%s): %s", job_id, source, reason)
        return job_id

    def recover(self) -> list[str]:
        """Re-queue jobs a restart interrupted (call with the scheduler started, paused)."""
        if self.scheduler is None:
            raise RuntimeError("RetrainQueue.scheduler is not set")
        stored = {j.id for j in self.scheduler.get_jobs(jobstore=JOBSTORE)}
        resumed = []
        with self._lock:  # only an entry for the next attempt is still to run: it was never started
            pending = [r for r in self._jobs.values()
                       if r.result is None and _entry_id(r.job_id, r.attempts + 1) not in stored]
        for rec in sorted(pending, key=lambda r: r.requested_at):
            # A shutdown just after an attempt started can leave its entry in the store (the
            # scheduler removes a date job only after handing it to the executor): that attempt
            # ran and was interrupted, so the entry must not run it again beside the re-run.
            stale = _entry_id(rec.job_id, rec.attempts)
            if stale in stored:
                self.scheduler.remove_job(stale, jobstore=JOBSTORE)
            rec.resumed = True
            if rec.external is not None and self.attach is not None:
                log.warning("retrain job %s was left running at the last shutdown (%s); re-attaching to it",
                            rec.job_id, rec.external)
                self._schedule(rec)
                resumed.append(rec.job_id)
                continue
            rec.external = None  # cannot be re-attached here: run it again
            if rec.attempts >= MAX_ATTEMPTS:
                result = self._failure(rec, f"interrupted {rec.attempts} times by restarts; not re-run. "
                                            "Queue a new one with `driftd retrain` once the cause is fixed")
                log.error("retrain job %s: %s", rec.job_id, result.reason)
                with self._lock:
                    rec.result, rec.state = result, "finished"
                continue
            what = "was interrupted by a restart" if rec.attempts else "was queued but not scheduled"
            log.warning("retrain job %s %s (attempt %d); re-running it as attempt %d",
                        rec.job_id, what, rec.attempts, rec.attempts + 1)
            self._schedule(rec)
            resumed.append(rec.job_id)
        return resumed

    def note_joined(self, job_id: str, decisions: list[dict[str, Any]]) -> None:
        """Record rule decisions that asked for a retrain while ``job_id`` was queued or running."""
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is None:
                return
            rec.joined = rec.joined + decisions
        self._save_request(rec)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            rec = self._jobs.get(job_id)
            return None if rec is None else rec.to_json()

    def active_job_id(self) -> str | None:
        """The id of the job running, else of the oldest queued one (None when neither)."""
        with self._lock:
            live = [r for r in self._jobs.values() if r.state != "finished"]
        live.sort(key=lambda r: (r.state != "running", r.requested_at))
        return live[0].job_id if live else None

    def running(self) -> JobRecord | None:
        with self._lock:
            return next((r for r in self._jobs.values() if r.state == "running"), None)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            recs = sorted(self._jobs.values(), key=lambda r: r.requested_at)
            views = [r.to_json() for r in recs]
        finished = [v for v in views if v["state"] == "finished"]
        return {
            "queued": [v for v in views if v["state"] == "queued"],
            "running": next((v for v in views if v["state"] == "running"), None),
            "last": finished[-1] if finished else None,
        }

    def outcome_counts(self) -> dict[str, float]:
        with self._lock:
            outcomes = [r.result.outcome for r in self._jobs.values() if r.result is not None]
        return {o: float(sum(1 for x in outcomes if x == o)) for o in OUTCOMES}

    def last_promotion(self) -> float | None:
        with self._lock:
            times = [r.result.finished_at for r in self._jobs.values()
                     if r.result is not None and r.result.outcome == "promoted"]
        times = [float(t) for t in times if isinstance(t, (int, float))]
        return max(times) if times else None

    # -- execution (retrain executor thread) ----------------------------------------------------
    def run(self, job_id: str) -> None:
        """Launch the job, follow its progress until it ends or the daemon stops.

        The one catch point of the retrain job: any failure is logged with the job id, recorded
        as a ``failed`` result and counted through ``on_error``; the daemon stays up.
        """
        with self._lock:
            rec = self._jobs.get(job_id)
        if rec is None or rec.state == "finished":
            log.warning("retrain job %s: nothing to run (unknown or already finished)", job_id)
            return
        if self.stop.is_set():
            return  # stays queued on disk; recover() re-runs it at the next start
        job_dir = self.root / job_id
        reattach = rec.external is not None and self.attach is not None
        current = None if reattach or rec.model_version is None else self.current_version()
        if current is not None and current != rec.model_version:
            # asked for a version a promotion or rollback has since replaced: its evidence is stale
            why = (f"not run: it was asked for model_version {rec.model_version}, but CURRENT is now {current}; "
                   "the monitor judges the new version afresh")
            log.warning("retrain job %s %s", job_id, why)
            result = JobResult(job_id=job_id, outcome="dropped", reason=why, candidate_version=None,
                               current_version=current, gate=None, strategy=None, started_at=None,
                               finished_at=self.clock(), labelled_rows=None)
            write_result(job_dir, result)
            self._finish(rec, result)
            return
        if not reattach:
            rec.attempts += 1
            rec.started_at = self.clock()
        rec.state = "running"
        self._save_request(rec)
        try:
            if reattach:
                log.info("retrain job %s: following %s again (attempt %d)", job_id, rec.external, rec.attempts)
                handle = self.attach(rec.external)
            else:
                log.info("retrain job %s started (attempt %d): %s", job_id, rec.attempts, rec.reason)
                handle = self.launcher(job_id, job_dir, rec.reason, rec.attempts)
                rec.external = getattr(handle, "external_ref", None)
                if rec.external is not None:
                    self._save_request(rec)
            code = self._follow(rec, handle, job_dir)
            if code is None:
                if rec.external is not None:
                    log.warning("retrain job %s left running as %s; driftd re-attaches at the next start", job_id, rec.external)
                else:
                    log.warning("retrain job %s stopped by shutdown; it will be re-run at the next start", job_id)
                rec.state = "queued"
                return
            result = read_result_if_valid(job_dir)
            if result is None:
                result = self._failure(rec, f"job exited with code {code} without writing result.json; see {job_dir}")
        except Exception as exc:
            log.error("retrain job %s failed: %s\n%s", job_id, exc, traceback.format_exc().rstrip())
            self.on_error()
            result = self._failure(rec, f"{type(exc).__name__}: {exc}")
        self._finish(rec, result)

    def _follow(self, rec: JobRecord, handle: JobHandle, job_dir: Path) -> int | None:
        while True:
            code = handle.poll()
            rec.progress = last_progress(job_dir)
            if code is not None:
                return code
            if self.stop.wait(self.poll_seconds):
                if getattr(handle, "external_ref", None) is None:  # an external job keeps running
                    handle.terminate(self.grace_seconds)
                return None

    def _failure(self, rec: JobRecord, reason: str) -> JobResult:
        result = JobResult(job_id=rec.job_id, outcome="failed", reason=reason, candidate_version=None,
                           current_version=None, gate=None, strategy=None, started_at=rec.started_at,
                           finished_at=self.clock(), labelled_rows=None)
        write_result(self.root / rec.job_id, result)
        return result

    def _finish(self, rec: JobRecord, result: JobResult) -> None:
        with self._lock:
            rec.result, rec.state = result, "finished"
        duration = self.clock() - (rec.started_at or self.clock())
        log.info("retrain job %s finished: %s (%s)", rec.job_id, result.outcome, result.reason)
        self.on_finish(rec, duration)
