"""The Kubernetes retrain Job launcher: rendered Jobs are valid, and the client round-trip works.

There is no cluster here. The round-trip tests run the official ``kubernetes`` client, loaded
from a real kubeconfig file, against a tiny fake API server on 127.0.0.1 that speaks only the
endpoints the launcher uses (create/read-status/delete Job, list pods, read log). It records
each request so the tests prove what the client sends; it does not schedule anything.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from monitor.config import parse_config
from monitor.errors import ConfigError
from ops_helpers import KUBERNETES, validate_manifest
from retrain.launch.kubernetes import (KubernetesLaunchError, default_api_client, job_name, launch_kubernetes,
                                       render_job)

TOKEN = "fake-sa-token"


def make_config(tmp_path: Path, *, nproc: int = 1, **k8s: object):
    kubernetes = {"namespace": "ml", "image": "driftd:1.0", "gpus": 2, "cpu": "8", "memory": "32Gi",
                  "shm_size": "4Gi", "state_pvc": "driftd-state", "config_map": "driftd-config",
                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                  "node_selector": {"gpu": "a100"}, "active_deadline_seconds": 3600,
                  "ttl_seconds_after_finished": 600, **k8s}
    data = {"model": "m", "logs": {"inference": "/data/logs"}, "state_dir": "/var/lib/driftd/state",
            "reference_dir": "/var/lib/driftd/reference",
            "retrain": {"registry_dir": "/var/lib/driftd/registry", "launcher": "kubernetes",
                        "nproc_per_node": nproc, "kubernetes": kubernetes}}
    return parse_config(data, source="/etc/driftd/driftd.yaml", base=tmp_path)


def test_rendered_job_is_valid_and_carries_the_gpu_settings(tmp_path) -> None:
    job = render_job(make_config(tmp_path), job_id="r-20261126-1", reason="accuracy_drop fired")
    validate_manifest(job)
    assert job["metadata"] == {
        "name": "driftd-retrain-r-20261126-1", "namespace": "ml",
        "labels": {"app": "driftd", "app.kubernetes.io/component": "retrain", "job-id": "r-20261126-1"},
        "annotations": {"driftd/reason": "accuracy_drop fired"},
    }
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (0, 3600, 600)
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"gpu": "a100"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}
    assert volumes["state"]["persistentVolumeClaim"] == {"claimName": "driftd-state"}
    assert volumes["config"]["configMap"] == {"name": "driftd-config"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"dshm": "/dev/shm", "tmp": "/tmp", "config": "/etc/driftd", "state": "/var/lib/driftd"}
    assert container["command"] == ["python", "-m", "monitor.cli.job", "--config", "/etc/driftd/driftd.yaml",
                                     "--job-dir", "/var/lib/driftd/state/retrain/r-20261126-1",
                                     "--reason", "accuracy_drop fired"]


def test_more_than_one_process_per_node_runs_torchrun(tmp_path) -> None:
    job = render_job(make_config(tmp_path, nproc=4), job_id="j1", reason="r")
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["torchrun", "--standalone", "--nproc_per_node=4"]
    assert command[3:6] == ["-m", "monitor.cli.job", "--config"]
    validate_manifest(job)


def test_cpu_only_job_requests_no_gpu(tmp_path) -> None:
    job = render_job(make_config(tmp_path, gpus=0, tolerations=[], node_selector={}), job_id="j1", reason="r")
    pod = job["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert "tolerations" not in pod and "nodeSelector" not in pod
    validate_manifest(job)


def test_shipped_template_is_what_render_job_produces_for_the_base_config() -> None:
    from dataclasses import replace

    from monitor.config import load_config

    config = replace(load_config(KUBERNETES / "base" / "driftd.yaml"), source="/etc/driftd/driftd.yaml")
    shipped = yaml.safe_load((KUBERNETES / "base" / "retrain-job.yaml").read_text(encoding="utf-8"))
    reason = shipped["metadata"]["annotations"]["driftd/reason"]
    assert render_job(config, job_id="example", reason=reason) == shipped


@pytest.mark.parametrize("job_id", ["", "-x", "a b", "x" * 64, "ünïcode"], ids=["empty", "leading-dash", "space", "too-long", "non-ascii"])
def test_job_ids_that_cannot_be_labels_are_refused(tmp_path, job_id) -> None:
    with pytest.raises(ValueError, match="job_id"):
        render_job(make_config(tmp_path), job_id=job_id, reason="r")


def test_job_name_is_dns_safe_for_any_valid_id() -> None:
    assert job_name("Run_2026.11.26") == "driftd-retrain-run-2026-11-26"
    assert len(job_name("a" * 63)) == 63


def test_state_paths_off_the_volume_are_a_config_error(tmp_path) -> None:
    config = make_config(tmp_path)
    from dataclasses import replace

    config = replace(config, monitor=replace(config.monitor, state_dir=Path("/srv/driftd")))
    with pytest.raises(ConfigError, match=r"state_dir=/srv/driftd.*/var/lib/driftd"):
        render_job(config, job_id="j1", reason="r")


def test_missing_image_is_a_config_error(tmp_path) -> None:
    from dataclasses import replace

    config = make_config(tmp_path)
    config = replace(config, retrain=replace(config.retrain, kubernetes=replace(config.retrain.kubernetes, image=None)))
    with pytest.raises(ConfigError, match="retrain.kubernetes.image"):
        render_job(config, job_id="j1", reason="r")


class FakeApiServer:
    """The five Kubernetes API endpoints the launcher calls, with a scripted Job status."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.jobs: dict[str, dict] = {}
        self.statuses: list[dict] = []   # popped on each status read; the last one sticks
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, code: int, body: object, content_type: str = "application/json") -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> tuple[list[str], dict]:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                url = urlsplit(self.path)
                server.requests.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                                        "auth": self.headers.get("Authorization"), "body": body})
                return url.path.strip("/").split("/"), body

            def do_POST(self) -> None:
                parts, body = self._record()
                if parts[:3] == ["apis", "batch", "v1"] and parts[5:] == ["jobs"]:
                    name = body["metadata"]["name"]
                    if name in server.jobs:
                        return self._reply(409, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                 "reason": "AlreadyExists", "code": 409,
                                                 "message": f'jobs.batch "{name}" already exists'})
                    server.jobs[name] = body
                    return self._reply(201, {**body, "metadata": {**body["metadata"], "uid": "u-1"}})
                self._reply(404, {"kind": "Status", "code": 404})

            def do_GET(self) -> None:
                parts, _ = self._record()
                if parts[:3] == ["apis", "batch", "v1"] and len(parts) == 8 and parts[7] == "status":
                    job = server.jobs.get(parts[6])
                    if job is None:
                        return self._reply(404, {"kind": "Status", "apiVersion": "v1", "code": 404, "reason": "NotFound"})
                    status = server.statuses.pop(0) if len(server.statuses) > 1 else server.statuses[0]
                    return self._reply(200, {**job, "status": status})
                if parts[:2] == ["api", "v1"] and parts[4:] == ["pods"]:
                    return self._reply(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [
                        {"metadata": {"name": "driftd-retrain-j1-abcde", "namespace": parts[3],
                                      "creationTimestamp": "2026-11-26T19:00:00Z"}}]})
                if parts[:2] == ["api", "v1"] and parts[4] == "pods" and parts[6:] == ["log"]:
                    return self._reply(200, "epoch 1 loss 0.3\n", "text/plain")
                self._reply(404, {"kind": "Status", "code": 404})

            def do_DELETE(self) -> None:
                parts, _ = self._record()
                server.jobs.pop(parts[6], None)
                self._reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api_server(tmp_path, monkeypatch):
    with FakeApiServer() as server:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
            "users": [{"name": "sa", "user": {"token": TOKEN}}],
            "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "sa"}}],
        }), encoding="utf-8")
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a cluster: use the kubeconfig
        yield server


def test_launch_posts_the_rendered_job_with_the_token(tmp_path, api_server) -> None:
    config = make_config(tmp_path)
    api_server.statuses = [{"active": 1}]
    job = launch_kubernetes(config, "j1", "drift")
    create = api_server.requests[0]
    assert (create["method"], create["path"]) == ("POST", "/apis/batch/v1/namespaces/ml/jobs")
    assert create["auth"] == f"Bearer {TOKEN}"
    assert create["body"] == render_job(config, job_id="j1", reason="drift")
    assert (job.name, job.namespace) == ("driftd-retrain-j1", "ml")
    assert job.poll() is None


@pytest.mark.parametrize(
    "conditions, code",
    [([{"type": "Complete", "status": "True"}], 0),
     ([{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}], 1),
     ([{"type": "Failed", "status": "False"}], None)],
    ids=["complete", "failed", "condition-not-true"],
)
def test_poll_maps_job_conditions_to_exit_codes(tmp_path, api_server, conditions, code) -> None:
    api_server.statuses = [{"conditions": conditions}]
    job = launch_kubernetes(make_config(tmp_path), "j1", "drift")
    assert job.poll() == code
    status_read = api_server.requests[-1]
    assert (status_read["method"], status_read["path"]) == ("GET", "/apis/batch/v1/namespaces/ml/jobs/driftd-retrain-j1/status")


def test_wait_polls_until_done_with_the_injected_clock(tmp_path, api_server) -> None:
    api_server.statuses = [{"active": 1}, {"active": 1}, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}]
    job = launch_kubernetes(make_config(tmp_path), "j1", "drift")
    now = [0.0]
    job.clock = lambda: now[0]
    job.sleep = lambda s: now.__setitem__(0, now[0] + s)
    assert job.wait(timeout=60) == 0
    assert now[0] == 2 * job.poll_interval


def test_wait_returns_none_at_the_timeout(tmp_path, api_server) -> None:
    api_server.statuses = [{"active": 1}]
    job = launch_kubernetes(make_config(tmp_path), "j1", "drift")
    now = [0.0]
    job.clock = lambda: now[0]
    job.sleep = lambda s: now.__setitem__(0, now[0] + s)
    assert job.wait(timeout=12) is None
    assert now[0] == 12


def test_terminate_deletes_in_the_background_and_poll_then_reports_failure(tmp_path, api_server) -> None:
    api_server.statuses = [{"active": 1}]
    job = launch_kubernetes(make_config(tmp_path), "j1", "drift")
    job.terminate(grace_seconds=15)
    delete = api_server.requests[-1]
    assert (delete["method"], delete["path"]) == ("DELETE", "/apis/batch/v1/namespaces/ml/jobs/driftd-retrain-j1")
    assert delete["body"]["propagationPolicy"] == "Background"
    assert delete["body"]["gracePeriodSeconds"] == 15
    assert job.poll() == 1          # gone: it did not succeed
    job.terminate()                 # deleting again is harmless


def test_logs_come_from_the_jobs_pod(tmp_path, api_server) -> None:
    api_server.statuses = [{"active": 1}]
    job = launch_kubernetes(make_config(tmp_path), "j1", "drift")
    assert job.logs(tail_lines=50) == "epoch 1 loss 0.3\n"
    listing, log = api_server.requests[-2:]
    assert listing["query"]["labelSelector"] == ["job-name=driftd-retrain-j1"]
    assert log["path"] == "/api/v1/namespaces/ml/pods/driftd-retrain-j1-abcde/log"
    assert log["query"]["tailLines"] == ["50"]


def test_a_job_that_already_exists_is_a_launch_error(tmp_path, api_server) -> None:
    config = make_config(tmp_path)
    launch_kubernetes(config, "j1", "drift")
    with pytest.raises(KubernetesLaunchError, match=r"HTTP 409.*already exists"):
        launch_kubernetes(config, "j1", "drift")


def test_no_cluster_and_no_kubeconfig_says_what_to_do(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubernetesLaunchError, match="KUBECONFIG"):
        default_api_client()


def test_data_volume_carries_the_inputs_read_only(tmp_path) -> None:
    config = make_config(tmp_path, data_pvc="model-inputs")
    from dataclasses import replace

    config = replace(
        config,
        monitor=replace(config.monitor, logs=replace(config.monitor.logs, inference="/var/lib/driftd-data/logs")),
        retrain=replace(config.retrain, input_root=Path("/var/lib/driftd-data/inputs")),
    )
    job = render_job(config, job_id="j2", reason="r")
    validate_manifest(job)
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "model-inputs", "readOnly": True}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["data"] == {"name": "data", "mountPath": "/var/lib/driftd-data", "readOnly": True}


def test_inputs_off_the_data_volume_are_a_config_error(tmp_path) -> None:
    config = make_config(tmp_path, data_pvc="model-inputs")  # logs.inference is /data/logs
    with pytest.raises(ConfigError, match=r"/var/lib/driftd-data.*logs.inference=/data/logs"):
        render_job(config, job_id="j3", reason="r")
