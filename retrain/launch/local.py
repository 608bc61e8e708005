"""Start the retrain job (``python -m monitor.cli.job``) as a child process so the daemon stays
responsive and the GPU memory is released when the job exits.

The child runs in its own process group (a terminate reaches torchrun's workers too) with
stdout/stderr in ``job_dir/job.log``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from retrain.jobdir import LOG_FILE
from retrain.launch.ddp import torchrun_command
from retrain.launch.job_args import Breach, job_args


@dataclass
class LocalJob:
    """A started job. ``poll()`` -> exit code or None while running."""

    process: subprocess.Popen
    job_dir: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if still running after ``timeout`` seconds."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self, grace_seconds: float = 10.0) -> int:
        """SIGTERM the job's process group, SIGKILL after ``grace_seconds``; returns the exit code."""
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_seconds
            while self.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.process.poll() is None:
                self._signal(signal.SIGKILL)
        return self.process.wait()

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:  # already gone between poll and kill
            pass


def job_command(config_path: str, job_dir: Path, *, reason: str, breach: Breach | None = None,
                python: str = sys.executable) -> list[str]:
    return [python, *job_args(config_path, job_dir, reason=reason, breach=breach)]


def launch_local(config_path: str, job_dir: Path, *, reason: str, nproc_per_node: int | None = None,
                 breach: Breach | None = None) -> LocalJob:
    """Start one retrain; ``nproc_per_node`` (default: the config's ``retrain.nproc_per_node``)
    above 1 runs it under torchrun; ``breach``: the monitor's onset and shift measurement, passed
    on to the job. Raises ConfigError if the config's ``retrain`` section cannot be read (the job
    itself reads the whole file when it starts)."""
    if nproc_per_node is None:
        from retrain.config import load_retrain

        nproc_per_node = load_retrain(config_path).nproc_per_node
    # the child runs in job_dir: relative paths given here must not be re-read from there
    config_path = str(Path(config_path).resolve())
    job_dir = Path(job_dir).resolve()
    job_dir.mkdir(parents=True, exist_ok=True)
    command = (torchrun_command(config_path, job_dir, reason=reason, nproc_per_node=nproc_per_node, breach=breach)
               if nproc_per_node > 1 else job_command(config_path, job_dir, reason=reason, breach=breach))
    with open(job_dir / LOG_FILE, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=str(job_dir))
    return LocalJob(process=process, job_dir=job_dir)
