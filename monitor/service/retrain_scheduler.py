"""APScheduler plumbing for the retrain queue: the daemon's scheduler and the one-worker retrain executor.

Apart from the queue (monitor.service.retrain_queue) because it is about APScheduler, not about
jobs: the scheduler must hand out nothing once shutdown has begun, and retrains run one at a
time on their own thread, on the executor and job store named here.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from apscheduler.executors.base import BaseExecutor
from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_STOPPED, BaseScheduler

JOBSTORE = "retrain"   # the SQLite job store that persists queued retrains
EXECUTOR = "retrain"   # the RetrainExecutor that runs them


class DaemonScheduler(BackgroundScheduler):
    """A BackgroundScheduler that hands out no job once shutdown has begun.

    APScheduler 3's loop runs one more pass after ``shutdown()`` and submits due jobs to executors
    already shut down (logging errors, and for a persisted retrain racing its removal from the store).
    """

    def _process_jobs(self) -> float | None:
        if self.state == STATE_STOPPED:
            return None
        return super()._process_jobs()


class RetrainExecutor(BaseExecutor):
    """Runs retrain jobs one at a time on a single worker thread, handing them to ``run(job_id)``."""

    def __init__(self, run: Callable[[str], None]):
        super().__init__()
        self._run = run
        self._pool: ThreadPoolExecutor | None = None

    def start(self, scheduler: BaseScheduler, alias: str) -> None:
        super().start(scheduler, alias)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="driftd-retrain")

    def shutdown(self, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)

    def _do_submit_job(self, job: Job, run_times: list) -> None:
        def done(f: Future) -> None:
            if f.cancelled():
                return
            exc = f.exception()
            if exc is not None:
                self._run_job_error(job.id, exc, exc.__traceback__)
            else:
                self._run_job_success(job.id, [])

        if self._pool is None:
            raise RuntimeError("retrain executor used before start()")
        self._pool.submit(self._run, *job.args).add_done_callback(done)
