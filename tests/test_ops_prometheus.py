"""The shipped alert rules: promtool parses them, their unit tests pass, runbooks exist."""

from __future__ import annotations

import re

import pytest
import yaml

from ops_helpers import ALERTS, DEPLOY, require_binary, run_tool

pytestmark = pytest.mark.prometheus

RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yaml"))
RUNBOOK = DEPLOY / "prometheus" / "RUNBOOK.md"
REQUIRED_ALERTS = {
    "DriftdDriftDetected", "DriftdAccuracyBelowThreshold", "DriftdEstimatedAccuracyFalling",
    "DriftdIngestStalled", "DriftdIngestLagging", "DriftdFilesQuarantined",
    "DriftdRetrainFailed", "DriftdRetrainPromoted", "DriftdDown",
}


def _alerts() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules_accepts_the_alert_file() -> None:
    result = run_tool([require_binary("promtool"), "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


@pytest.mark.parametrize("rule_test", RULE_TESTS, ids=lambda p: p.stem)
def test_promtool_rule_unit_tests_pass(rule_test) -> None:
    result = run_tool([require_binary("promtool"), "test", "rules", rule_test.name], cwd=rule_test.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_both_firing_and_silent() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names == REQUIRED_ALERTS
    assert names - fired == set(), "alerts never shown firing in deploy/prometheus/tests"
    assert names - silent == set(), "alerts never shown silent in deploy/prometheus/tests"


def test_every_alert_has_severity_summary_and_a_runbook_section() -> None:
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
        for line in RUNBOOK.read_text(encoding="utf-8").splitlines()
        if line.startswith("## ")
    }
    for rule in _alerts():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        link = rule["annotations"]["runbook"]
        assert link.startswith("deploy/prometheus/RUNBOOK.md#"), rule["alert"]
        assert link.split("#", 1)[1] in headings, f"{rule['alert']}: no '## {rule['alert']}' in {RUNBOOK.name}"
    severities = {rule["alert"]: rule["labels"]["severity"] for rule in _alerts()}
    assert severities["DriftdRetrainPromoted"] == "info"
