"""The persisted retrain queue on a real APScheduler with its SQLite job store; the launcher is faked
(it is the process hook), everything else is real."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from pathlib import Path

from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore

from monitor.service.retrain_queue import RetrainQueue
from monitor.service.retrain_scheduler import EXECUTOR, JOBSTORE, DaemonScheduler, RetrainExecutor
from waiting import wait_until


class FakeJob:
    """Writes progress and, once ``release`` is set, result.json like retrain.job does."""

    def __init__(self, job_dir: Path, job_id: str, release: threading.Event, outcome: str):
        self.job_dir, self.job_id, self.release, self.outcome = job_dir, job_id, release, outcome
        self.terminated = False
        (job_dir / "progress.jsonl").write_text(json.dumps({"event": "epoch", "epoch": 1, "grad_norm": 0.5}) + "\n")

    def poll(self) -> int | None:
        if self.terminated:
            return -15
        if not self.release.is_set():
            return None
        (self.job_dir / "result.json").write_text(json.dumps(
            {"job_id": self.job_id, "outcome": self.outcome, "reason": "gate says so", "finished_at": time.time()}))
        return 0

    def terminate(self, grace_seconds: float) -> int:
        self.terminated = True
        return -15


class ExternalFakeJob(FakeJob):
    """Like a Kubernetes Job: runs outside the daemon and can be found again by its reference."""

    @property
    def external_ref(self) -> dict[str, str]:
        return {"kind": "fake", "name": self.job_id}


class Harness:
    def __init__(self, tmp: Path, outcome: str = "promoted", external: bool = False, current: str | None = None):
        self.tmp = tmp
        self.current = current  # the registry's CURRENT as the queue sees it
        self.release = threading.Event()
        self.stop = threading.Event()
        self.launched: list[tuple[str, int]] = []
        self.finished: list[str] = []
        self.errors = 0
        self.jobs: list[FakeJob] = []

        def launcher(job_id: str, job_dir: Path, reason: str, attempt: int) -> FakeJob:
            self.launched.append((job_id, attempt))
            if reason == "explode":
                raise RuntimeError("launcher broke")
            job = (ExternalFakeJob if external else FakeJob)(job_dir, job_id, self.release, outcome)
            self.jobs.append(job)
            return job

        self.attached: list[dict] = []

        def attach(ref: dict) -> FakeJob:
            self.attached.append(ref)
            job = ExternalFakeJob(tmp / "retrain" / ref["name"], ref["name"], self.release, outcome)
            self.jobs.append(job)
            return job

        def on_error() -> None:
            self.errors += 1

        self.queue = RetrainQueue(tmp / "retrain", launcher=launcher, poll_seconds=0.02, grace_seconds=0.1,
                                  stop=self.stop, on_finish=lambda rec, d: self.finished.append(rec.job_id),
                                  on_error=on_error, attach=attach, current_version=lambda: self.current)
        self.scheduler = DaemonScheduler(
            jobstores={JOBSTORE: SQLAlchemyJobStore(url=f"sqlite:///{tmp / 'scheduler.db'}")},
            executors={EXECUTOR: RetrainExecutor(self.queue.run)}, timezone=dt.timezone.utc)
        self.queue.scheduler = self.scheduler

    def start(self, paused: bool = False) -> "Harness":
        self.scheduler.start(paused=paused)
        return self

    def progress(self) -> tuple:
        """What the queue has done so far; waits extend while it changes."""
        summary = self.queue.summary()
        return (len(self.launched), len(self.finished), self.errors,
                tuple((v["job_id"], v["state"], json.dumps(v["progress"], sort_keys=True))
                      for v in [*summary["queued"], summary["running"], summary["last"]] if v))

    def until(self, cond, timeout: float = 30.0) -> None:
        """``timeout``: seconds without progress (see progress()), not seconds in all."""
        wait_until(cond, "the retrain queue's condition", progress=self.progress, stall_seconds=timeout,
                   poll_seconds=0.01, context=lambda: f"launched {self.launched}, finished {self.finished}")

    def close(self) -> None:
        self.stop.set()
        self.scheduler.pause()  # as the daemon does: no job is handed to an executor being shut down
        self.scheduler.shutdown(wait=True)


def _restart_and_finish(tmp: Path, job_id: str, recovered: list[str], external: bool = False) -> Harness:
    """A new daemon's queue over the same state: recover() (checked), then run until ``job_id`` ends."""
    again = Harness(tmp, external=external)
    again.start(paused=True)
    assert again.queue.recover() == recovered
    again.release.set()
    again.scheduler.resume()
    try:
        again.until(lambda: again.finished == [job_id])
    finally:
        again.close()
    return again


def _left_behind(tmp: Path, job_id: str, *, attempts: int) -> Path:
    """A job directory as a daemon stopped during attempt ``attempts`` leaves it: a request, no result."""
    job_dir = tmp / "retrain" / job_id
    job_dir.mkdir(parents=True)
    (job_dir / "request.json").write_text(json.dumps(
        {"job_id": job_id, "reason": "drift", "source": "api", "requested_at": 1.0, "attempts": attempts}))
    return job_dir


def test_job_runs_once_and_reports_progress_and_outcome(tmp_path: Path) -> None:
    h = Harness(tmp_path).start()
    try:
        job_id = h.queue.submit("accuracy fell", source="rule:accuracy_drop")
        h.until(lambda: h.queue.running() is not None and h.queue.running().progress)
        assert h.queue.active_job_id() == job_id
        assert h.queue.get(job_id)["progress"]["grad_norm"] == 0.5
        h.release.set()
        h.until(lambda: h.finished == [job_id])
        info = h.queue.get(job_id)
        assert (info["state"], info["outcome"], info["attempts"], info["resumed"]) == ("finished", "promoted", 1, False)
        assert h.queue.outcome_counts() == {"promoted": 1.0, "rejected": 0.0, "failed": 0.0, "dropped": 0.0}
        assert h.queue.active_job_id() is None and h.launched == [(job_id, 1)]
    finally:
        h.close()


def test_a_job_for_a_version_no_longer_current_is_dropped_unrun(tmp_path: Path) -> None:
    h = Harness(tmp_path, current="v2").start()
    try:
        job_id = h.queue.submit("accuracy fell", source="rule:accuracy_drop", model_version="v1",
                                monitor={"rules": ["accuracy_drop"], "onset": 1.0})
        h.queue.note_joined(job_id, [{"rule": "estimated_accuracy_drop", "outcome": "joined"}])
        h.until(lambda: h.finished == [job_id])
        info = h.queue.get(job_id)
        assert info["outcome"] == "dropped" and h.launched == []
        assert "asked for model_version v1, but CURRENT is now v2" in info["result"]["reason"]
        assert info["monitor"]["rules"] == ["accuracy_drop"] and info["joined"][0]["rule"] == "estimated_accuracy_drop"
        assert h.queue.outcome_counts()["dropped"] == 1
    finally:
        h.close()
    # what was recorded on the request survives a restart
    again = Harness(tmp_path)
    assert again.queue.get(job_id)["joined"][0]["rule"] == "estimated_accuracy_drop"


def test_launcher_failure_is_a_failed_result_and_counted(tmp_path: Path) -> None:
    h = Harness(tmp_path).start()
    try:
        job_id = h.queue.submit("explode", source="api")
        h.until(lambda: h.finished == [job_id])
        info = h.queue.get(job_id)
        assert info["outcome"] == "failed" and info["result"]["reason"] == "RuntimeError: launcher broke"
        assert h.errors == 1
        assert json.loads((tmp_path / "retrain" / job_id / "result.json").read_text())["outcome"] == "failed"
    finally:
        h.close()


def test_queued_job_survives_restart_without_being_doubled(tmp_path: Path) -> None:
    """APScheduler's replace_existing trap: the persisted job must run once, not be re-added or dropped."""
    h = Harness(tmp_path).start(paused=True)  # never runs: as if the daemon stopped right after queueing
    job_id = h.queue.submit("drift", source="api")
    h.close()
    again = _restart_and_finish(tmp_path, job_id, recovered=[])  # still in the job store: nothing re-added
    assert again.launched == [(job_id, 1)]


def test_interrupted_job_is_rerun_as_next_attempt(tmp_path: Path) -> None:
    h = Harness(tmp_path).start()
    job_id = h.queue.submit("drift", source="api")
    h.until(lambda: h.queue.running() is not None)
    h.close()  # shutdown while running: terminated, no result
    assert h.jobs[0].terminated and not (tmp_path / "retrain" / job_id / "result.json").exists()
    again = _restart_and_finish(tmp_path, job_id, recovered=[job_id])
    info = again.queue.get(job_id)
    assert (info["attempts"], info["resumed"], info["outcome"]) == (2, True, "promoted")
    assert again.launched == [(job_id, 2)]


def test_an_entry_left_for_the_interrupted_attempt_does_not_run_it_again(tmp_path: Path) -> None:
    # A shutdown just after attempt 1 started can leave its scheduler entry stored (APScheduler
    # drops a date job only after handing it to the executor): restart must re-run the job as
    # attempt 2, once, and say so, not leave it to the stale entry.
    from monitor.service.retrain_queue import run_queued_retrain

    _left_behind(tmp_path, "j1", attempts=1)
    h = Harness(tmp_path).start(paused=True)
    h.scheduler.add_job(run_queued_retrain, trigger="date", args=["j1"], id="retrain-j1-a1", jobstore=JOBSTORE,
                        executor=EXECUTOR, misfire_grace_time=None)
    try:
        assert h.queue.recover() == ["j1"]
        assert {j.id for j in h.scheduler.get_jobs(jobstore=JOBSTORE)} == {"retrain-j1-a2"}
        h.release.set()
        h.scheduler.resume()
        h.until(lambda: h.finished == ["j1"])
        assert h.launched == [("j1", 2)]
        assert h.queue.get("j1")["resumed"] is True
    finally:
        h.close()


def test_job_interrupted_too_often_is_recorded_as_failed(tmp_path: Path) -> None:
    job_dir = _left_behind(tmp_path, "j1", attempts=3)
    h = Harness(tmp_path).start(paused=True)
    try:
        assert h.queue.recover() == []
        info = h.queue.get("j1")
        assert info["outcome"] == "failed" and "interrupted 3 times by restarts" in info["result"]["reason"]
        assert json.loads((job_dir / "result.json").read_text())["outcome"] == "failed"
    finally:
        h.close()


def test_external_job_is_left_running_and_reattached(tmp_path: Path) -> None:
    h = Harness(tmp_path, external=True).start()
    job_id = h.queue.submit("drift", source="api")
    h.until(lambda: h.queue.running() is not None and h.queue.running().external is not None)
    h.close()
    assert not h.jobs[0].terminated  # a Kubernetes Job must not be deleted by a daemon restart
    again = _restart_and_finish(tmp_path, job_id, recovered=[job_id], external=True)
    assert again.attached == [{"kind": "fake", "name": job_id}] and again.launched == []
    info = again.queue.get(job_id)
    assert (info["attempts"], info["resumed"], info["outcome"]) == (1, True, "promoted")


def test_the_gauges_keep_their_last_value_between_progress_lines(tmp_path: Path) -> None:
    from retrain.jobdir import last_progress

    (tmp_path / "progress.jsonl").write_text("\n".join(json.dumps(e) for e in (
        {"event": "step", "epoch": 1, "grad_norm": 2.5, "weight_drift": 0.1},
        {"event": "epoch", "epoch": 1, "grad_norm": 3.0, "weight_drift": 0.2},
        {"event": "phase", "phase": "finetune"},
        {"event": "guard", "message": "spike"},
    )) + "\n{\"event\": \"ste")  # a line being written
    assert last_progress(tmp_path) == {"event": "guard", "message": "spike", "epoch": 1, "grad_norm": 3.0,
                                       "weight_drift": 0.2}
    assert last_progress(tmp_path / "nowhere") == {}
