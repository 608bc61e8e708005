"""The loop in time: event time for every age, label time for accuracy, one retrain at a time,
the version lifecycle and rewritten files, driven through the real `driftd check` and daemon on
real Parquet files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from daemon_helpers import REPO, DaemonProcess, daemon_doc, free_port, write_config
from engine_helpers import build_reference, config_doc, inference_table, make_rows, write_inference, write_labels
from monitor.ingest.counters import (
    FEATURE_DIM,
    JOINED,
    LABELLED,
    LABELS,
    PRUNED,
    QUARANTINED_FILES,
    REWRITTEN,
    ROWS,
)

SEVENTY_DAYS = 70 * 86400.0


def _check(config: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "monitor", "check", "--config", str(config), "--json"],
                         capture_output=True, text=True, cwd=REPO, env=os.environ, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_one_check_pass_over_old_logs_and_labels_scores_every_window(tmp_path: Path) -> None:
    """Logs stamped 70 days ago, all inference files before the label file: labels are joined
    first and every window is scored; nothing is pruned by a wall clock."""
    ref = build_reference(tmp_path)
    rows = make_rows(1000, seed=5, start=time.time() - SEVENTY_DAYS)
    write_inference(tmp_path / "logs", rows, per_file=250)
    write_labels(tmp_path / "labels", rows, delay=3600.0)
    config = write_config(tmp_path, config_doc(tmp_path, ref))

    report = _check(config)
    windows = report["windows"]
    assert len(windows) == 5
    hits = rows.probs.argmax(1) == rows.label
    for i, w in enumerate(windows):
        assert w["labelled"]["labels"] == 200
        assert w["labelled"]["accuracy"] == pytest.approx(hits[200 * i: 200 * (i + 1)].mean())
    # label time: evaluations every 200 labels over the last N (500 in the test config)
    evaluations = report["label_evaluations"]
    assert [e["new_labels"] for e in evaluations] == [200] * 5
    assert evaluations[-1]["accuracy"]["accuracy_last_n"] == pytest.approx(hits[-500:].mean())
    counters = {(c["name"], c["key"]): c["value"] for c in report["counters"]}
    assert counters[(LABELS, JOINED)] == 1000 and (LABELLED, PRUNED) not in counters
    assert report["event_time"] == pytest.approx(rows.timestamp.max(), abs=1e-3)


@pytest.mark.slow
def test_a_daemon_catching_up_on_an_old_backlog_fires_accuracy_drop_once(tmp_path: Path) -> None:
    """A backlog 70 days old whose accuracy fell: the accuracy rule fires from the labels (read
    after every inference file), and the two retrain rules that breach make one job."""
    ref = build_reference(tmp_path)
    start = time.time() - SEVENTY_DAYS
    clean = make_rows(600, seed=8, start=start)
    shifted = make_rows(1400, seed=9, shift=2.5, noise=3.0, start=start + 600)  # accuracy 0.99 -> ~0.66
    write_inference(tmp_path / "logs", clean, per_file=200, name="a")
    write_inference(tmp_path / "logs", shifted, per_file=200, name="b")
    write_labels(tmp_path / "labels", clean, delay=900.0, name="l1")
    write_labels(tmp_path / "labels", shifted, delay=900.0, name="l2")
    port = free_port()
    rules = [
        {"name": "accuracy_drop", "signal": "accuracy", "drop_from_reference": 0.05, "min_rows": 200, "consecutive": 2,
         "confidence": 0.95, "action": "retrain"},  # the default rule
        {"name": "drift_retrain", "signal": "activation_max_abs_shift", "threshold": 6.0, "action": "retrain"},
    ]
    cfg = write_config(tmp_path, daemon_doc(tmp_path, ref, port, **{"policy.cooldown_seconds": 3600,
                                                                      "policy.rules": rules}))
    d = DaemonProcess(cfg, port).start()
    try:
        d.wait_ready()
        d.wait_log("retrain queued as job")
        status = d.wait_for(lambda: (s := d.json("/api/v1/status"))["retrain"]["last"] and s, desc="the job to end")
        assert {a["rule"] for a in status["alarms"]} == {"accuracy_drop", "drift_retrain"}
        log = d.log()
        assert log.count("retrain queued as job") == 1  # one job, however many rules breached
        assert "joined the retrain queued for rule" in log
        job = status["retrain"]["last"]
        assert job["model_version"] == "v1" and set(job["monitor"]["rules"]) == {"accuracy_drop", "drift_retrain"}
        # the onset: the start of the first breaching window, in the stream's time
        assert shifted.timestamp[0] - 1 <= job["monitor"]["onset"] < shifted.timestamp[0] + 200
        assert "rule accuracy_drop: accuracy=" in job["reason"] and "rule drift_retrain:" in job["reason"]
        # nothing was pruned or expired by a wall clock 70 days on
        assert d.metric("driftd_labelled_rows_pruned_total", model="test-model") == 0
        assert d.metric("driftd_labels_joined_total", model="test-model") == 2000
        assert d.metric("driftd_pending_predictions", model="test-model") == 0
        assert d.metric("driftd_event_time_seconds", model="test-model") == pytest.approx(shifted.timestamp[-1], abs=1)
        assert d.stop() == 0
    finally:
        d.kill()


@pytest.mark.slow
def test_traffic_moving_to_a_new_version_retires_the_old_ones_alarms(tmp_path: Path) -> None:
    """Without a registry, a version whose traffic moved to another one is retired: its alarms
    clear, it is judged no more, and it leaves status once its rows are window.seconds old."""
    ref = build_reference(tmp_path)
    build_reference(tmp_path, version="v2", seed=2)
    start = time.time() - 3000
    write_inference(tmp_path / "logs", make_rows(400, seed=11, shift=2.5, start=start), per_file=200, name="a")
    port = free_port()
    doc = daemon_doc(tmp_path, ref, port, **{
        "window.seconds": 600.0,
        "policy.rules": [{"name": "shift", "signal": "activation_max_abs_shift", "threshold": 6.0, "action": "alert"}]})
    cfg = write_config(tmp_path, doc)
    d = DaemonProcess(cfg, port).start()
    try:
        d.wait_ready()
        d.wait_for(lambda: d.metric("driftd_alarm", model_version="v1", rule="shift") == 1, desc="v1's alarm")
        # the service switched to v2: its first row comes after v1's last
        write_inference(tmp_path / "logs", make_rows(400, seed=12, version="v2", start=start + 500, prefix="n"),
                        per_file=200, name="b")
        d.wait_log("model_version v1 is no longer served (its traffic moved on or stopped): cleared its alarms")
        status = d.json("/api/v1/status")
        assert status["alarms"] == [] and status["versions"]["v1"]["served"] is False
        assert d.metric("driftd_alarm", model_version="v1", rule="shift") == 0
        # v2 traffic goes on; v1's rows are now more than window.seconds older than the stream
        write_inference(tmp_path / "logs", make_rows(400, seed=13, version="v2", start=start + 1500, prefix="m"),
                        per_file=200, name="c")
        d.wait_for(lambda: "v1" not in d.json("/api/v1/status")["versions"], desc="v1 to leave status")
        assert d.metric("driftd_alarm", model_version="v1", rule="shift") is None
        assert d.metric("driftd_ingest_rows_total", model_version="v1") is None
        assert d.stop() == 0
    finally:
        d.kill()


def test_a_file_rewritten_after_it_was_read_is_quarantined_as_rewritten(tmp_path: Path) -> None:
    ref = build_reference(tmp_path)
    rows = make_rows(600, seed=14, start=time.time() - 1000)
    [path] = write_inference(tmp_path / "logs", rows.slice(0, 300), per_file=300)
    config = write_config(tmp_path, config_doc(tmp_path, ref))
    first = _check(config)
    assert sum(w["rows"] for w in first["windows"]) == 200  # one window closed, 100 rows open
    pq.write_table(inference_table(rows.slice(300, 600)), path)  # the producer rewrote it in place
    os.utime(path, (time.time() + 5, time.time() + 5))
    second = _check(config)
    counters = {(c["name"], c["key"]): c["value"] for c in second["counters"]}
    assert counters[(QUARANTINED_FILES, REWRITTEN)] == 1
    assert counters[(ROWS, "v1")] == 300  # never read twice
    third = _check(config)  # and recorded once
    assert {(c["name"], c["key"]): c["value"] for c in third["counters"]}[(QUARANTINED_FILES, REWRITTEN)] == 1
    from monitor.ingest.store import connect_readonly

    conn = connect_readonly(tmp_path / "state")
    [(reason, message)] = conn.execute("SELECT reason, message FROM quarantine").fetchall()
    conn.close()
    assert reason == REWRITTEN and "rewritten in place after driftd read 300 rows" in message


def test_sighup_with_the_reference_directory_gone_keeps_the_references(tmp_path: Path) -> None:
    import shutil

    from monitor.config import parse_config
    from monitor.engine.cycle import Engine
    from monitor.errors import ReferenceMissingError

    ref = build_reference(tmp_path)
    config = parse_config(config_doc(tmp_path, ref), source="t", base=tmp_path).monitor
    engine = Engine(config)
    try:
        shutil.rmtree(ref)
        with pytest.raises(ReferenceMissingError, match="reference directory is missing; keeping the 1 reference"):
            engine.reload_references()
        assert set(engine.references) == {"v1"}
        # a file of another width is still refused for it, not counted as rows without a reference
        other = make_rows(50, seed=1, start=time.time())
        other.features = np.zeros((50, 32), np.float32)
        write_inference(tmp_path / "logs", other, per_file=50)
        engine.run_cycle()
        counters = engine.counters()
        assert counters[(QUARANTINED_FILES, FEATURE_DIM)] == 1 and (ROWS, "v1") not in counters
    finally:
        engine.close()


def test_the_monitors_evidence_becomes_the_jobs_arguments() -> None:
    from retrain.launch.choose import breach_of

    breach = breach_of({"monitor": {"onset": 1_790_000_123.25, "domain_gap": 0.43, "mmd2": 0.12, "rules": ["a"]}})
    assert breach.argv() == ["--onset", "1790000123.25", "--domain-gap", "0.43", "--mmd", "0.12"]
    assert breach_of({"monitor": {"event_time": 1.0}}) is None  # a manual request: the job measures itself
    assert breach_of({"monitor": {"onset": -5.0}}) is None       # unusable evidence is not passed on


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_replay_of_logs_stamped_70_days_ago_retrains_under_the_default_config(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The issue's case: old logs, labels arriving in their own file, the default rules and recipe.
    The real daemon joins, judges accuracy in label time, queues exactly one job, and the real
    job trains on the replayed rows (nothing was pruned or looked back past by a wall clock)."""
    import torch
    import yaml

    from retrain_helpers import build_world, digits, source_checkpoint

    torch.set_num_threads(1)
    d = digits()
    checkpoint = source_checkpoint(tmp_path_factory.getbasetemp(), d)
    old = time.time() - SEVENTY_DAYS
    world = build_world(tmp_path, checkpoint, d, timestamps=old + np.arange(597) * 0.5, clean_rows=200, join=False)
    built = subprocess.run([sys.executable, "-m", "monitor", "reference", "build", "--logs", str(tmp_path / "replay"),
                            "--out", str(tmp_path / "reference")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert built.returncode == 0, built.stderr
    port = free_port()
    doc = yaml.safe_load(world.config_path.read_text())
    (tmp_path / "token").write_text("t0ken\n")
    doc.update({"http": {"port": port, "token_file": str(tmp_path / "token")}, "ingest": {"settle_seconds": 0.0},
                "scheduler": {"interval_seconds": 0.5, "retrain_poll_seconds": 0.2},
                "window": {"rows": 100, "seconds": 100_000.0, "min_rows": 20}})
    world.config_path.write_text(yaml.safe_dump(doc))
    daemon = DaemonProcess(world.config_path, port).start()
    try:
        daemon.wait_ready()
        daemon.wait_log("retrain queued as job")
        status = daemon.wait_for(lambda: (s := daemon.json("/api/v1/status"))["retrain"]["last"] and s,
                                 timeout=1200, desc="the retrain job to finish")
        job = status["retrain"]["last"]
        result = job["result"]
        assert job["outcome"] in ("promoted", "rejected"), result["reason"]
        assert "labelled rows in the last" not in result["reason"]  # the lookback found the replayed rows
        assert result["labelled_rows"] > 0 and "accuracy_drop" in job["monitor"]["rules"]
        assert daemon.log().count("retrain queued as job") == 1
        assert daemon.metric("driftd_labelled_rows_pruned_total", model="digits") == 0
        if job["outcome"] == "promoted":
            daemon.wait_log("model_version v1 is no longer served (CURRENT is v2)")
            assert [a for a in daemon.json("/api/v1/status")["alarms"] if a["model_version"] == "v1"] == []
        assert daemon.stop() == 0
    finally:
        daemon.kill()
