"""Process lifecycle: sd_notify, /readyz before the first scan, SIGTERM exit 0, resume with identical counts."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from daemon_helpers import DaemonProcess, daemon_doc, free_port, write_config
from engine_helpers import build_reference, make_rows, write_inference
from monitor.config import parse_config
from monitor.service.daemon import Daemon
from monitor.service.notify import Notifier


class _Listener(threading.Thread):
    """Reads sd_notify datagrams as systemd would, so the daemon's socket never fills up."""

    def __init__(self, address: str):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:])
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> list[str]:
        self.done.set()
        self.join(5)
        self.sock.close()
        return self.messages


@pytest.mark.slow
def test_sigterm_notify_and_resume_with_identical_counts(tmp_path: Path) -> None:
    ref = build_reference(tmp_path)
    write_inference(tmp_path / "logs", make_rows(1000, seed=10), per_file=250, name="a")
    port = free_port()
    cfg = write_config(tmp_path, daemon_doc(tmp_path, ref, port))
    address = f"@driftd-test-{os.getpid()}-{port}"
    listener = _Listener(address)
    listener.start()
    d = DaemonProcess(cfg, port, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "600000"}, log_format="json")
    try:
        d.start().wait_ready()
        d.wait_for(lambda: d.metric("driftd_windows_total", model_version="v1") == 5, desc="5 windows")
        # a couple of watchdog periods (0.3 s each), however long a busy host makes them
        d.wait_for(lambda: list(listener.messages).count("WATCHDOG=1") >= 2, desc="two WATCHDOG=1 pings")
        assert d.stop() == 0
        messages = listener.close()
        joined = "\n".join(messages)
        assert any(m.startswith("READY=1\nSTATUS=ready;") for m in messages), messages
        assert messages.count("WATCHDOG=1") >= 2
        assert sum(m.startswith("STOPPING=1") for m in messages) == 1
        assert joined.index("READY=1") < joined.index("STOPPING=1")
        assert not any(m.startswith("STATUS=") for m in messages[messages.index(next(
            m for m in messages if m.startswith("STOPPING=1"))):])  # nothing after the stop but the watchdog
        records = [json.loads(line) for line in d.log().splitlines()]  # --log-format json: every line parses
        assert {"time", "level", "logger", "message"} <= set(records[0])
        assert any(r["message"].startswith("SIGTERM received") for r in records)

        # a retrain interrupted by the restart (request, no result) is re-run visibly
        job_dir = tmp_path / "state" / "retrain" / "20260101T000000Z-abcdef"
        job_dir.mkdir(parents=True)
        (job_dir / "request.json").write_text(json.dumps(
            {"job_id": job_dir.name, "reason": "drift", "source": "api", "requested_at": time.time() - 60, "attempts": 1}))
        write_inference(tmp_path / "logs", make_rows(200, seed=12, prefix="more"), per_file=200, name="b")
        again = DaemonProcess(cfg, port).start()
        try:
            again.wait_ready()
            again.wait_for(lambda: again.metric("driftd_windows_total", model_version="v1") == 6, desc="6th window")
            assert again.metric("driftd_ingest_rows_total", model_version="v1") == 1200  # nothing read twice
            assert again.metric("driftd_ingest_files_total", kind="inference") == 5
            assert f"retrain job {job_dir.name} was interrupted by a restart (attempt 1); re-running it as attempt 2" in again.log()
            # the real retrain job now runs again; its status says it is a resumed second attempt
            info = again.json(f"/api/v1/retrain/{job_dir.name}", token=_token(tmp_path))
            assert info["attempts"] == 2 and info["resumed"] is True and info["state"] in ("running", "finished")
            assert again.stop() == 0
        finally:
            again.kill()
    finally:
        d.kill()
        listener.close()


def _token(tmp: Path) -> str:
    return (tmp / "token").read_text().strip()


def test_readyz_is_503_until_references_and_first_scan(tmp_path: Path) -> None:
    """In-process, so the moment before the first scan can be observed deterministically."""
    ref = build_reference(tmp_path, n=500)
    write_inference(tmp_path / "logs", make_rows(400, seed=10), per_file=200, name="a")
    port = free_port()
    config = parse_config(daemon_doc(tmp_path, ref, port), source="t.yaml", base=tmp_path)
    daemon = Daemon(config, config_path=str(tmp_path / "unused.yaml"), registry=CollectorRegistry(),
                    notifier=Notifier(None), environ={})
    proc = DaemonProcess(tmp_path / "unused.yaml", port)
    daemon.api.start()
    try:
        assert proc.get("/readyz") == (503, b"loading references\n")
        assert proc.get("/healthz")[0] == 503
        daemon.start()
        proc.wait_for(lambda: proc.get("/readyz")[0] == 200, desc="ready")
        assert proc.get("/healthz")[0] == 200
        assert daemon.registry.get_sample_value("driftd_ingest_rows_total", {"model": "test-model", "model_version": "v1"}) == 400
    finally:
        assert daemon.shutdown() == 0


def test_a_failing_cycle_is_logged_counted_and_survived(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The cycle job's one catch point; the failure is injected through the clock (time is the mockable hook)."""
    ref = build_reference(tmp_path, n=500)
    write_inference(tmp_path / "logs", make_rows(200, seed=10), per_file=200, name="a")
    port = free_port()
    config = parse_config(daemon_doc(tmp_path, ref, port), source="t.yaml", base=tmp_path)
    fail_once = threading.Event()

    def clock() -> float:
        if fail_once.is_set():
            fail_once.clear()
            raise OSError("clock source unavailable")
        return time.time()

    daemon = Daemon(config, config_path=str(tmp_path / "unused.yaml"), registry=CollectorRegistry(),
                    notifier=Notifier(None), environ={}, clock=clock)
    proc = DaemonProcess(tmp_path / "unused.yaml", port)
    errors = lambda: daemon.registry.get_sample_value("driftd_job_errors_total", {"model": "test-model", "job": "cycle"})
    try:
        daemon.start()
        proc.wait_for(lambda: proc.get("/readyz")[0] == 200, desc="ready")
        assert errors() == 0
        fail_once.set()
        proc.wait_for(lambda: errors() == 1, desc="the cycle error counted")
        write_inference(tmp_path / "logs", make_rows(200, seed=11, prefix="more"), per_file=200, name="b")
        proc.wait_for(lambda: daemon.registry.get_sample_value(
            "driftd_ingest_rows_total", {"model": "test-model", "model_version": "v1"}) == 400, desc="next cycles run")
        assert proc.get("/healthz")[0] == 200 and errors() == 1
        assert "ingest/evaluate cycle failed; retrying in 0.3s" in caplog.text
        assert "OSError: clock source unavailable" in caplog.text
    finally:
        assert daemon.shutdown() == 0
