"""The job process's arguments (``python -m monitor.cli.job ...``) every launcher passes: config,
job dir, reason, and what the monitor knows about the breach that asked for the retrain."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import PurePath

# The job's command-line entry point: it loads the whole config file, so it sits in the top layer
# (monitor.cli), above retrain; it calls retrain.job.run_job.
JOB_MODULE = "monitor.cli.job"


@dataclass(frozen=True)
class Breach:
    """The monitor's view of the breach, handed to the job (each part optional).

    ``onset``: event time (epoch seconds) of the start of the first breaching window;
    ``domain_gap``: the share of feature dimensions shifted on the breaching window(s), in [0, 1];
    ``mmd``: the batch MMD^2 statistic on the breaching window.
    """

    onset: float | None = None
    domain_gap: float | None = None
    mmd: float | None = None

    def __post_init__(self) -> None:
        for name in ("onset", "domain_gap", "mmd"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"breach {name} must be finite, got {value}")
        if self.onset is not None and self.onset <= 0:
            raise ValueError(f"breach onset must be epoch seconds > 0, got {self.onset}")
        if self.domain_gap is not None and not 0.0 <= self.domain_gap <= 1.0:
            raise ValueError(f"breach domain_gap must be a share in [0, 1], got {self.domain_gap}")
        if self.mmd is not None and self.mmd < 0:
            raise ValueError(f"breach mmd must be >= 0, got {self.mmd}")

    def argv(self) -> list[str]:
        # repr: the shortest text that parses back to the same float
        out = []
        for flag, value in (("--onset", self.onset), ("--domain-gap", self.domain_gap), ("--mmd", self.mmd)):
            if value is not None:
                out += [flag, repr(float(value))]
        return out


def job_args(config_path: str, job_dir: PurePath, *, reason: str, breach: Breach | None = None) -> list[str]:
    """``-m monitor.cli.job --config ... --job-dir ... --reason ... [--onset S] [--domain-gap X] [--mmd X]``."""
    args = ["-m", JOB_MODULE, "--config", str(config_path), "--job-dir", str(job_dir), "--reason", reason]
    return args + (breach.argv() if breach is not None else [])
