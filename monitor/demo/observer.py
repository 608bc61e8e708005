"""Watching the daemon as a user would: its HTTP status and metrics, and the retrain job's progress file.

Each poll notes the first time an event is visible (in rows served and seconds), follows the
first retrain job the daemon queues from request to result, and narrates its progress events
as they appear, so a user waiting on a slow machine sees what the retrain is doing.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from monitor.demo.narration import gate_lines, progress_line
from monitor.demo.timeline import LiveView, Mark, Timeline

HEARTBEAT_SECONDS = 15.0   # say the retrain is still running when its progress file is this quiet


def get(url: str, token: str | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    """GET an endpoint: (status, parsed JSON or text); (0, None) while nothing answers."""
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
            return resp.status, json.loads(body) if body[:1] in (b"{", b"[") else body.decode()
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None  # not listening (yet), or too busy to answer in time


def metric_total(text: str, name: str) -> float | None:
    """Sum of a metric's samples in Prometheus text (every label set), None when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    values = [s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]
    return float(sum(values)) if values else None


class DaemonObserver:
    """Polls one daemon; fills ``timeline`` and collects what its status showed."""

    def __init__(self, base_url: str, token: str, state_dir: Path, timeline: Timeline, *,
                 say: Callable[[str], None], rows_at: Callable[[float], int], max_epochs: Mapping[str, int],
                 gate_thresholds: Mapping[str, float], clock: Callable[[], float] = time.time):
        self.base = base_url
        self.token = token
        self.state_dir = state_dir
        self.t = timeline
        self.say = say
        self.rows_at = rows_at   # rows served by a given time: places the job's own timestamps on the row axis
        self.max_epochs = max_epochs
        self.gate_thresholds = gate_thresholds
        self.clock = clock
        self.live: list[LiveView] = []
        self.progress: list[dict[str, Any]] = []
        self.rows_ingested: float | None = None   # driftd's own counters, from /metrics
        self.labels_joined: float | None = None
        self._last_news = 0.0
        self._seen_jobs: set[str] = set()

    # -- state the scenario's loop asks about ----------------------------------------------------
    @property
    def retrain_busy(self) -> bool:
        """A retrain was requested and its result is not in yet."""
        return self.t.retrain_requested is not None and self.t.retrain_outcome is None

    def poll(self, rows: int) -> None:
        code, status = get(f"{self.base}/api/v1/status")
        if code == 200 and isinstance(status, dict):
            now = self.clock()
            self._views(status, now, rows)
            self._jobs(status)
            self._alarm(status, now, rows)
        self._follow(rows)
        code, text = get(f"{self.base}/metrics")
        if code == 200 and isinstance(text, str):
            self.rows_ingested = metric_total(text, "driftd_ingest_rows_total")
            self.labels_joined = metric_total(text, "driftd_labels_joined_total")

    def _mark(self, when: Any) -> Mark:
        """An event at a time the daemon or the job recorded (its own clock on this host)."""
        when = float(when) if isinstance(when, (int, float)) else self.clock()
        return Mark(when, self.rows_at(when))

    # -- pieces of one poll --------------------------------------------------------------------
    def _views(self, status: dict[str, Any], now: float, rows: int) -> None:
        for version, view in (status.get("versions") or {}).items():
            window = view.get("window") or {}
            accuracy = window.get("accuracy") or {}
            estimate = window.get("estimate") or {}
            thresholds = {}
            for signal in (view.get("signals") or {}).values():
                for rule in signal.get("rules") or []:
                    value = rule.get("threshold")
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        thresholds[rule["rule"]] = float(value)
            self.live.append(LiveView(
                time=now, row=rows, model_version=version, accuracy=accuracy.get("accuracy_last_n"),
                labels=int(accuracy.get("labels_last_n") or 0), estimated_accuracy=estimate.get("estimated_accuracy"),
                thresholds=thresholds))

    def _alarm(self, status: dict[str, Any], now: float, rows: int) -> None:
        t = self.t
        if t.onset is None or t.first_alarm is not None or not status.get("alarms"):
            return
        alarm = status["alarms"][0]
        t.first_alarm, t.first_alarm_rule = Mark(now, rows), alarm["rule"]
        t.first_alarm_detail = (f"{alarm['rule']} on {alarm['model_version']}: value {alarm['value']:.4g} "
                                f"vs threshold {alarm['threshold']:.4g}")
        self.say(f"first alarm: {t.first_alarm_detail}, {rows - t.onset.row} rows and "
                 f"{now - t.onset.time:.1f} s after the onset")

    def _jobs(self, status: dict[str, Any]) -> None:
        t = self.t
        retrain = status.get("retrain") or {}
        jobs = [j for j in [*(retrain.get("queued") or []), retrain.get("running"), retrain.get("last")] if j]
        for job in sorted(jobs, key=lambda j: j["requested_at"]):
            if job["job_id"] in self._seen_jobs:
                continue
            self._seen_jobs.add(job["job_id"])
            if t.retrain_job is None:
                t.retrain_job, t.retrain_reason = job["job_id"], job["reason"]
                t.retrain_requested = self._mark(job["requested_at"])
                self._last_news = self.clock()
                if t.onset is not None and t.first_alarm is None and str(job["source"]).startswith("rule:"):
                    # the rule that asked for it fired then: the earliest alarm the daemon timed itself
                    t.first_alarm, t.first_alarm_rule = t.retrain_requested, str(job["source"])[len("rule:"):]
                    t.first_alarm_detail = job["reason"]
                    self.say(f"first alarm: {job['reason']}, {t.first_alarm.row - t.onset.row} rows and "
                             f"{t.first_alarm.time - t.onset.time:.1f} s after the onset")
                self.say(f"retrain requested (job {job['job_id']}): {job['reason']}")
            else:
                t.other_jobs.append(f"{job['job_id']} ({job['state']}): {job['reason']}")
                self.say(f"another retrain request, job {job['job_id']}: {job['reason']}")

    def _follow(self, rows: int) -> None:
        """Narrate the followed job's new progress events; record its result once it is in."""
        t = self.t
        if t.retrain_job is None or t.retrain_outcome is not None:
            return
        from retrain.jobdir import read_progress

        now = self.clock()
        events = read_progress(self.state_dir / "retrain" / t.retrain_job)
        if events and t.retrain_started is None:
            t.retrain_started = self._mark(events[0]["time"])
            self._last_news = now
        for event in events[len(self.progress):]:
            line = progress_line(event, self.max_epochs)
            if line:
                self.say(f"  {line}")
            self._last_news = now
        self.progress = events
        if now - self._last_news >= HEARTBEAT_SECONDS:
            if t.retrain_started is None and t.retrain_requested is not None:
                self.say(f"  retrain job starting ({now - t.retrain_requested.time:.0f} s since the request; "
                         "a new process imports torch and loads the data)")
            elif t.retrain_started is not None:
                self.say(f"  retrain still running ({now - t.retrain_started.time:.0f} s so far; "
                         "every progress line it writes is shown here)")
            self._last_news = now
        code, info = get(f"{self.base}/api/v1/retrain/{t.retrain_job}", self.token)
        if code != 200 or not isinstance(info, dict) or not info.get("result"):
            return
        result = info["result"]
        t.retrain_finished = self._mark(result.get("finished_at", now))
        t.retrain_outcome = str(result.get("outcome"))
        t.retrain_message = str(result.get("reason", ""))
        t.gate = result.get("gate") or {}
        if t.retrain_outcome == "promoted":
            t.promoted_version = result.get("candidate_version")
        took = "" if t.retrain_started is None else f" after {t.retrain_finished.time - t.retrain_started.time:.0f} s"
        self.say(f"retrain finished{took}: {t.retrain_outcome}"
                 + (f", {t.promoted_version} is now CURRENT in the registry" if t.promoted_version else ""))
        for line in gate_lines(t.gate, self.gate_thresholds) or [t.retrain_message]:
            self.say(f"  gate: {line}" if t.gate else f"  {line}")
