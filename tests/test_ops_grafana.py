"""The provisioned Grafana dashboard: generated, complete, and every query parses as PromQL."""

from __future__ import annotations

import json
import re
import types

import pytest

from ops_helpers import REPO, check_promql, load_script

GRAFANA = REPO / "grafana"


def _generator() -> types.ModuleType:
    return load_script(GRAFANA / "generate_dashboard.py")


def test_committed_dashboard_equals_generator_output() -> None:
    gen = _generator()
    committed = (GRAFANA / "driftd-dashboard.json").read_text(encoding="utf-8")
    assert committed == gen.render(), "grafana/driftd-dashboard.json is stale: run python grafana/generate_dashboard.py"


@pytest.mark.prometheus
def test_every_dashboard_query_parses_with_promtool(tmp_path) -> None:
    gen = _generator()
    dashboard = json.loads(gen.render())
    exprs = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [(a["name"], a["expr"]) for a in dashboard["annotations"]["list"] if "expr" in a]
    assert [e for _, e in exprs] == [e for _, e in gen.all_queries()]
    check_promql(exprs, tmp_path)


def test_dashboard_covers_the_required_views() -> None:
    dashboard = json.loads(_generator().render())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["model"]["type"] == "query"
    queries = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    metrics = set(re.findall(r"driftd_[a-z0-9_]+", queries))
    for signal in ("activation_max_abs_shift", "activation_mean_abs_shift", "activation_share_significant",
                   "activation_max_abs_log_variance_ratio", "prediction_entropy_mean", "prediction_entropy_p90",
                   "prediction_max_prob_mean", "predicted_class_tvd", "predicted_class_chi2_p_value", "mmd2",
                   "mmd_p_value", "online_mmd_statistic", "online_mmd_threshold", "window_accuracy",
                   "estimated_accuracy", "rule_threshold", "label_delay_seconds_bucket", "top_shifted_dimension",
                   "model_info", "ingest_lag_seconds", "last_successful_cycle_timestamp_seconds"):
        assert f"driftd_{signal}" in metrics, signal
    annotation = [a for a in dashboard["annotations"]["list"] if a.get("name") == "Retraining runs"]
    assert annotation and "driftd_retrain_runs_total" in annotation[0]["expr"]
    # Every panel sits on Grafana's 24-column grid without overlapping another.
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for cell in ((x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])):
            assert cell not in cells, f"{panel['title']} overlaps another panel"
            cells.add(cell)
