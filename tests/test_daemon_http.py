"""The real daemon as a subprocess on a free port: metrics, status, the control API and its token."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon_helpers import TOKEN, DaemonProcess, daemon_doc, free_port, write_config
from engine_helpers import build_reference, make_rows, write_inference
from monitor.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture
def daemon(tmp_path: Path):
    ref = build_reference(tmp_path)
    write_inference(tmp_path / "logs", make_rows(1000, seed=10), per_file=250, name="a")
    port = free_port()
    proc = DaemonProcess(write_config(tmp_path, daemon_doc(tmp_path, ref, port)), port).start()
    yield proc
    proc.kill()


def test_metrics_status_and_control_api(daemon: DaemonProcess, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    daemon.wait_ready()
    daemon.wait_for(lambda: daemon.metric("driftd_windows_total", model_version="v1") == 5, desc="5 windows")
    m = {"model": "test-model"}
    assert daemon.metric("driftd_ingest_rows_total", **m, model_version="v1") == 1000
    assert daemon.metric("driftd_ingest_files_total", **m, kind="inference") == 4
    assert daemon.metric("driftd_ingest_files_total", **m, kind="labels") == 0
    assert daemon.metric("driftd_retrain_runs_total", **m, outcome="deferred") == 0
    assert daemon.metric("driftd_window_rows", **m, model_version="v1") == 200
    assert 0 < daemon.metric("driftd_mmd_p_value", **m, model_version="v1") <= 1
    assert daemon.metric("driftd_reference_accuracy", **m, model_version="v1") > 0.9
    assert daemon.metric("driftd_alarm", **m, rule="accuracy_drop") == 0
    assert daemon.metric("driftd_cycle_duration_seconds_count", **m) >= 1
    assert daemon.metric("driftd_build_info", version="0.1.0") == 1
    assert daemon.get("/healthz")[0] == 200

    promtool = shutil.which("promtool")
    if promtool is not None:
        out = subprocess.run([promtool, "check", "metrics"], input=daemon.get("/metrics")[1], capture_output=True, timeout=30)
        assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
    elif os.environ.get("CI"):
        pytest.fail("promtool is required in CI (apt-get install -y prometheus)")

    status = daemon.json("/api/v1/status")
    assert status["model"] == "test-model" and status["ready"] is True
    v1 = status["versions"]["v1"]
    assert v1["window"]["index"] == 4 and v1["reference"]["accuracy"] > 0.9
    [rule] = v1["signals"]["mmd_p_value"]["rules"]
    assert rule == {"rule": "mmd_p_value", "op": "below", "threshold": 0.05, "action": "alert", "alarm": False}
    assert status["retrain"]["queued"] == [] and status["retrain"]["last"] is None

    # control endpoints: no token / wrong token -> 401 and nothing queued
    assert daemon.get("/api/v1/retrain", method="POST", body=b'{"reason": "x"}')[0] == 401
    assert daemon.get("/api/v1/retrain", method="POST", body=b'{"reason": "x"}', token="wrong")[0] == 401
    assert not (tmp_path / "state" / "retrain").exists() or not any((tmp_path / "state" / "retrain").iterdir())
    assert daemon.json("/api/v1/status")["retrain"]["last"] is None
    status_code, body = daemon.get("/api/v1/retrain", method="POST", body=b"{not json", token=TOKEN)
    assert status_code == 400 and b"not valid JSON" in body
    assert daemon.get("/nope")[0] == 404
    assert daemon.get("/metrics", method="POST", body=b"")[0] == 405
    assert TOKEN not in daemon.log()

    # a retrain through the CLI, waited for; the outcome is counted once
    code = main(["retrain", "--config", str(daemon.config_path), "--reason", "operator asked", "--wait", "--poll-seconds", "0.2",
                 "--timeout", "90"])
    out = capsys.readouterr().out
    job_id = out.split("queued as job ")[1].split()[0]
    info = daemon.json(f"/api/v1/retrain/{job_id}", token=TOKEN)
    assert info["state"] == "finished" and info["reason"] == "operator asked" and info["source"] == "api"
    outcome = info["outcome"]
    assert outcome in ("promoted", "rejected", "failed")
    assert code == (1 if outcome == "failed" else 0)
    assert f"job {job_id}: {outcome}" in out
    assert daemon.metric("driftd_retrain_runs_total", model="test-model", outcome=outcome) == 1
    assert daemon.get(f"/api/v1/retrain/{job_id}")[0] == 401
    assert daemon.get("/api/v1/retrain/unknown", token=TOKEN)[0] == 404

    # driftd status: table and --json
    assert main(["status", "--config", str(daemon.config_path)]) == 0
    table = capsys.readouterr().out
    assert "model test-model" in table and "mmd_p_value" in table and f"last retrain {job_id}: {outcome}" in table
    assert "\nhealth: ok: last cycle succeeded " in table
    assert main(["status", "--config", str(daemon.config_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["retrain"]["last"]["job_id"] == job_id

    assert daemon.stop() == 0


def test_cli_errors_say_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ref = build_reference(tmp_path, n=500)
    port = free_port()
    cfg = write_config(tmp_path, daemon_doc(tmp_path, ref, port))
    assert main(["status", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach driftd at http://127.0.0.1:{port}" in err and "is `driftd run` running?" in err
    # non-loopback without a token: refused before anything starts (exit 2)
    doc = daemon_doc(tmp_path, ref, port, **{"http.host": "0.0.0.0"})
    del doc["http"]["token_file"]
    bad = write_config(tmp_path, doc, "open.yaml")
    assert main(["run", "--config", str(bad)]) == 2
    assert "http.host: '0.0.0.0' is not a loopback address" in capsys.readouterr().err
    assert main(["config", "validate", "--config", str(bad)]) == 2
    assert main(["config", "validate"]) == 2
    assert "pass --config FILE" in capsys.readouterr().err
    assert main(["config", "validate", "--signals"]) == 0
    assert "estimated_accuracy\n" in capsys.readouterr().out
    assert main(["config", "validate", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and "policy: default rules: online_mmd_alarm (alert)" in out
    # --local runs the real job in this process; with an empty registry it fails and says why
    assert main(["retrain", "--config", str(cfg), "--local", "--reason", "by hand"]) == 1
    captured = capsys.readouterr()
    assert "[retrain] started on cpu" in captured.err and "[retrain] failed: RegistryError" in captured.err
    assert "-local: failed (RegistryError:" in captured.out and "no promoted model yet" in captured.out
