"""Which launcher runs a queued retrain: ``retrain.launcher`` chooses local or Kubernetes at
launch time, and a Kubernetes Job left running at the last shutdown is found again.

The daemon's queue only sees the :mod:`retrain.launch.base` contract; the choice, the Job
naming for re-runs and the breach arguments taken from the job's request live here, next to
the launchers they pick between.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from retrain.files import read_json
from retrain.jobdir import REQUEST_FILE
from retrain.launch.base import Launcher

if TYPE_CHECKING:  # what a retrain reads of the config file (monitor.config.Config is one)
    from retrain.config import JobSettings

log = logging.getLogger("driftd")


@dataclasses.dataclass
class ExternalJob:
    """A launched job that outlives the daemon (a Kubernetes Job), with what finds it again."""

    handle: Any
    external_ref: dict[str, str]

    def poll(self) -> int | None:
        return self.handle.poll()

    def terminate(self, grace_seconds: float) -> Any:
        return self.handle.terminate(grace_seconds)


def attach_external(ref: dict[str, Any]) -> Any:
    """A handle on a job left running at the last shutdown (see ExternalJob)."""
    if ref.get("kind") != "kubernetes":
        raise ValueError(f"cannot re-attach to a job of kind {ref.get('kind')!r}")
    from retrain.launch.kubernetes import KubernetesJob, default_api_client

    return KubernetesJob(name=str(ref["name"]), namespace=str(ref["namespace"]), api_client=default_api_client())


def make_launcher(config_path: str, get_config: Callable[[], JobSettings]) -> Launcher:
    """Starts ``retrain.job`` locally or as a Kubernetes Job, per ``retrain.launcher`` at launch time.

    The monitor's evidence recorded in the job's request.json (the breach's onset, its domain gap
    and MMD) goes to the job as arguments, the same on every attempt. A local job is a child
    process and is terminated at shutdown; a Kubernetes Job keeps running and is re-attached at
    the next start.
    """

    def launch(job_id: str, job_dir: Path, reason: str, attempt: int):
        config = get_config()
        breach = breach_of(read_json(job_dir / REQUEST_FILE) or {})
        if config.retrain.launcher == "kubernetes":
            from retrain.launch.kubernetes import launch_kubernetes

            # a re-run needs a new Job name (the old Job object may still exist); same job dir
            name = job_id if attempt <= 1 else f"{job_id}-a{attempt}"
            job = launch_kubernetes(config, name, reason, job_dir=PurePosixPath(str(job_dir)), breach=breach)
            return ExternalJob(job, {"kind": "kubernetes", "name": job.name, "namespace": job.namespace})
        from retrain.launch.local import launch_local

        return launch_local(config_path, job_dir, reason=reason, breach=breach)

    return launch


def breach_of(request: Mapping[str, Any]):
    """The job arguments (retrain.launch.job_args.Breach) from a request's monitor evidence; None
    for a manual request, or when the evidence is unusable (the job then measures for itself)."""
    from retrain.launch.job_args import Breach

    evidence = request.get("monitor") or {}
    values = {"onset": evidence.get("onset"), "domain_gap": evidence.get("domain_gap"), "mmd": evidence.get("mmd2")}
    if all(v is None for v in values.values()):
        return None
    try:
        return Breach(**{k: None if v is None else float(v) for k, v in values.items()})
    except (TypeError, ValueError) as exc:
        log.warning("job request's monitor evidence %s is unusable (%s); the job measures the shift itself", values, exc)
        return None
