"""What the monitoring core reads of the config file: the model's name, the state and reference
directories, and the ``window`` section, around the ``logs``/``ingest`` and ``signals``
sections their owners declare (``monitor.ingest.config``, ``monitor.signals.config``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from monitor.configutil import Section, parse_section, setting
from monitor.ingest.config import IngestConfig, LogsConfig, check_ingest
from monitor.signals.config import SignalsConfig, check_signals


@dataclass(frozen=True)
class WindowConfig:
    # A window's batch tests cost ~25 ms at the MMD defaults; 5000 rows keeps that near 5 us a row
    # and, at high traffic, keeps the number of batch tests (and chance alarms) per hour sane.
    rows: int = setting(5000, minimum=2)          # close a window after this many rows ...
    seconds: float = setting(300.0, minimum=0.001)  # ... or once it spans this much event time, whichever is first
    min_rows: int = setting(50, minimum=2)        # a shorter window (time-closed) skips the MMD test


@dataclass(frozen=True, kw_only=True)
class MonitorConfig:
    """What the monitoring core needs: where logs, references and state live, and how to measure."""

    model: str = setting("model")   # a name for the monitored model (the `model` metric label)
    logs: LogsConfig
    state_dir: Path = setting(Path("./driftd-state"), location=True)
    reference_dir: Path = setting(Path("./driftd-reference"), location=True)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    signals: SignalsConfig = field(default_factory=SignalsConfig)


def parse_monitor(root: Section, base: Path) -> MonitorConfig:
    """Read the monitoring core's keys from the top of the file (other owners read the rest, so
    unknown keys are reported by the caller); errors are collected in ``root``."""
    monitor = parse_section(root, MonitorConfig, base=base, finish=False)
    check_ingest(root, monitor.logs, monitor.ingest)
    if monitor.window.min_rows > monitor.window.rows:
        root.error("window.min_rows", f"must be <= window.rows ({monitor.window.rows}), got {monitor.window.min_rows}")
    check_signals(root, monitor.signals)
    return monitor
