"""The compose stack, checked without Docker: structure, mounts, ports, Prometheus and Grafana config."""

from __future__ import annotations

import shutil

import pytest
import yaml

from ops_helpers import ALERTS, DEPLOY, REPO, require_binary, run_tool

COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text(encoding="utf-8"))
# Bind-mount sources created by the operator before `up` (see the compose.yaml header).
CREATED_BY_OPERATOR = {"./data"}


def _mounts() -> list[tuple[str, str, str, str]]:
    """(service, source, target, mode) for every short-syntax volume entry."""
    out = []
    for name, service in COMPOSE["services"].items():
        for entry in service.get("volumes", []):
            source, target, *mode = entry.split(":")
            out.append((name, source, target, mode[0] if mode else "rw"))
    return out


def test_services_and_named_volumes_are_consistent() -> None:
    assert set(COMPOSE["services"]) == {"driftd", "prometheus", "grafana"}
    declared = set(COMPOSE["volumes"])
    used = {source for _, source, _, _ in _mounts() if not source.startswith((".", "/"))}
    assert used == declared, "named volumes used and declared differ"
    for name, service in COMPOSE["services"].items():
        assert set(service.get("depends_on", [])) <= set(COMPOSE["services"]), name
        assert "image" in service, name


@pytest.mark.parametrize("mount", [m for m in _mounts() if m[1].startswith(".")], ids=lambda m: f"{m[0]}:{m[2]}")
def test_bind_mounts_exist_and_are_read_only(mount) -> None:
    _, source, _, mode = mount
    assert source in CREATED_BY_OPERATOR or (COMPOSE_DIR / source).resolve().exists(), source
    assert mode == "ro", f"{source} should be mounted read-only"


def test_published_ports_are_unique_and_loopback_only() -> None:
    published = [p for s in COMPOSE["services"].values() for p in s.get("ports", [])]
    host_ports = [p.split(":")[1] for p in published]
    assert len(host_ports) == len(set(host_ports))
    assert all(p.startswith("127.0.0.1:") for p in published)


def test_prometheus_scrapes_driftd_on_its_configured_port_and_loads_the_alerts() -> None:
    from monitor.config import load_config

    prometheus = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = prometheus["scrape_configs"]
    assert job["job_name"] == "driftd"     # DriftdDown matches up{job="driftd"}
    config = load_config(COMPOSE_DIR / "driftd.yaml")
    assert job["static_configs"][0]["targets"] == [f"driftd:{config.service.http.port}"]
    assert config.service.http.token_env in COMPOSE["services"]["driftd"]["environment"]
    targets = {target: source for service, source, target, _ in _mounts() if service == "prometheus"}
    (rule_file,) = prometheus["rule_files"]
    assert (COMPOSE_DIR / targets[f"/etc/prometheus/{rule_file}"]).resolve() == ALERTS


@pytest.mark.prometheus
def test_promtool_accepts_the_prometheus_config_as_mounted(tmp_path) -> None:
    # Lay the files out as the container sees them: config and rule file side by side.
    shutil.copy(COMPOSE_DIR / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(ALERTS, tmp_path / "driftd-alerts.yaml")
    result = run_tool([require_binary("promtool"), "check", "config", str(tmp_path / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    provisioning = COMPOSE_DIR / "grafana" / "provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "driftd.yaml").read_text())["providers"]
    mounts = {target: source for service, source, target, _ in _mounts() if service == "grafana"}
    dashboard_target = next(t for t in mounts if t.startswith(provider["options"]["path"] + "/"))
    assert (COMPOSE_DIR / mounts[dashboard_target]).resolve() == REPO / "grafana" / "driftd-dashboard.json"
    assert (COMPOSE_DIR / mounts["/etc/grafana/provisioning"]).resolve() == provisioning


def test_dockerfile_builds_the_image_the_manifests_use() -> None:
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text(encoding="utf-8")
    assert "USER 10001" in dockerfile    # the runAsUser of the Kubernetes manifests
    # README.md is copied too (pyproject names it as the readme); the lead adds it at the root.
    for source in ("pyproject.toml", "monitor", "retrain"):
        assert (REPO / source).exists(), source
    assert COMPOSE["services"]["driftd"]["image"] == "driftd:0.1.0"
    assert "-t driftd:0.1.0" in dockerfile
