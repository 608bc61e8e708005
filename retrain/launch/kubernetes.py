"""Run one retraining job as a Kubernetes ``batch/v1`` Job instead of a local subprocess.

:func:`render_job` turns ``config.retrain.kubernetes`` into the Job manifest (pure: no cluster
needed, so it is tested offline and the same function generates the template shipped in
``deploy/kubernetes/base/retrain-job.yaml``). :func:`launch_kubernetes` creates it with the
official client and returns a :class:`KubernetesJob`: a ``retrain.launch.base.JobHandle`` with
``wait`` too, like ``retrain.launch.local.LocalJob``.

Inside the pod the driftd ConfigMap is mounted at :data:`CONFIG_MOUNT` and the state PVC at
:data:`STATE_MOUNT`; the config's ``state_dir``, ``reference_dir`` and ``retrain.registry_dir``
must lie under the latter so that the job and the daemon see the same registry and job dir.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from monitor.errors import ConfigError, DriftdError
from retrain.launch.job_args import Breach, job_args

if TYPE_CHECKING:
    from retrain.config import JobSettings, KubernetesConfig

CONFIG_MOUNT = PurePosixPath("/etc/driftd")
STATE_MOUNT = PurePosixPath("/var/lib/driftd")
DATA_MOUNT = PurePosixPath("/var/lib/driftd-data")
JOB_NAME_PREFIX = "driftd-retrain-"
RUN_AS_ID = 10001                  # the image's non-root user (see deploy/kubernetes/README.md)
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_MAX_ANNOTATION_REASON = 1024


def job_dir_for(config: JobSettings, job_id: str) -> PurePosixPath:
    """Where the job writes progress.jsonl/result.json: ``<state_dir>/retrain/<job_id>``."""
    return PurePosixPath(str(config.monitor.state_dir)) / "retrain" / job_id


def job_name(job_id: str) -> str:
    """The Job's object name: DNS-1123, at most 63 characters (it becomes a pod label)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", job_id.lower()).strip("-")
    return (JOB_NAME_PREFIX + slug)[:63].rstrip("-")


def _check_job_id(job_id: str) -> None:
    if not _LABEL_VALUE.fullmatch(job_id):
        raise ValueError(
            f"job_id {job_id!r}: must be 1-63 characters of letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit (it is used as a Kubernetes label value)"
        )


def _in_pod_config_path(config: JobSettings) -> str:
    k8s = config.retrain.kubernetes
    if k8s.config_map is None:  # the image is expected to carry the config at the same path
        return str(config.source)
    return str(CONFIG_MOUNT / PurePosixPath(str(config.source)).name)


def _check_paths_on_data_volume(config: JobSettings) -> None:
    """Training reads inputs (and the logs behind features-only mode) from the data PVC."""
    if config.retrain.kubernetes.data_pvc is None:
        return
    paths = {"retrain.input_root": config.retrain.input_root, "logs.inference": config.monitor.logs.inference}
    outside = [f"{key}={path}" for key, path in paths.items()
               if path is not None and "://" not in str(path)
               and not PurePosixPath(str(path)).is_relative_to(DATA_MOUNT)]
    if outside:
        raise ConfigError(
            f"{config.source}: retrain.kubernetes.data_pvc is mounted at {DATA_MOUNT} in the job, but "
            f"{', '.join(outside)} lie outside it; mount the same volume there in the daemon too"
        )


def _check_paths_on_state_volume(config: JobSettings, job_dir: PurePosixPath) -> None:
    if config.retrain.kubernetes.state_pvc is None:
        return
    paths = {
        "state_dir": config.monitor.state_dir,
        "reference_dir": config.monitor.reference_dir,
        "retrain.registry_dir": config.retrain.registry_dir,
        "job_dir": job_dir,
    }
    outside = [f"{key}={path}" for key, path in paths.items()
               if not PurePosixPath(str(path)).is_relative_to(STATE_MOUNT)]
    if outside:
        raise ConfigError(
            f"{config.source}: retrain.kubernetes.state_pvc is mounted at {STATE_MOUNT} in the job, "
            f"but {', '.join(outside)} lie outside it; put them under {STATE_MOUNT}/ so the job and the "
            "daemon share them"
        )


def _command(config: JobSettings, job_dir: PurePosixPath, reason: str, breach: Breach | None) -> list[str]:
    args = job_args(_in_pod_config_path(config), job_dir, reason=reason, breach=breach)
    nproc = config.retrain.nproc_per_node
    if nproc > 1:
        # --standalone: single-node rendezvous on localhost, no etcd or master address needed.
        return ["torchrun", "--standalone", f"--nproc_per_node={nproc}", *args]
    return ["python", *args]


def _tolerations(k8s: KubernetesConfig) -> list[dict[str, Any]]:
    out = []
    for t in k8s.tolerations:
        item: dict[str, Any] = {"operator": t.operator}
        for key, value in (("key", t.key), ("value", t.value), ("effect", t.effect),
                           ("tolerationSeconds", t.toleration_seconds)):
            if value is not None:
                item[key] = value
        out.append(item)
    return out


def render_job(config: JobSettings, *, job_id: str, reason: str, job_dir: PurePosixPath | None = None,
               breach: Breach | None = None) -> dict[str, Any]:
    """The ``batch/v1`` Job manifest (plain dict) that runs ``retrain.job`` for ``job_id``.

    ``job_dir`` defaults to :func:`job_dir_for`. Raises ``ValueError`` for a job_id that cannot
    be a label value and ``ConfigError`` when ``retrain.kubernetes.image`` is unset or the state
    paths are not on the mounted PVC.
    """
    _check_job_id(job_id)
    k8s = config.retrain.kubernetes
    if k8s.image is None:
        raise ConfigError(f"{config.source}: retrain.kubernetes.image is required to launch a Kubernetes Job")
    job_dir = job_dir if job_dir is not None else job_dir_for(config, job_id)
    _check_paths_on_state_volume(config, job_dir)
    _check_paths_on_data_volume(config)

    labels = {"app": "driftd", "app.kubernetes.io/component": "retrain", "job-id": job_id}
    limits: dict[str, str] = {"cpu": k8s.cpu, "memory": k8s.memory}
    if k8s.gpus > 0:
        limits["nvidia.com/gpu"] = str(k8s.gpus)
    mounts: list[dict[str, Any]] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        # DataLoader workers pass batches through /dev/shm; the container default is 64 MiB.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shm_size}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if k8s.config_map is not None:
        mounts.append({"name": "config", "mountPath": str(CONFIG_MOUNT), "readOnly": True})
        volumes.append({"name": "config", "configMap": {"name": k8s.config_map}})
    if k8s.state_pvc is not None:
        mounts.append({"name": "state", "mountPath": str(STATE_MOUNT)})
        volumes.append({"name": "state", "persistentVolumeClaim": {"claimName": k8s.state_pvc}})
    if k8s.data_pvc is not None:
        mounts.append({"name": "data", "mountPath": str(DATA_MOUNT), "readOnly": True})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": k8s.data_pvc, "readOnly": True}})

    container = {
        "name": "retrain",
        "image": k8s.image,
        "command": _command(config, job_dir, reason, breach),
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "HOME", "value": "/tmp"},  # read-only root: libraries' caches go to the emptyDir
            {"name": "DRIFTD_JOB_ID", "value": job_id},
        ],
        "resources": {"requests": {"cpu": k8s.cpu, "memory": k8s.memory}, "limits": limits},
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_ID,
            "runAsGroup": RUN_AS_ID,
            "fsGroup": RUN_AS_ID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if k8s.service_account is not None:
        pod_spec["serviceAccountName"] = k8s.service_account
    else:  # the job never calls the API server
        pod_spec["automountServiceAccountToken"] = False
    if k8s.tolerations:
        pod_spec["tolerations"] = _tolerations(k8s)
    if k8s.node_selector:
        pod_spec["nodeSelector"] = dict(k8s.node_selector)

    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(job_id),
            "namespace": k8s.namespace,
            "labels": labels,
            "annotations": {"driftd/reason": reason[:_MAX_ANNOTATION_REASON]},
        },
        "spec": {
            "backoffLimit": 0,  # a failed run is reported, not retried blindly: the daemon decides
            "activeDeadlineSeconds": k8s.active_deadline_seconds,
            "ttlSecondsAfterFinished": k8s.ttl_seconds_after_finished,
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
        },
    }


class KubernetesLaunchError(DriftdError):
    """The API server refused or could not be reached; the message carries its answer."""


def default_api_client(environ: Mapping[str, str] = os.environ) -> Any:
    """An ``ApiClient`` from the in-cluster service account, else from ``$KUBECONFIG``/~/.kube/config.

    ``KUBECONFIG`` is read here, at call time (the client library reads it once, at import).
    """
    from kubernetes import client
    from kubernetes import config as kube_config

    configuration = client.Configuration()
    try:
        kube_config.load_incluster_config(client_configuration=configuration)
    except kube_config.ConfigException:
        try:
            kube_config.load_kube_config(
                config_file=environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config"),
                client_configuration=configuration, persist_config=False,
            )
        except (kube_config.ConfigException, OSError) as exc:
            raise KubernetesLaunchError(
                f"cannot reach Kubernetes: not in a cluster and no usable kubeconfig ({exc}); "
                "run driftd in the cluster with its ServiceAccount or set KUBECONFIG"
            ) from None
    return client.ApiClient(configuration)


def _api_error(action: str, exc: Exception) -> KubernetesLaunchError:
    status = getattr(exc, "status", None)
    body = getattr(exc, "body", None) or str(exc)
    return KubernetesLaunchError(f"{action} failed (HTTP {status}): {str(body)[:500]}")


@dataclass
class KubernetesJob:
    """A launched Job. ``poll`` maps its conditions to an exit code like a subprocess."""

    name: str
    namespace: str
    api_client: Any
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    poll_interval: float = 5.0
    _batch: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from kubernetes import client

        self._batch = client.BatchV1Api(self.api_client)

    def poll(self) -> int | None:
        """None while running, 0 when the Job completed, 1 when it failed or no longer exists."""
        from kubernetes.client.exceptions import ApiException

        try:
            job = self._batch.read_namespaced_job_status(self.name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:  # deleted (by terminate, TTL or a person): it did not succeed
                return 1
            raise _api_error(f"reading Job {self.namespace}/{self.name}", exc) from None
        for condition in (job.status.conditions or []) if job.status else []:
            if condition.status == "True" and condition.type == "Complete":
                return 0
            if condition.status == "True" and condition.type == "Failed":
                return 1
        return None

    def wait(self, timeout: float | None = None) -> int | None:
        """Poll until the Job finishes; None if still running after ``timeout`` seconds."""
        deadline = None if timeout is None else self.clock() + timeout
        while True:
            code = self.poll()
            if code is not None:
                return code
            if deadline is not None and self.clock() >= deadline:
                return None
            self.sleep(self.poll_interval if deadline is None else max(0.0, min(self.poll_interval, deadline - self.clock())))

    def terminate(self, grace_seconds: float = 30.0) -> None:
        """Delete the Job and (in the background) its pods, which get ``grace_seconds`` to stop."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            self._batch.delete_namespaced_job(
                self.name, self.namespace,
                body=client.V1DeleteOptions(propagation_policy="Background", grace_period_seconds=int(grace_seconds)),
            )
        except ApiException as exc:
            if exc.status != 404:
                raise _api_error(f"deleting Job {self.namespace}/{self.name}", exc) from None

    def logs(self, tail_lines: int = 200) -> str:
        """The last lines of the Job's pod log ('' before a pod exists)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        core = client.CoreV1Api(self.api_client)
        try:
            pods = core.list_namespaced_pod(self.namespace, label_selector=f"job-name={self.name}")
            if not pods.items:
                return ""
            newest = max(pods.items, key=lambda p: p.metadata.creation_timestamp or 0)
            return core.read_namespaced_pod_log(newest.metadata.name, self.namespace, tail_lines=tail_lines)
        except ApiException as exc:
            raise _api_error(f"reading logs of Job {self.namespace}/{self.name}", exc) from None


def launch_kubernetes(
    config: JobSettings, job_id: str, reason: str, *, api: Any = None, job_dir: PurePosixPath | None = None,
    breach: Breach | None = None,
) -> KubernetesJob:
    """Create the Job of :func:`render_job`; ``api`` is a ``kubernetes.client.ApiClient``.

    Raises KubernetesLaunchError when the API server refuses (for example a Job of that name
    already exists: HTTP 409) or cannot be reached.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    manifest = render_job(config, job_id=job_id, reason=reason, job_dir=job_dir, breach=breach)
    api_client = api if api is not None else default_api_client()
    namespace = manifest["metadata"]["namespace"]
    try:
        client.BatchV1Api(api_client).create_namespaced_job(namespace, manifest)
    except ApiException as exc:
        raise _api_error(f"creating Job {namespace}/{manifest['metadata']['name']}", exc) from None
    except HTTPError as exc:
        raise KubernetesLaunchError(f"creating Job {namespace}/{manifest['metadata']['name']}: {exc}") from None
    return KubernetesJob(name=manifest["metadata"]["name"], namespace=namespace, api_client=api_client)
