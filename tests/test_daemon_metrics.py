"""Prometheus export from a snapshot, and sd_notify datagrams on a real socket."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from daemon_helpers import make_window
from monitor.ingest.counters import (
    FILES,
    JOINED,
    LABELLED,
    LABELS,
    NON_FINITE,
    PRUNED,
    REJECTED_ROWS,
    ROWS,
    ROWS_WITHOUT_REFERENCE,
    WINDOWS,
)
from monitor.service.metrics import Metrics, MetricsSnapshot, RetrainProgress
from monitor.service.notify import Notifier


def _snapshot() -> MetricsSnapshot:
    return MetricsSnapshot(
        model="digits",
        counters={(ROWS, "v1"): 1200.0, (LABELLED, PRUNED): 9.0, (FILES, "inference"): 3.0, (REJECTED_ROWS, NON_FINITE): 4.0,
                  (LABELS, JOINED): 50.0, (WINDOWS, "v1"): 2.0, (ROWS_WITHOUT_REFERENCE, "v9"): 7.0},
        model_versions=("v1", "v2", "v9"),  # v9: rows but no reference
        reference_accuracy={"v1": 0.93, "v2": None},
        windows={"v1": make_window("v1", accuracy=0.8, labels=300, online_alarm=True, estimated_accuracy=0.85)},
        lag_seconds=2.5,
        last_success=1_800_000_000.0,
        alarms={("accuracy_drop", "v1"): True, ("mmd_p_value", "v1"): False, ("accuracy_drop", "v2"): False},
        thresholds={("accuracy_drop", "v1"): 0.88, ("mmd_p_value", "v1"): 0.01},
        watermark=1_799_999_990.0, pending_predictions=120.0, pending_labels=3.0,
        on_promote={("webhook", "failed"): 2.0},
        breaches={"accuracy_drop": 3.0},
        retrain_runs={"promoted": 1.0},
        retrain_in_progress=True,
        current_version="v1",
        progress=RetrainProgress(epoch=2.0, grad_norm=0.7, weight_drift=0.01),
        build_version="0.1.0",
    )


def _registry(snapshot: MetricsSnapshot) -> tuple[CollectorRegistry, Metrics]:
    registry = CollectorRegistry()
    return registry, Metrics(snapshot.model, registry, lambda: snapshot)


def test_values_users_see() -> None:
    registry, metrics = _registry(_snapshot())
    metrics.observe_cycle(0.3, [5.0, 120.0])
    v = registry.get_sample_value
    m = {"model": "digits"}
    assert v("driftd_ingest_rows_total", {**m, "model_version": "v1"}) == 1200
    assert v("driftd_ingest_rows_total", {**m, "model_version": "v2"}) == 0  # exists from the start
    assert v("driftd_ingest_files_total", {**m, "kind": "labels"}) == 0
    assert v("driftd_ingest_rejected_rows_total", {**m, "reason": NON_FINITE}) == 4
    assert v("driftd_labels_joined_total", m) == 50 and v("driftd_labels_duplicate_total", m) == 0
    assert v("driftd_rows_without_reference_total", {**m, "model_version": "v9"}) == 7
    assert v("driftd_job_errors_total", {**m, "job": "cycle"}) == 0
    assert v("driftd_window_accuracy", {**m, "model_version": "v1"}) == pytest.approx(0.8)
    assert math.isnan(v("driftd_window_accuracy", {**m, "model_version": "v2"}))
    assert v("driftd_online_mmd_alarms_total", {**m, "model_version": "v1"}) == 1
    assert v("driftd_top_shifted_dimension", {**m, "model_version": "v1", "rank": "1"}) == 7
    assert v("driftd_reference_accuracy", {**m, "model_version": "v1"}) == pytest.approx(0.93)
    assert v("driftd_alarm", {**m, "model_version": "v1", "rule": "accuracy_drop"}) == 1
    assert v("driftd_alarm", {**m, "model_version": "v2", "rule": "accuracy_drop"}) == 0  # per version
    assert v("driftd_rule_threshold", {**m, "model_version": "v1", "rule": "accuracy_drop"}) == pytest.approx(0.88)
    assert v("driftd_labelled_rows_pruned_total", m) == 9 and v("driftd_predictions_expired_total", m) == 0
    assert v("driftd_pending_predictions", m) == 120 and v("driftd_pending_labels", m) == 3
    assert v("driftd_event_time_seconds", m) == 1_799_999_990.0
    assert v("driftd_on_promote_runs_total", {**m, "kind": "webhook", "outcome": "failed"}) == 2
    assert v("driftd_on_promote_runs_total", {**m, "kind": "command", "outcome": "ok"}) == 0
    assert v("driftd_threshold_breaches_total", {**m, "rule": "mmd_p_value"}) == 0
    assert v("driftd_retrain_runs_total", {**m, "outcome": "deferred"}) == 0
    assert v("driftd_retrain_runs_total", {**m, "outcome": "promoted"}) == 1
    assert v("driftd_retrain_in_progress", m) == 1
    assert v("driftd_model_info", {**m, "model_version": "v1"}) == 1
    assert v("driftd_retrain_epoch", m) == 2
    assert v("driftd_build_info", {"version": "0.1.0"}) == 1
    assert v("driftd_cycle_duration_seconds_count", m) == 1
    assert v("driftd_label_delay_seconds_bucket", {**m, "le": "60.0"}) == 1
    assert v("driftd_retrain_duration_seconds_count", m) == 0


def test_promtool_accepts_the_exposition(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI: apt-get install -y prometheus")
        pytest.skip("promtool not installed (apt-get install -y prometheus)")
    registry, _ = _registry(_snapshot())
    out = subprocess.run([promtool, "check", "metrics"], input=generate_latest(registry), capture_output=True, timeout=30)
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()


def test_empty_snapshot_renders() -> None:
    registry, _ = _registry(MetricsSnapshot(model="m"))
    text = generate_latest(registry).decode()
    assert 'driftd_retrain_in_progress{model="m"} 0.0' in text
    assert 'driftd_ingest_files_total{kind="inference",model="m"} 0.0' in text
    assert 'driftd_ingest_quarantined_files_total{model="m",reason="schema"} 0.0' in text
    assert 'driftd_ingest_rejected_rows_total{model="m",reason="non_finite"} 0.0' in text


def _listen(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(("\0" + address[1:]) if address.startswith("@") else address)
    sock.settimeout(2)
    return sock


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_datagrams(tmp_path: Path, abstract: bool) -> None:
    address = f"@driftd-test-{os.getpid()}" if abstract else str(tmp_path / "notify.sock")
    with _listen(address) as sock:
        n = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
        assert n.watchdog_interval == 1.0
        assert n.ready("ready: 2 references")
        assert sock.recv(4096) == b"READY=1\nSTATUS=ready: 2 references"
        n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        n.stopping()
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"


def test_notify_is_quiet_without_socket() -> None:
    n = Notifier.from_env({})
    assert not n.enabled and not n.ready("x") and n.watchdog_interval is None
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "10", "WATCHDOG_PID": "1"}).watchdog_interval is None
