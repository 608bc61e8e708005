"""Multi-process (DDP) retraining through torchrun: one process per GPU (nccl) or CPU worker (gloo).

The job itself detects ``WORLD_SIZE`` (see ``retrain.job._distributed``); this module only builds
the command line that :func:`retrain.launch.local.launch_local` runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from retrain.launch.job_args import Breach, job_args


def torchrun_command(config_path: str, job_dir: Path, *, reason: str, nproc_per_node: int,
                     breach: Breach | None = None, python: str = sys.executable) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m monitor.cli.job ...``.

    ``--standalone`` picks a free rendezvous port on this host, so two jobs never collide.
    Raises ValueError for fewer than 2 processes (use the plain job for one).
    """
    if nproc_per_node < 2:
        raise ValueError(f"torchrun needs nproc_per_node >= 2, got {nproc_per_node}")
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            *job_args(config_path, job_dir, reason=reason, breach=breach)]
