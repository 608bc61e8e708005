"""The Kubernetes manifests: built without kubectl, valid under strict schemas, consistent.

Built by deploy/kubernetes/build.py (the kustomize subset we use), compared with
``kubectl kustomize`` where kubectl exists, validated offline with kubernetes-validate (strict)
and the hand-written prometheus-operator schemas in deploy/kubernetes/schemas.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ops_helpers import ALERTS, KUBERNETES, load_script, run_tool, validate_manifest

OVERLAY = KUBERNETES / "overlays" / "example"


@pytest.fixture(scope="module")
def builder():
    return load_script(KUBERNETES / "build.py")


@pytest.fixture
def overlay_dir(tmp_path) -> Path:
    """A copy of the tree with the git-ignored token.txt the example overlay needs."""
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, tree, ignore=shutil.ignore_patterns("token.txt", "__pycache__"))
    (tree / "overlays" / "example" / "token.txt").write_text("s3cret-token", encoding="utf-8")
    return tree / "overlays" / "example"


def _by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _builds(builder, overlay_dir) -> dict[str, list[dict]]:
    return {"base": builder.build(KUBERNETES / "base"), "overlay": builder.build(overlay_dir)}


def test_generated_manifests_are_current() -> None:
    generate = load_script(KUBERNETES / "generate.py")
    for path, text in generate.outputs().items():
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run python deploy/kubernetes/generate.py"


def test_prometheus_rule_carries_exactly_the_promtool_tested_rules(builder) -> None:
    rule = _by_kind(builder.build(KUBERNETES / "base"))[("PrometheusRule", "driftd")]
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]


@pytest.mark.parametrize("which", ["base", "overlay"])
def test_every_built_object_passes_strict_validation(builder, overlay_dir, which) -> None:
    docs = _builds(builder, overlay_dir)[which]
    kinds = {d["kind"] for d in docs}
    assert kinds == {"ServiceAccount", "Role", "RoleBinding", "Secret", "ConfigMap", "PersistentVolumeClaim",
                     "Deployment", "Service", "ServiceMonitor", "PrometheusRule"}
    for doc in docs:
        validate_manifest(doc)


def test_shipped_job_template_passes_strict_validation() -> None:
    job = yaml.safe_load((KUBERNETES / "base" / "retrain-job.yaml").read_text(encoding="utf-8"))
    validate_manifest(job)
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize(
    "kind, break_it",
    [
        ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(imagePullPolice="Always")),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(intervall="30s")),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="30 seconds")),
        ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].update(fro="5m")),
    ],
    ids=["deployment-typo", "servicemonitor-typo", "servicemonitor-bad-duration", "prometheusrule-typo"],
)
def test_validation_rejects_a_typo(builder, kind, break_it) -> None:
    doc = next(d for d in builder.build(KUBERNETES / "base") if d["kind"] == kind)
    break_it(doc)
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        validate_manifest(doc)


def test_builder_matches_kubectl_kustomize_when_available(builder, overlay_dir) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the builder is checked against kubectl only where it exists")
    for directory in (KUBERNETES / "base", overlay_dir):
        result = run_tool([kubectl, "kustomize", str(directory)])
        assert result.returncode == 0, result.stderr
        assert _by_kind(builder.build(directory)) == _by_kind(list(yaml.safe_load_all(result.stdout)))


def test_builder_refuses_features_it_does_not_implement(builder, tmp_path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n", encoding="utf-8")
    with pytest.raises(builder.KustomizeError, match="commonLabels"):
        builder.build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "configMapGenerator:\n  - name: x\n    literals: [a=b]\n", encoding="utf-8")
    with pytest.raises(builder.KustomizeError, match="disableNameSuffixHash"):
        builder.build(tmp_path)


@pytest.mark.parametrize("which", ["base", "overlay"])
def test_config_agrees_with_the_manifests(builder, overlay_dir, which) -> None:
    from monitor.config import parse_config

    docs = _builds(builder, overlay_dir)[which]
    objects = _by_kind(docs)
    deployment = objects[("Deployment", "driftd")]
    namespace = deployment["metadata"]["namespace"]
    assert {d["metadata"]["namespace"] for d in docs} == {namespace}
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]

    config_maps = [d for d in docs if d["kind"] == "ConfigMap"]
    assert len(config_maps) == 1
    config = parse_config(yaml.safe_load(config_maps[0]["data"]["driftd.yaml"]),
                          source="/etc/driftd/driftd.yaml", base=Path("/etc/driftd"))
    k8s = config.retrain.kubernetes
    assert config.retrain.launcher == "kubernetes"
    assert k8s.namespace == namespace
    assert k8s.image == container["image"]
    assert ("ConfigMap", k8s.config_map) in objects
    assert ("PersistentVolumeClaim", k8s.state_pvc) in objects
    assert config.service.http.token_env == "DRIFTD_TOKEN"
    token_env = next(e for e in container["env"] if e["name"] == "DRIFTD_TOKEN")
    assert ("Secret", token_env["valueFrom"]["secretKeyRef"]["name"]) in objects
    # The daemon reads the config where the ConfigMap is mounted and listens on the probed port.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert container["command"][container["command"].index("--config") + 1] == f"{mounts['config']}/driftd.yaml"
    assert container["ports"][0]["containerPort"] == config.service.http.port
    for path in (config.monitor.state_dir, config.monitor.reference_dir, config.retrain.registry_dir):
        assert str(path).startswith(mounts["state"] + "/")
    # RBAC binds the pod's ServiceAccount in its own namespace.
    binding = objects[("RoleBinding", "driftd-retrain-launcher")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": namespace}]


def test_deployment_is_a_single_hardened_replica(builder) -> None:
    objects = _by_kind(builder.build(KUBERNETES / "base"))
    deployment = objects[("Deployment", "driftd")]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {"requests", "limits"} <= set(container["resources"])
    service = objects[("Service", "driftd")]
    monitor = objects[("ServiceMonitor", "driftd")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_role_grants_only_what_the_job_launcher_uses(builder) -> None:
    role = _by_kind(builder.build(KUBERNETES / "base"))[("Role", "driftd-retrain-launcher")]
    grants = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    # retrain/launch/kubernetes.py: create_namespaced_job, read_namespaced_job_status,
    # delete_namespaced_job, list_namespaced_pod, read_namespaced_pod_log; nothing else
    assert grants == {("batch", "jobs", "create"), ("batch", "jobs", "delete"), ("batch", "jobs/status", "get"),
                      ("", "pods", "list"), ("", "pods/log", "get")}


def _overlay_config(docs: list[dict]):
    from monitor.config import parse_config

    [config_map] = [d for d in docs if d["kind"] == "ConfigMap"]
    return parse_config(yaml.safe_load(config_map["data"]["driftd.yaml"]), source="/etc/driftd/driftd.yaml",
                        base=Path("/etc/driftd"))


@pytest.mark.parametrize("which", ["base", "overlay"])
def test_the_rendered_retrain_job_reads_what_the_daemon_reads_on_the_daemons_node(builder, overlay_dir, which) -> None:
    """The Job driftd creates mounts the data PVC read-only where the daemon has it (logs, and the
    overlay's images under retrain.input_root), shares the state PVC, and lands on the daemon's
    node: the state PVC is ReadWriteOnce and SQLite's WAL needs its readers on one host."""
    from retrain.launch.kubernetes import DATA_MOUNT, STATE_MOUNT, render_job

    docs = _builds(builder, overlay_dir)[which]
    objects = _by_kind(docs)
    config = _overlay_config(docs)
    job = render_job(config, job_id="t1", reason="test")
    validate_manifest(job)
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    data = mounts[str(DATA_MOUNT)]
    assert data["readOnly"] is True
    assert volumes[data["name"]]["persistentVolumeClaim"] == {"claimName": "inference-data", "readOnly": True}
    assert volumes[mounts[str(STATE_MOUNT)]["name"]]["persistentVolumeClaim"]["claimName"] == "driftd-state"
    deployment = objects[("Deployment", "driftd")]["spec"]["template"]["spec"]
    daemon_mounts = {m["name"]: m for m in deployment["containers"][0]["volumeMounts"]}
    daemon_claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in deployment["volumes"]
                     if "persistentVolumeClaim" in v}
    # the daemon sees the same claim at the same path, so logs.* and input_root mean the same there
    [data_volume] = [name for name, claim in daemon_claims.items() if claim == "inference-data"]
    assert daemon_mounts[data_volume]["mountPath"] == str(DATA_MOUNT) and daemon_mounts[data_volume]["readOnly"]
    assert str(config.monitor.logs.inference).startswith(f"{DATA_MOUNT}/")
    if which == "overlay":  # its two-GPU torchrun job trains on images, not the features fallback
        assert config.retrain.input_root is not None and str(config.retrain.input_root).startswith(f"{DATA_MOUNT}/")
        assert config.retrain.nproc_per_node == 2 and pod["containers"][0]["command"][0] == "torchrun"
    pvc = objects[("PersistentVolumeClaim", "driftd-state")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert deployment["nodeSelector"].items() <= pod["nodeSelector"].items()
    # and the daemon tolerates the GPU nodes' taints the Job tolerates, to run beside it
    assert all(t in deployment["tolerations"] for t in pod["tolerations"])


def test_the_example_overlay_is_selected_by_kube_prometheus_stack(builder, overlay_dir) -> None:
    objects = _by_kind(builder.build(overlay_dir))
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert objects[(kind, "driftd")]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
