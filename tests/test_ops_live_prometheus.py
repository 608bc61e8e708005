"""End to end: a real `driftd run` scraped every second by a real Prometheus with the alert rules.

Clean logs first (the drift alert is inactive), then drifted logs: the signals arrive through
Prometheus' HTTP API and DriftdDriftDetected goes pending, then firing. Prometheus evaluates a
test-only copy of deploy/prometheus/driftd-alerts.yaml in which DriftdDriftDetected's
``for: 15m`` is shortened to 3 s; everything else in the rule is as shipped. Every Grafana
panel query is then run against this Prometheus and must return data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine_helpers import config_doc, make_rows, write_inference, write_labels
from ops_helpers import ALERTS, REPO, expand_grafana_vars, free_port, load_script, require_binary
from waiting import STALL_SECONDS, cpu_progress, wait_until

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]

MODEL = "test-model"
TEST_FOR = "3s"
# Dashboard queries allowed to return nothing here, by a fragment of their expression, with why:
# nothing of that kind happened in this run (driftd exports those series once it does).
EXPECTED_EMPTY = {
    "driftd_rows_without_reference_total": "every row's model_version has a reference",
    "driftd_ingest_rejected_rows_total": "no row broke the log contract (the corrupt file is quarantined whole)",
    "driftd_model_info": "no model registry in this test",
    "[2m])) > 0": "the retrain annotation: no retrain ran",
}
POLICY = [  # driftd's default rules, with mmd_p_value made decisive for a short test
    {"name": "online_mmd_alarm", "signal": "online_mmd_alarm", "op": "above", "threshold": 0.5},
    {"name": "mmd_p_value", "signal": "mmd_p_value", "op": "below", "threshold": 0.01, "consecutive": 2},
    {"name": "accuracy_drop", "signal": "accuracy", "drop_from_reference": 0.05, "min_rows": 200, "consecutive": 2},
    {"name": "estimated_accuracy_drop", "signal": "estimated_accuracy", "drop_from_reference": 0.05, "consecutive": 3},
]


class Proc:
    """A child process with its output in a file, stopped with SIGTERM then SIGKILL."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, **(env or {})})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _wait(what: Callable[[], Any], desc: str, procs: list[Proc], timeout: float = STALL_SECONDS) -> Any:
    """Until ``what()`` is truthy; fails after ``timeout`` seconds in which no process wrote to its
    log or used CPU (Prometheus scraping and evaluating, driftd ingesting), however slow the host is."""
    def check() -> None:
        for p in procs:
            if p.proc.poll() is not None:
                raise AssertionError(f"{p.proc.args[0]} exited ({p.proc.returncode}) while waiting for {desc}:\n{p.log()}")

    def progress() -> tuple:
        return tuple((p.log_path.stat().st_size, cpu_progress(p.proc.pid)) for p in procs)

    def value() -> Any:
        try:
            return what()
        except (KeyError, ValueError):
            return None

    return wait_until(value, desc, progress=progress, stall_seconds=timeout, poll_seconds=0.25, check=check,
                      context=lambda: "\n".join(f"--- {p.proc.args[0]} ---\n{p.log()}" for p in procs))


def _test_rules(tmp_path: Path) -> Path:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == "DriftdDriftDetected"]
    assert rule["for"] == "15m"
    rule["for"] = TEST_FOR
    path = tmp_path / "alerts.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def test_prometheus_scrapes_driftd_and_the_drift_alert_fires(tmp_path: Path) -> None:
    prometheus_bin = require_binary("prometheus")
    driftd_bin = str(Path(sys.executable).with_name("driftd"))
    start = 1_790_000_000.0

    # Config, then a reference built by the CLI from labelled validation logs.
    port = free_port()
    doc = config_doc(tmp_path, tmp_path / "reference", **{
        "http.port": port,
        "scheduler.interval_seconds": 0.5,
        "scheduler.shutdown_grace_seconds": 5.0,
        "signals.mmd.permutations": 200,
        # Off: its expected run length between false alarms is short in a test-sized config, so
        # it would raise the drift alert on clean data too.
        "signals.online_mmd.enabled": False,
        "policy.rules": POLICY,
        "retrain.registry_dir": str(tmp_path / "registry"),
    })
    config = tmp_path / "driftd.yaml"
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    write_inference(tmp_path / "val", make_rows(2000, seed=1, prefix="val", start=start - 10_000),
                    per_file=2000, with_label=True)
    built = subprocess.run([driftd_bin, "reference", "build", "--logs", str(tmp_path / "val"), "--config", str(config)],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert built.returncode == 0, built.stdout + built.stderr

    clean = make_rows(600, seed=2, start=start)
    write_inference(tmp_path / "logs", clean, per_file=200, name="clean")
    write_labels(tmp_path / "labels", clean, delay=90.0)

    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(_test_rules(tmp_path))],
        "scrape_configs": [{"job_name": "driftd", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
    }), encoding="utf-8")
    api = f"http://127.0.0.1:{prom_port}/api/v1"

    def query(expr: str) -> list[dict]:
        return _get_json(f"{api}/query?" + urllib.parse.urlencode({"query": expr}))["data"]["result"]

    def value(expr: str) -> float | None:
        result = query(expr)
        return float(result[0]["value"][1]) if result else None

    def alert_state(name: str = "DriftdDriftDetected") -> str:
        groups = _get_json(f"{api}/rules?type=alert")["data"]["groups"]
        return next(r["state"] for g in groups for r in g["rules"] if r["name"] == name)

    procs: list[Proc] = []
    try:
        procs.append(Proc([driftd_bin, "run", "--config", str(config)], tmp_path / "driftd.log"))
        procs.append(Proc([prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}",
                           f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                          tmp_path / "prometheus.log"))

        # Clean data: windows evaluated, signals scraped, drift alert inactive.
        _wait(lambda: value('up{job="driftd"}') == 1, "Prometheus to scrape driftd", procs)
        _wait(lambda: (value(f'driftd_windows_total{{model="{MODEL}"}}') or 0) >= 3, "3 clean windows", procs)
        _wait(lambda: value(f'driftd_mmd_p_value{{model="{MODEL}",model_version="v1"}}') is not None, "MMD p-value", procs)
        assert value(f'driftd_alarm{{model="{MODEL}",model_version="v1",rule="mmd_p_value"}}') == 0
        assert value(f'driftd_rule_threshold{{model="{MODEL}",model_version="v1",rule="mmd_p_value"}}') == pytest.approx(0.01)
        assert alert_state() == "inactive"
        assert alert_state("DriftdFilesQuarantined") == "inactive"

        # Drifted data and one corrupt file: the alarm rises, the alert goes pending and then
        # firing; the quarantined file fires its alert at once (it has no `for`).
        (tmp_path / "logs" / "corrupt-00000.parquet").write_bytes(b"not a parquet file")
        write_inference(tmp_path / "logs", make_rows(600, seed=3, shift=1.5, start=start + 600), per_file=200, name="drift")

        def drift_alerts() -> dict[str, dict]:
            alerts = _get_json(f"{api}/alerts")["data"]["alerts"]
            return {a["labels"]["rule"]: a for a in alerts if a["labels"]["alertname"] == "DriftdDriftDetected"}

        first = _wait(lambda: drift_alerts().get("mmd_p_value"), "the mmd_p_value drift alert", procs)
        assert first["state"] in ("pending", "firing")
        firing = _wait(lambda: (a := drift_alerts().get("mmd_p_value")) and a["state"] == "firing" and a,
                       "the mmd_p_value drift alert to fire", procs)
        assert firing["labels"] == {"alertname": "DriftdDriftDetected", "model": MODEL, "model_version": "v1",
                                    "rule": "mmd_p_value", "severity": "warning"}
        assert value(f'driftd_mmd_p_value{{model="{MODEL}",model_version="v1"}}') < 0.01

        _wait(lambda: alert_state("DriftdFilesQuarantined") == "firing", "the quarantine alert to fire", procs)

        # Every dashboard query returns data from this Prometheus.
        dashboard = load_script(REPO / "grafana" / "generate_dashboard.py")
        empty = [f"{where}: {expr}" for where, expr in dashboard.all_queries()
                 if not query(expand_grafana_vars(expr, model=MODEL))
                 and not any(fragment in expr for fragment in EXPECTED_EMPTY)]
        assert empty == [], "dashboard queries without data:\n" + "\n".join(empty)
    finally:
        for p in reversed(procs):
            p.stop()
