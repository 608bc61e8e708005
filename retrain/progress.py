"""The files a retrain job leaves in its job directory, which the daemon reads.

``progress.jsonl``: one JSON object per line, appended as the job runs:
``{"time": epoch s, "event": "started"|"phase"|"epoch"|"step"|"guard"|"gate"|"promoted"|"rejected"|"failed", ...}``;
"step" comes every 25 fine-tune steps with ``epoch``, ``grad_norm`` and ``weight_drift`` (the
daemon's guard gauges read the last line), "guard" on every trip.
``result.json``: the :class:`JobResult`, written once, atomically, at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from retrain.files import write_atomic

PROGRESS_FILE = "progress.jsonl"
RESULT_FILE = "result.json"
EVENTS = ("started", "phase", "epoch", "step", "guard", "gate", "promoted", "rejected", "failed")


@dataclass(frozen=True)
class JobResult:
    job_id: str
    outcome: str                    # "promoted" | "rejected" | "failed"
    reason: str
    candidate_version: str | None
    current_version: str | None
    gate: dict[str, Any] | None     # GateResult.to_json() when the gate ran
    strategy: dict[str, Any] | None  # {"name", "reason", "layer_decay"}
    started_at: float
    finished_at: float
    labelled_rows: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "JobResult":
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})


class ProgressLog:
    """Appends events to ``job_dir/progress.jsonl`` (each line flushed) and forwards them to a callback."""

    def __init__(self, job_dir: Path, *, callback: Callable[[dict], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.path = Path(job_dir) / PROGRESS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._callback = callback
        self._clock = clock

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("event") not in EVENTS:
            raise ValueError(f"unknown progress event {event.get('event')!r}; expected one of {', '.join(EVENTS)}")
        line = {"time": self._clock(), **event}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, default=str) + "\n")
        if self._callback is not None:
            self._callback(line)


def read_progress(job_dir: Path) -> list[dict[str, Any]]:
    """Events so far, oldest first; a torn last line (job still writing) is skipped."""
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


def write_result(job_dir: Path, result: JobResult) -> Path:
    """Write ``result.json`` atomically (temp file, fsync, os.replace)."""
    path = Path(job_dir) / RESULT_FILE
    write_atomic(path, json.dumps(result.to_json(), indent=1, default=str))
    return path


def read_result(job_dir: Path) -> JobResult | None:
    """The job's result, or None while it has not finished (or crashed before writing one)."""
    path = Path(job_dir) / RESULT_FILE
    try:
        return JobResult.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
