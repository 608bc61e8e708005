"""The launcher contract: what starting a retrain job returns, and the shape of a launcher.

Beside the launchers that implement it (local, kubernetes) rather than in the daemon's queue
that consumes it, so a new way to run a job is written against this file alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol


class JobHandle(Protocol):
    """What a launcher returns (``retrain.launch.local.LocalJob``, ``...kubernetes.KubernetesJob``).

    A handle may also carry ``external_ref: dict[str, str]``: the job runs outside this process
    and survives it; the queue then leaves it running at shutdown and finds it again with ``attach``.
    """

    def poll(self) -> int | None: ...
    def terminate(self, grace_seconds: float) -> Any: ...


# (job_id, job_dir, reason, attempt) -> a started job; attempt counts from 1
Launcher = Callable[[str, Path, str, int], JobHandle]
# external_ref of a job left running at the last shutdown -> a handle on it
Attacher = Callable[[dict[str, Any]], JobHandle]
