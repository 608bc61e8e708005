"""Shared helpers for the daemon tests: typed fake windows for unit tests, and a real daemon process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from monitor.signals.results import (
    AccuracyStats,
    ActivationStats,
    DimShift,
    EstimateStats,
    LabelEvaluation,
    MmdResult,
    OnlineMmdStatus,
    PredictionStats,
    WindowSignals,
)
from waiting import STALL_SECONDS, cpu_progress, wait_until


REPO = Path(__file__).resolve().parent.parent

# Counters that move only when the daemon does work (ingests, joins, evaluates, retrains), unlike
# the cycle count or the last-cycle timestamp, which an idle daemon advances too.
WORK_COUNTERS = frozenset({
    "driftd_ingest_rows_total", "driftd_ingest_files_total", "driftd_ingest_rejected_rows_total",
    "driftd_ingest_quarantined_files_total", "driftd_labels_joined_total", "driftd_labels_unmatched_total",
    "driftd_labels_duplicate_total", "driftd_windows_total", "driftd_retrain_runs_total", "driftd_retrain_epoch",
    "driftd_retrain_in_progress", "driftd_job_errors_total", "driftd_online_mmd_alarms_total",
})


def make_window(
    model_version: str = "v1",
    *,
    index: int = 0,
    rows: int = 500,
    mmd_p_value: float | None = 0.5,
    accuracy: float | None = None,
    labels: int = 0,
    estimated_accuracy: float | None = None,
    online_alarm: bool = False,
    max_abs_shift: float = 1.0,
) -> WindowSignals:
    """A WindowSignals with plausible values; override the ones a test is about."""
    return WindowSignals(
        model_version=model_version,
        index=index,
        start_time=1_700_000_000.0 + 60 * index,
        end_time=1_700_000_059.0 + 60 * index,
        rows=rows,
        activations=ActivationStats(
            max_abs_shift=max_abs_shift, mean_abs_shift=0.5, share_significant=0.0,
            max_abs_log_variance_ratio=0.1, mean_variance_ratio=1.0,
            top_dims=(DimShift(7, max_abs_shift, 1.1), DimShift(3, -0.8, 0.9)),
        ),
        predictions=PredictionStats(
            entropy_mean=0.3, entropy_p50=0.25, entropy_p90=0.6, max_prob_mean=0.8, max_prob_p10=0.5,
            max_prob_p50=0.85, class_tvd=0.05, class_chi2_p_value=0.4, class_share=(0.5, 0.5),
        ),
        mmd=None if mmd_p_value is None else MmdResult(0.001, mmd_p_value, 100, rows, 1000, 1.5),
        online=OnlineMmdStatus(0.01, 0.05, online_alarm, 1 if online_alarm else 0, rows, rows if online_alarm else None),
        accuracy=AccuracyStats(
            accuracy_last_n=accuracy, labels_last_n=labels, accuracy_last_seconds=accuracy,
            labels_last_seconds=labels, per_class_recall={}, label_delay_p50_seconds=None, label_delay_p90_seconds=None,
        ),
        estimate=None if estimated_accuracy is None else EstimateStats(estimated_accuracy, 0.9),
    )


def make_evaluation(model_version: str = "v1", *, index: int = 0, accuracy: float | None = 0.9, labels: int = 500,
                    start_time: float | None = None) -> LabelEvaluation:
    """A label-time accuracy evaluation over ``labels`` labels (the accuracy rules judge these)."""
    start = 1_700_000_000.0 + 60 * index if start_time is None else start_time
    return LabelEvaluation(
        model_version=model_version, index=index, start_time=start, end_time=start + 59.0, new_labels=labels,
        accuracy=AccuracyStats(
            accuracy_last_n=accuracy, labels_last_n=labels, accuracy_last_seconds=accuracy, labels_last_seconds=labels,
            per_class_recall={}, label_delay_p50_seconds=None, label_delay_p90_seconds=None,
        ),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DaemonProcess:
    """``python -m monitor run`` as a subprocess, its log in a file, with small HTTP helpers."""

    def __init__(self, config_path: Path, port: int, *, env: dict[str, str] | None = None, log_format: str = "text"):
        self.config_path = config_path
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = config_path.with_suffix(f".{port}.{time.monotonic_ns()}.log")
        self.env = {**os.environ, **(env or {})}
        self.log_format = log_format
        self.proc: subprocess.Popen | None = None

    def start(self) -> "DaemonProcess":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "monitor", "run", "--config", str(self.config_path), "--log-format", self.log_format],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text()

    def get(self, path: str, *, token: str | None = None, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, path: str, **kw) -> Any:
        status, body = self.get(path, **kw)
        if status >= 400:
            raise AssertionError(f"{path}: HTTP {status}: {body!r}\n--- daemon log ---\n{self.log()}")
        return json.loads(body)

    def progress(self) -> tuple[Any, ...]:
        """What this daemon has done so far: its log's size, its work counters and, while it is
        still starting (no /metrics yet), the CPU time it has used. Waits extend while it changes."""
        size = self.log_path.stat().st_size if self.log_path.exists() else 0
        try:
            counters: tuple[float, ...] | None = self._work_counters()
        except (OSError, urllib.error.URLError):
            counters = None
        cpu = cpu_progress(self.proc.pid) if self.proc is not None and self.proc.poll() is None else None
        return size, counters, cpu

    def _work_counters(self) -> tuple[float, ...]:
        from prometheus_client.parser import text_string_to_metric_families

        status, body = self.get("/metrics")
        if status != 200:
            return ()
        return tuple(sorted(
            (sample.name, tuple(sorted(sample.labels.items())), sample.value)
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples if sample.name in WORK_COUNTERS))

    def _check_alive(self, desc: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"driftd exited with {self.proc.returncode} while waiting for {desc}\n{self.log()}")

    def _log_tail(self) -> str:
        return f"--- daemon log ---\n{self.log()}" if self.log_path.exists() else ""

    def wait_for(self, what: Callable[[], Any], timeout: float = STALL_SECONDS, desc: str = "") -> Any:
        """Until ``what()`` is truthy. ``timeout`` counts seconds without progress (see progress()),
        not seconds in all: a slow daemon that keeps working is waited for."""
        return wait_until(what, desc, progress=self.progress, stall_seconds=timeout,
                          check=lambda: self._check_alive(desc), context=self._log_tail)

    def wait_ready(self, timeout: float = STALL_SECONDS) -> None:
        self.wait_for(lambda: self.get("/readyz")[0] == 200, timeout, "/readyz 200")

    def wait_log(self, text: str, timeout: float = STALL_SECONDS) -> str:
        return self.wait_for(lambda: text in self.log() and self.log(), timeout, repr(text))

    def metric(self, name: str, **labels: str) -> float | None:
        from prometheus_client.parser import text_string_to_metric_families

        _, body = self.get("/metrics")
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def write_config(tmp: Path, doc: dict, name: str = "driftd.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def daemon_doc(tmp: Path, ref_dir: Path, port: int, **overrides: Any) -> dict:
    """The engine tests' config plus fast scheduler settings, a token file and a policy."""
    from engine_helpers import config_doc

    token = tmp / "token"
    if not token.exists():
        token.write_text(TOKEN + "\n")
    base = {
        "http.port": port,
        "http.token_file": str(token),
        "scheduler.interval_seconds": 0.3,
        "scheduler.shutdown_grace_seconds": 10.0,
        "scheduler.retrain_poll_seconds": 0.1,
        "retrain.registry_dir": str(tmp / "registry"),
        "retrain.min_labelled_rows": 100,
    }
    return config_doc(tmp, ref_dir, **{**base, **overrides})


TOKEN = "test-token-0123456789"
