"""Shared helpers for the ops tests: system tools, free ports, promtool checks, manifest validation."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import types
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "driftd-alerts.yaml"
KUBERNETES = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.32.0"   # oldest API the manifests must be valid for (strict schema)


def require_binary(name: str) -> str:
    """Path of a system tool; skips when absent locally, fails under CI (``CI`` set).

    CI installs the tools with ``.ci/install-ops.sh``; a missing one there is a broken setup,
    not a reason to skip.
    """
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} not found on PATH: run `sh .ci/install-ops.sh` as root to install it"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_tool(args: list[str], *, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def check_promql(exprs: Iterable[tuple[str, str]], tmp_path: Path) -> None:
    """Fail naming the query when promtool cannot parse one of ``(where, expr)``.

    Each expression becomes a recording rule in a throwaway rule file: ``promtool check
    rules`` then parses it with Prometheus' own PromQL parser. Grafana's ``$__rate_interval``
    and ``$variable`` placeholders are replaced by values Grafana would substitute.
    """
    promtool = require_binary("promtool")
    items = list(exprs)
    rules = [
        {"record": f"driftd_check:q{i}", "expr": expand_grafana_vars(expr)} for i, (_, expr) in enumerate(items)
    ]
    path = tmp_path / "queries.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}), encoding="utf-8")
    result = run_tool([promtool, "check", "rules", str(path)])
    if result.returncode != 0:
        where = "\n".join(f"  q{i}: {w}: {e}" for i, (w, e) in enumerate(items))
        pytest.fail(f"promtool rejected a query:\n{result.stdout}{result.stderr}\nqueries:\n{where}")


def expand_grafana_vars(expr: str, *, model: str = "model", model_version: str = ".*") -> str:
    """Substitute the dashboard's template variables as Grafana would before querying."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$model_version", model_version)
        .replace("$model", model)
    )



def load_script(path: Path) -> types.ModuleType:
    """Import a script that is not in a package (deploy/ and grafana/ tools) by its path."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve string annotations through sys.modules while the module executes.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def validate_manifest(doc: dict) -> None:
    """Strict offline validation: kubernetes-validate for built-in kinds, the vendored
    JSON Schemas in deploy/kubernetes/schemas for prometheus-operator kinds."""
    import jsonschema
    import kubernetes_validate

    if doc["apiVersion"] == "monitoring.coreos.com/v1":
        schema = json.loads((KUBERNETES / "schemas" / f"{doc['kind'].lower()}.json").read_text(encoding="utf-8"))
        jsonschema.Draft202012Validator(schema).validate(doc)
        return
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
