"""What happened during a demo run, in rows served and seconds: the record the report is made of."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Mark:
    """When an event was first visible: wall-clock epoch seconds and rows served until then."""

    time: float
    row: int


@dataclass
class Timeline:
    """Each event once, None when it did not happen. Rows count requests served since traffic began."""

    demo_started: float = 0.0
    traffic_started: float | None = None
    onset: Mark | None = None
    first_alarm: Mark | None = None
    first_alarm_rule: str | None = None
    first_alarm_detail: str | None = None
    retrain_requested: Mark | None = None
    retrain_reason: str | None = None
    retrain_job: str | None = None
    retrain_started: Mark | None = None
    retrain_finished: Mark | None = None
    retrain_outcome: str | None = None        # "promoted" | "rejected" | "failed" (the job's own word)
    retrain_message: str | None = None        # the job's reason: the gate's verdict or the error
    gate: dict[str, Any] = field(default_factory=dict)
    promoted_version: str | None = None
    switch: Mark | None = None                # the service began serving the promoted version
    stop_reason: str = ""                     # why traffic stopped, in words
    time_limit_hit: bool = False
    traffic_finished: float | None = None
    finished: float = 0.0
    other_jobs: list[str] = field(default_factory=list)  # retrain requests beyond the one followed


@dataclass(frozen=True)
class Tick:
    """One batch of traffic as the demo served it (the truth driftd only learns from labels)."""

    time: float                # the batch's timestamp in the logs
    rows: int                  # rows served so far, this batch included
    batch_rows: int
    model_version: str
    accuracy: float
    shifted: bool


@dataclass(frozen=True)
class LiveView:
    """What the daemon's status showed for one model_version at one poll."""

    time: float
    row: int
    model_version: str
    accuracy: float | None            # on delayed labels (last N)
    labels: int
    estimated_accuracy: float | None
    thresholds: dict[str, float]      # rule -> threshold in force for this version


@dataclass
class DemoResult:
    timeline: Timeline
    start_version: str
    final_version: str
    shifted_accuracy: dict[str, float]   # version -> accuracy on held-out shifted images
    clean_accuracy: dict[str, float]     # version -> accuracy on held-out clean images
    ticks: list[Tick]
    windows: list[dict[str, Any]]        # every window's signals (replayed from the logs)
    live: list[LiveView]
    progress: list[dict[str, Any]]       # the followed retrain job's progress events
    rows_ingested: float | None          # driftd's own count (driftd_ingest_rows_total), at the end
    labels_written: int
    source_training: dict[str, Any]      # seconds, epochs, thread choice
    settings: dict[str, Any]
    report_dir: Path
    config_path: Path
    workdir: Path

    @property
    def rows_served(self) -> int:
        return self.ticks[-1].rows if self.ticks else 0
