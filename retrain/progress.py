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
class DataSummary:
    """Which labelled rows the job used and where each went (also the registry's ``data_window``).

    Times are event time: prediction timestamps, epoch seconds, up to the stream's newest."""

    since: float                    # oldest prediction time considered (until - lookback_seconds)
    until: float                    # the stream's clock: newest prediction timestamp
    rows: int                       # production rows selected (after the onset when one was given)
    model_versions: list[str]       # model versions that served those rows
    mode: str                       # "images" | "features"
    onset: float | None             # breach onset (event time) the daemon passed, if any
    rows_before_onset: int          # labelled rows in the lookback predicted before the onset
    rows_after_onset: int           # ... and at or after it (all rows when no onset was given)
    rows_used_before_onset: int     # of those, rows used to train, validate or gate
    rows_used_after_onset: int
    train_rows: int
    validation_rows: int
    production_gate_rows: int       # distinct inputs among the most recent rows
    replay_rows: int
    replay_train_rows: int
    replay_validation_rows: int
    reference_gate_rows: int        # distinct replay inputs held out for the forgetting test
    production_copies_dropped: int  # older rows left out: the same input is in a gate slice
    replay_copies_dropped: int
    gate_copies_merged: int         # repeated inputs among the most recent rows, counted once
    head_only_reason: str | None    # why the job trains the head only (too few post-onset rows)


@dataclass(frozen=True)
class ShiftSummary:
    """How far the inputs moved, by the monitor's measurement and by the job's own."""

    monitor_domain_gap: float | None   # share of feature dims shifted, as the daemon passed it
    monitor_mmd: float | None          # the monitor's batch MMD^2 on the breaching window
    job_domain_gap: float              # measured by the job on the rows it trains on vs the replay rows
    job_domain_gap_rows: int
    strategy_domain_gap: float         # the gap that chose the strategy
    strategy_domain_gap_from: str      # "monitor" | "job"


@dataclass(frozen=True)
class ReferenceSummary:
    """What the promoted version's monitor reference was built from."""

    model_version: str
    heldout_rows: int               # production rows it was not trained on (gate + validation)
    training_rows: int              # production training rows added to reach the minimum size
    labelled_rows: int              # rows behind its accuracy and calibration (held-out only)
    accuracy: float | None
    path: str


_TYPED = {"data": DataSummary, "shift": ShiftSummary, "reference": ReferenceSummary}


@dataclass(frozen=True)
class JobResult:
    job_id: str
    outcome: str                    # "promoted" | "rejected" | "failed"
    reason: str
    candidate_version: str | None
    current_version: str | None
    gate: dict[str, Any] | None     # GateResult.to_json() when the gate ran
    strategy: dict[str, Any] | None  # {"name", "reason", "layer_decay", "domain_gap", "onset", ...}
    started_at: float
    finished_at: float
    labelled_rows: int
    # Added later: result.json files written before them read back as None.
    data: DataSummary | None = None
    shift: ShiftSummary | None = None
    reference: ReferenceSummary | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "JobResult":
        values = {f.name: data.get(f.name) for f in fields(cls)}
        for name, kind in _TYPED.items():
            if isinstance(values[name], dict):
                known = {f.name for f in fields(kind)}
                raw = values[name]
                values[name] = kind(**{k: raw.get(k) for k in known})
        return cls(**values)


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
