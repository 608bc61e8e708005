"""The job directory: the one contract between the daemon that queues a retrain and the job.

``<state_dir>/retrain/<job_id>/`` holds

- ``request.json``: the :class:`JobRequest`, written by the daemon's queue (atomically, on every
  change of attempt, state or joined decisions);
- ``progress.jsonl``: :class:`retrain.progress.ProgressEvent` lines appended by the job
  (:class:`ProgressLog`), read by the daemon (:func:`last_progress`) and the demo;
- ``result.json``: the :class:`retrain.result.JobResult`, written once, atomically, at the end
  (by the job, or by the daemon when the job failed or was dropped);
- ``job.log``: a local job's stdout/stderr (retrain.launch.local).

Every file name and every reader and writer of these files is here; writes go through
retrain.files.write_atomic. The keys on disk are those older versions wrote, so job directories
left by them still read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from retrain.files import read_json, write_json_atomic
from retrain.progress import GAUGE_KEYS, ProgressEvent
from retrain.result import JobResult

REQUEST_FILE = "request.json"
PROGRESS_FILE = "progress.jsonl"
RESULT_FILE = "result.json"
LOG_FILE = "job.log"

R = TypeVar("R", bound="JobRequest")


@dataclass
class JobRequest:
    """A queued retrain as ``request.json`` holds it."""

    job_id: str
    reason: str
    source: str                      # "api", "cli" or "rule:<name>"
    requested_at: float
    attempts: int = 0
    started_at: float | None = None
    external: dict[str, Any] | None = None  # external_ref of a job that outlives the daemon
    model_version: str | None = None  # the served version it retrains (None: whatever is CURRENT)
    monitor: dict[str, Any] = field(default_factory=dict)  # the monitor's evidence: rules, onset, domain gap
    joined: list[dict[str, Any]] = field(default_factory=list)  # rule decisions recorded on it after it was queued

    def request_json(self) -> dict[str, Any]:
        """The request's own fields (a subclass's extra state stays out of request.json)."""
        return {f.name: getattr(self, f.name) for f in fields(JobRequest)}


def read_request(job_dir: Path, kind: type[R] = JobRequest) -> R | None:  # type: ignore[assignment]
    """The job's request as ``kind``; None when there is none. Raises ValueError when malformed."""
    req = read_json(Path(job_dir) / REQUEST_FILE)
    if req is None:
        return None
    try:
        return kind(str(req["job_id"]), str(req["reason"]), str(req["source"]), float(req["requested_at"]),
                    int(req["attempts"]), started_at=req.get("started_at"), external=req.get("external"),
                    # absent in requests written before versions were tracked
                    model_version=req.get("model_version"), monitor=dict(req.get("monitor") or {}),
                    joined=list(req.get("joined") or []))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{Path(job_dir) / REQUEST_FILE} is malformed: {exc}") from exc


def write_request(job_dir: Path, request: JobRequest) -> None:
    write_json_atomic(Path(job_dir) / REQUEST_FILE, request.request_json())


def write_result(job_dir: Path, result: JobResult) -> Path:
    """Write ``result.json`` atomically (temp file, fsync, os.replace)."""
    path = Path(job_dir) / RESULT_FILE
    write_json_atomic(path, result.to_json())
    return path


def read_result(job_dir: Path) -> JobResult | None:
    """The job's result, or None while it has not finished (or crashed before writing one)."""
    path = Path(job_dir) / RESULT_FILE
    try:
        return JobResult.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None


def read_result_if_valid(job_dir: Path) -> JobResult | None:
    """Like :func:`read_result`, but None also when the file is unreadable (the daemon's view:
    a job that left a torn or foreign result.json has no result)."""
    data = read_json(Path(job_dir) / RESULT_FILE)
    return None if data is None else JobResult.from_json(data)


class ProgressLog:
    """Appends events to ``job_dir/progress.jsonl`` (each line flushed) and forwards them to a callback."""

    def __init__(self, job_dir: Path, *, callback: Callable[[dict], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.path = Path(job_dir) / PROGRESS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._callback = callback
        self._clock = clock

    def __call__(self, event: dict[str, Any]) -> None:
        ProgressEvent.from_json(event)  # refuses an unknown kind
        line = {"time": self._clock(), **event}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, default=str) + "\n")
        if self._callback is not None:
            self._callback(line)


def read_progress(job_dir: Path) -> list[dict[str, Any]]:
    """Events so far (ProgressEvent JSON), oldest first; a torn last line (job still writing) is skipped."""
    path = Path(job_dir) / PROGRESS_FILE
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def last_progress(job_dir: Path) -> dict[str, Any]:
    """The last complete JSON line of ``progress.jsonl``, with the last value reported for each
    of ``GAUGE_KEYS`` filled in ({} when none yet)."""
    try:
        lines = (Path(job_dir) / PROGRESS_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    last: dict[str, Any] | None = None
    gauges: dict[str, Any] = {}
    for line in reversed(lines):
        try:
            data = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if not isinstance(data, dict):
            continue
        if last is None:
            last = data
        for key in GAUGE_KEYS:
            if key not in gauges and key in data:
                gauges[key] = data[key]
        if len(gauges) == len(GAUGE_KEYS):
            break
    return {} if last is None else {**gauges, **last}
