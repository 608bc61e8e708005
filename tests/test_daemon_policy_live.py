"""Rules acting in the running daemon: deferral until labels, a rule-triggered retrain, cooldown, SIGHUP."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from daemon_helpers import DaemonProcess, daemon_doc, free_port, write_config
from engine_helpers import build_reference, make_rows, write_inference, write_labels

pytestmark = pytest.mark.slow

RULES = [
    {"name": "shift", "signal": "activation_max_abs_shift", "op": "above", "threshold": 6.0, "action": "retrain"},
    {"name": "shift_twice", "signal": "activation_max_abs_shift", "op": "above", "threshold": 6.0, "consecutive": 2,
     "action": "retrain"},
]


def test_deferral_retrain_cooldown_and_reload(tmp_path: Path) -> None:
    ref = build_reference(tmp_path)
    start = time.time() - 900
    first = make_rows(200, seed=21, shift=1.5, start=start)
    write_inference(tmp_path / "logs", first, per_file=200, name="a")
    port = free_port()
    doc = daemon_doc(tmp_path, ref, port, **{"policy.rules": RULES, "policy.cooldown_seconds": 3600})
    cfg = write_config(tmp_path, doc)
    d = DaemonProcess(cfg, port).start()
    try:
        d.wait_ready()
        # a label-free rule: the retrain waits for labels of predictions made after the breach began
        line = d.wait_log("retrain deferred until 100 labelled rows predicted after the onset at")
        assert "(have 0)" in line
        assert "rule shift: activation_max_abs_shift=" in line and "above threshold 6 for model_version v1" in line
        assert d.metric("driftd_retrain_runs_total", model="test-model", outcome="deferred") == 1
        assert d.json("/api/v1/status")["policy"]["pending"]["outcome"] == "deferred"

        write_labels(tmp_path / "labels", first, delay=30.0)  # labels arrive: the deferred retrain goes
        d.wait_log("retrain queued as job")
        status = d.json("/api/v1/status")
        job = (status["retrain"]["queued"] + [status["retrain"]["running"], status["retrain"]["last"]])
        job = next(j for j in job if j)
        assert job["source"] == "rule:shift" and job["reason"].startswith("rule shift: activation_max_abs_shift=")

        write_inference(tmp_path / "logs", make_rows(200, seed=22, shift=1.5, start=start + 300), per_file=200, name="b")
        line = d.wait_log("in cooldown until")
        assert "rule shift_twice:" in line.split("in cooldown until")[0].splitlines()[-1]
        assert d.metric("driftd_threshold_breaches_total", model="test-model", rule="shift") == 2
        assert "joined retrain job" in line  # recorded on the job queued first
        assert d.metric("driftd_alarm", model="test-model", model_version="v1", rule="shift_twice") == 1
        assert d.metric("driftd_retrain_runs_total", model="test-model", outcome="deferred") == 1
        status = d.json("/api/v1/status")
        assert status["policy"]["pending"]["outcome"] == "cooldown"
        assert {a["rule"] for a in status["alarms"]} == {"shift", "shift_twice"}

        # SIGHUP with a valid change: policy reloaded, the port change needs a restart
        doc["policy"]["rules"] = RULES + [{"name": "tvd", "signal": "class_tvd", "threshold": 0.5}]
        doc["http"]["port"] = free_port()
        write_config(tmp_path, doc)
        build_reference(tmp_path, n=400, version="v2")  # a new model_version's reference, picked up on SIGHUP
        assert "v2" not in d.json("/api/v1/status")["versions"]
        d.proc.send_signal(signal.SIGHUP)
        d.wait_log("SIGHUP: configuration reloaded")
        d.wait_for(lambda: "v2" in d.json("/api/v1/status")["versions"], desc="v2 reference loaded")
        assert d.metric("driftd_ingest_rows_total", model="test-model", model_version="v2") == 0
        assert "SIGHUP: http.port changed; these take effect only after a restart" in d.log()
        assert [r["name"] for r in d.json("/api/v1/status")["rules"]] == ["shift", "shift_twice", "tvd"]
        assert d.json("/api/v1/status")["policy"]["pending"]["outcome"] == "cooldown"  # state carried over

        # SIGHUP with a broken file: the running config stays
        cfg.write_text(cfg.read_text() + "\nwindoww: {rows: 5}\n")
        d.proc.send_signal(signal.SIGHUP)
        line = d.wait_log("config reload failed, keeping the running configuration")
        assert "windoww: unknown key" in d.log()
        assert d.get("/healthz")[0] == 200
        assert [r["name"] for r in d.json("/api/v1/status")["rules"]] == ["shift", "shift_twice", "tvd"]
        assert d.stop() == 0
    finally:
        d.kill()
