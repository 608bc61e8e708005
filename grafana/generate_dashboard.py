"""Generates grafana/driftd-dashboard.json, the provisioned driftd dashboard.

Run ``python grafana/generate_dashboard.py`` after editing; tests/test_ops_grafana.py fails when
the committed JSON differs from this generator's output, and checks every query with promtool.
Panels are declared as data (title, queries, unit) so that the list of PromQL expressions is
available to tests without parsing Grafana's JSON layout.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

DASHBOARD_PATH = Path(__file__).with_name("driftd-dashboard.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
M = 'model="$model"'
MV = 'model="$model", model_version=~"$model_version"'
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"        # timeseries | stat | table
    description: str = ""
    width: int = 8


def _per_version(metric: str, legend: str) -> Query:
    """A per-model_version gauge, one series per selected version."""
    return Query(f"{metric}{{{MV}}}", f"{legend} {{{{model_version}}}}".lstrip())


def _threshold(rule: str) -> Query:
    return Query(f'driftd_rule_threshold{{{MV}, rule="{rule}"}}', f"threshold ({rule}) {{{{model_version}}}}")


def _quantiles(metric: str, by: str = "") -> tuple[Query, ...]:
    group = f"le{', ' + by if by else ''}"
    suffix = f" {{{{{by}}}}}" if by else ""
    return tuple(
        Query(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{M}}}[{RATE}])))", f"p{int(q * 100)}{suffix}")
        for q in (0.5, 0.9, 0.99)
    )


ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    ("Overview", (
        Panel("Current model version", (Query(f"driftd_model_info{{{M}}} == 1", "{{model_version}}", instant=True),),
              kind="stat", width=6, description="Version serving now (driftd_model_info)."),
        Panel("Alarms raised", (Query(f"sum(driftd_alarm{{{MV}}})", "alarms"),), kind="stat", width=6,
              description="Rules whose alarm is on for the selected versions (a retired version's alarms are cleared)."),
        Panel("Since last successful cycle", (Query(f"time() - driftd_last_successful_cycle_timestamp_seconds{{{M}}}", "age"),),
              unit="s", kind="stat", width=6),
        Panel("Retraining in progress", (Query(f"driftd_retrain_in_progress{{{M}}}", "running"),), kind="stat", width=6),
    )),
    ("Ingest health", (
        Panel("Rows ingested / s", (
            Query(f"sum by (model_version) (rate(driftd_ingest_rows_total{{{M}}}[{RATE}]))", "{{model_version}}"),
            Query(f"sum by (model_version) (rate(driftd_rows_without_reference_total{{{M}}}[{RATE}]))", "no reference {{model_version}}"),
        ), unit="rowsps"),
        Panel("Files / s and rejected rows / s", (
            Query(f"sum by (kind) (rate(driftd_ingest_files_total{{{M}}}[{RATE}]))", "files {{kind}}"),
            Query(f"sum by (reason) (rate(driftd_ingest_rejected_rows_total{{{M}}}[{RATE}]))", "rejected rows {{reason}}"),
        )),
        Panel("Files quarantined", (
            Query(f"sum by (reason) (increase(driftd_ingest_quarantined_files_total{{{M}}}[{RATE}]))", "{{reason}}"),
        )),
        Panel("Ingest lag", (Query(f"driftd_ingest_lag_seconds{{{M}}}", "lag"),), unit="s"),
        Panel("Cycle duration", _quantiles("driftd_cycle_duration_seconds"), unit="s"),
        Panel("Job errors / s", (Query(f"sum by (job) (rate(driftd_job_errors_total{{{M}}}[{RATE}]))", "{{job}}"),)),
        Panel("Labels / s", (
            Query(f"rate(driftd_labels_joined_total{{{M}}}[{RATE}])", "joined"),
            Query(f"rate(driftd_labels_unmatched_total{{{M}}}[{RATE}])", "unmatched"),
            Query(f"rate(driftd_labels_duplicate_total{{{M}}}[{RATE}])", "duplicate"),
        )),
        Panel("Label delay", _quantiles("driftd_label_delay_seconds"), unit="s"),
        Panel("Windows", (
            _per_version("driftd_window_rows", "rows/window"),
            _per_version("driftd_windows_total", "windows"),
        )),
    )),
    ("Drift signals", (
        Panel("Online MMD (sequential detector)", (
            _per_version("driftd_online_mmd_statistic", "statistic"),
            _per_version("driftd_online_mmd_threshold", "threshold"),
            Query(f"increase(driftd_online_mmd_alarms_total{{{MV}}}[{RATE}])", "alarms {{model_version}}"),
        )),
        Panel("MMD permutation test", (
            _per_version("driftd_mmd_p_value", "p-value"),
            _per_version("driftd_mmd2", "MMD²"),
            _threshold("mmd_p_value"),
        )),
        Panel("Activation shift", (
            _per_version("driftd_activation_max_abs_shift", "max |shift|"),
            _per_version("driftd_activation_mean_abs_shift", "mean |shift|"),
            _per_version("driftd_activation_max_abs_log_variance_ratio", "max |log var ratio|"),
        )),
        Panel("Share of dimensions shifted (BH)", (
            _per_version("driftd_activation_share_significant", ""),
        ), unit="percentunit"),
        Panel("Prediction entropy and confidence", (
            _per_version("driftd_prediction_entropy_mean", "entropy mean"),
            _per_version("driftd_prediction_entropy_p90", "entropy p90"),
            _per_version("driftd_prediction_max_prob_mean", "max prob mean"),
        )),
        Panel("Predicted class distribution", (
            _per_version("driftd_predicted_class_tvd", "TVD"),
            _per_version("driftd_predicted_class_chi2_p_value", "chi² p-value"),
            _per_version("driftd_estimated_class_prior_tvd", "class prior shift (BBSD)"),
        )),
        Panel("Policy alarms", (
            Query(f"driftd_alarm{{{MV}}}", "{{rule}} {{model_version}}"),
            Query(f"increase(driftd_threshold_breaches_total{{{M}}}[{RATE}])", "breaches {{rule}}"),
        ), width=12),
        Panel("Top shifted dimensions", (
            Query(f"driftd_top_shifted_dimension{{{MV}}}", "dimension", instant=True),
            Query(f"driftd_top_shifted_dimension_shift{{{MV}}}", "shift", instant=True),
        ), kind="table", width=12, description="Feature dimensions with the largest standardised mean shift, by rank."),
    )),
    ("Accuracy", (
        Panel("Accuracy vs estimated accuracy", (
            _per_version("driftd_window_accuracy", "labelled"),
            _per_version("driftd_estimated_accuracy", "estimated"),
            _per_version("driftd_estimated_accuracy_lower", "estimate lower bound"),
            _per_version("driftd_estimated_accuracy_upper", "estimate upper bound"),
            _per_version("driftd_reference_accuracy", "reference"),
            _threshold("accuracy_drop"),
            _threshold("estimated_accuracy_drop"),
        ), unit="percentunit", width=16,
              description="Measured accuracy on delayed labels beside the label-free estimate and its interval."),
        Panel("Labels behind the accuracy", (_per_version("driftd_window_accuracy_labels", ""),)),
        Panel("Estimator in force", (Query(f"driftd_estimate_method_info{{{MV}}} == 1", "{{method}} {{model_version}}",
                                           instant=True),), kind="stat", width=8),
    )),
    ("Retraining", (
        Panel("Runs by outcome", (
            Query(f"sum by (outcome) (increase(driftd_retrain_runs_total{{{M}}}[{RATE}]))", "{{outcome}}"),
        )),
        Panel("Run duration", _quantiles("driftd_retrain_duration_seconds"), unit="s"),
        Panel("Guards during training", (
            Query(f"driftd_retrain_backbone_grad_norm{{{M}}}", "backbone grad norm"),
            Query(f"driftd_retrain_weight_drift{{{M}}}", "weight drift"),
            Query(f"driftd_retrain_epoch{{{M}}}", "epoch"),
        )),
    )),
)

ANNOTATIONS: tuple[tuple[str, str, str], ...] = (
    # (name, expr, colour): one marker per retraining run, titled by its outcome.
    ("Retraining runs", f"sum by (outcome) (increase(driftd_retrain_runs_total{{{M}}}[2m])) > 0", "purple"),
)


def all_queries() -> list[tuple[str, str]]:
    """Every PromQL expression of the dashboard as (where, expr), annotations included."""
    found = [(f"{row}/{panel.title}", q.expr) for row, panels in ROWS for panel in panels for q in panel.queries]
    return found + [(f"annotation/{name}", expr) for name, expr, _ in ANNOTATIONS]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    targets = [
        {
            "datasource": DATASOURCE,
            "expr": q.expr,
            "legendFormat": q.legend,
            "refId": chr(ord("A") + i),
            "instant": q.instant,
            "range": not q.instant,
            **({"format": "table"} if panel.kind == "table" else {}),
        }
        for i, q in enumerate(panel.queries)
    ]
    # Series whose legend starts with "threshold" are drawn dashed red: the policy's line.
    threshold_override = {
        "matcher": {"id": "byRegexp", "options": "^threshold.*"},
        "properties": [
            {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
            {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
        ],
    }
    out: dict = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 4 if panel.kind == "stat" else 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": [threshold_override] if panel.kind == "timeseries" else []},
        "targets": targets,
    }
    if panel.kind == "stat":
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "textMode": "value_and_name" if panel.title == "Current model version" else "auto"}
    if panel.kind == "table":
        out["transformations"] = [{"id": "merge", "options": {}},
                                  {"id": "organize", "options": {"excludeByName": {"Time": True, "__name__": True}}}]
    return out


def build_dashboard() -> dict:
    """The dashboard as Grafana's JSON model (schemaVersion 39), ready for file provisioning."""
    panels: list[dict] = []
    y = 0
    next_id = 1
    for row, row_panels in ROWS:
        panels.append({"id": next_id, "type": "row", "title": row, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id += 1
        y += 1
        x = 0
        row_height = 0
        for panel in row_panels:
            if x + panel.width > 24:
                x, y = 0, y + row_height
                row_height = 0
            spec = _panel_json(panel, next_id, x, y)
            next_id += 1
            panels.append(spec)
            x += panel.width
            row_height = max(row_height, spec["gridPos"]["h"])
        y += row_height
    variable_query = {"type": "query", "datasource": DATASOURCE, "refresh": 2, "sort": 1}
    return {
        "uid": "driftd",
        "title": "driftd",
        "tags": ["driftd", "ml-monitoring"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": [
            {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
             "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"},
            *({"name": name, "datasource": DATASOURCE, "enable": True, "expr": expr, "iconColor": colour,
               "step": "60s", "titleFormat": "retrain {{outcome}}", "tagKeys": "outcome", "useValueForTime": False}
              for name, expr, colour in ANNOTATIONS),
        ]},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            {**variable_query, "name": "model", "label": "Model", "query": "label_values(driftd_last_successful_cycle_timestamp_seconds, model)",
             "definition": "label_values(driftd_last_successful_cycle_timestamp_seconds, model)",
             "multi": False, "includeAll": False, "current": {}},
            {**variable_query, "name": "model_version", "label": "Model version",
             "query": 'label_values(driftd_window_rows{model="$model"}, model_version)',
             "definition": 'label_values(driftd_window_rows{model="$model"}, model_version)',
             "multi": True, "includeAll": True, "allValue": ".*", "current": {}},
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build_dashboard(), indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if DASHBOARD_PATH.read_text(encoding="utf-8") != text:
            print(f"{DASHBOARD_PATH} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    DASHBOARD_PATH.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
