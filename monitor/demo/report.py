"""The demo's report: a timeline on the terminal and a JSON summary (charts: monitor.demo.charts)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from monitor.demo.narration import gate_lines
from monitor.demo.timeline import DemoResult, Mark

SUMMARY_FORMAT = 1
EVENTS = (
    ("onset", "onset of the shift"),
    ("first_alarm", "first alarm"),
    ("retrain_requested", "retrain requested"),
    ("retrain_started", "retrain job started"),
    ("retrain_finished", "retrain finished"),
    ("switch", "service serves the new version"),
)


def seconds_since_traffic(r: DemoResult, mark: Mark | None) -> float | None:
    t0 = r.timeline.traffic_started
    return None if mark is None or t0 is None else mark.time - t0


def gate_thresholds(r: DemoResult) -> dict[str, float]:
    return {"min_gain": r.settings["min_gain"], "max_forgetting": r.settings["max_forgetting"]}


def timeline_lines(r: DemoResult) -> list[str]:
    t = r.timeline
    details = {
        "onset": f"'{r.settings['corruption']}' corruption from here on",
        "first_alarm": "" if t.first_alarm is None or t.onset is None else
        f"{t.first_alarm_detail}; {t.first_alarm.row - t.onset.row} rows / "
        f"{t.first_alarm.time - t.onset.time:.1f} s after the onset",
        "retrain_requested": t.retrain_reason or "",
        "retrain_started": "" if t.retrain_job is None else f"job {t.retrain_job}",
        "retrain_finished": "" if t.retrain_outcome is None else
        f"{t.retrain_outcome}" + ("" if t.retrain_started is None or t.retrain_finished is None else
                                  f" after {t.retrain_finished.time - t.retrain_started.time:.0f} s"),
        "switch": t.promoted_version or "",
    }
    lines = [f"{'event':<32}{'row':>7}{'seconds':>9}  detail (rows served and seconds since traffic started)"]
    for key, label in EVENTS:
        mark: Mark | None = getattr(t, key)
        seconds = seconds_since_traffic(r, mark)
        row = "-" if mark is None else str(mark.row)
        when = "-" if seconds is None else f"{seconds:.1f}"
        lines.append(f"{label:<32}{row:>7}{when:>9}  {details[key] if mark is not None else 'did not happen'}")
    if t.gate:
        lines.append("gate")
        lines += [f"  {line}" for line in gate_lines(t.gate, gate_thresholds(r))]
    elif t.retrain_message:
        lines.append(f"retrain: {t.retrain_message}")
    for job in t.other_jobs:
        lines.append(f"other retrain request: {job}")
    lines.append("held-out accuracy (images no model trained on)")
    for v in r.shifted_accuracy:
        lines.append(f"  {v}: shifted {r.shifted_accuracy[v]:.3f}, clean {r.clean_accuracy[v]:.3f}")
    lines.append(f"traffic stopped: {t.stop_reason}")
    lines.append(f"rows served {r.rows_served}, ingested by driftd {_count(r.rows_ingested)}, labels written "
                 f"{r.labels_written}; windows {_windows(r)}")
    return lines


def _count(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.0f}"


def _windows(r: DemoResult) -> dict[str, int]:
    return dict(sorted(Counter(w["model_version"] for w in r.windows).items()))


def summary(r: DemoResult) -> dict[str, Any]:
    """Everything the run showed, as JSON: rows count requests served since traffic began;
    seconds are since traffic began, or wall-clock durations."""
    t = r.timeline
    events = {key: None if getattr(t, key) is None else
              {"row": getattr(t, key).row, "seconds": seconds_since_traffic(r, getattr(t, key)), "time": getattr(t, key).time}
              for key, _ in EVENTS}
    retrain_seconds = (None if t.retrain_started is None or t.retrain_finished is None
                       else t.retrain_finished.time - t.retrain_started.time)
    detection = None if t.onset is None or t.first_alarm is None else {
        "rule": t.first_alarm_rule, "rows_after_onset": t.first_alarm.row - t.onset.row,
        "seconds_after_onset": t.first_alarm.time - t.onset.time}
    return {
        "format": SUMMARY_FORMAT,
        "outcome": t.retrain_outcome,
        "promoted_version": t.promoted_version,
        "start_version": r.start_version,
        "final_version": r.final_version,
        "stop_reason": t.stop_reason,
        "time_limit_hit": t.time_limit_hit,
        "rows_served": r.rows_served,
        "rows_ingested": r.rows_ingested,
        "labels_written": r.labels_written,
        "rows_by_version": _rows_by_version(r),
        "windows": _windows(r),
        "events": events,
        "detection": detection,
        "retrain": {"job": t.retrain_job, "reason": t.retrain_reason, "outcome": t.retrain_outcome,
                    "message": t.retrain_message, "seconds": retrain_seconds, "gate": t.gate,
                    "progress_events": len(r.progress), "other_requests": t.other_jobs},
        "held_out_accuracy": {"shifted": r.shifted_accuracy, "clean": r.clean_accuracy},
        "source_training": r.source_training,
        "wall_seconds": {
            "total": t.finished - t.demo_started,
            "before_traffic": None if t.traffic_started is None else t.traffic_started - t.demo_started,
            "traffic": None if t.traffic_started is None or t.traffic_finished is None
            else t.traffic_finished - t.traffic_started,
        },
        "config": str(r.config_path),
        "settings": r.settings,
    }


def _rows_by_version(r: DemoResult) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for tick in r.ticks:
        counts[tick.model_version] += tick.batch_rows
    return dict(sorted(counts.items()))


def write_report(r: DemoResult) -> dict[str, Path]:
    """summary.json, accuracy.png and signals.png under the report directory."""
    from monitor.demo.charts import accuracy_chart, signals_chart

    out = r.report_dir
    out.mkdir(parents=True, exist_ok=True)
    summary_json = out / "summary.json"
    summary_json.write_text(json.dumps(summary(r), indent=2, sort_keys=True) + "\n")
    return {"accuracy": accuracy_chart(r, out / "accuracy.png"), "signals": signals_chart(r, out / "signals.png"),
            "summary": summary_json}
