"""The retrain job's process: ``python -m monitor.cli.job --config CONFIG --job-dir DIR
[--reason TEXT] [--onset SECONDS] [--domain-gap X] [--mmd X]``, what the launchers start
(``retrain.launch``) locally, under torchrun or in a Kubernetes Job.

It loads the whole config file and calls :func:`retrain.job.run_job`. It sits here, in the top
layer, because the whole file includes the sections above retrain (the service's): retrain itself
reads only what a retrain needs (``retrain.config.JobSettings``). Not a ``driftd`` subcommand: it
is the launchers' contract with the job, not a command for users (``driftd retrain`` asks the
daemon for a job, or runs one in its own process with ``--local``). Exit 0 when the job finished
with "promoted" or "rejected", 1 on "failed", 2 on a bad config.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from monitor.config import load_config
from monitor.errors import ConfigError
from retrain.job import run_job
from retrain.launch.job_args import JOB_MODULE

PROG = f"python -m {JOB_MODULE}"


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _event_time(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected epoch seconds (> 0), got {text!r}")
    return value


def _share(text: str) -> float:
    value = _finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1], got {text!r}")
    return value


def _non_negative(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a value >= 0, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run one guarded retrain and record the outcome.",
        epilog=f"example: {PROG} --config driftd.yaml --job-dir /var/lib/driftd/retrain/j1 "
               "--reason 'accuracy below 0.8'")
    parser.add_argument("--config", required=True, help="driftd config file (YAML or TOML)")
    parser.add_argument("--job-dir", required=True, type=Path, help="where progress.jsonl and result.json go")
    parser.add_argument("--reason", default="manual", help="why this retrain runs (recorded)")
    parser.add_argument("--onset", type=_event_time, default=None, metavar="SECONDS",
                        help="event time (epoch seconds) the breach began: train and judge on rows predicted after it")
    parser.add_argument("--domain-gap", type=_share, default=None,
                        help="the monitor's share of shifted feature dimensions in [0, 1]; chooses the strategy "
                             "(default: measured by the job on the rows it trains on)")
    parser.add_argument("--mmd", type=_non_negative, default=None,
                        help="the monitor's batch MMD^2 on the breaching window (recorded in the result)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{JOB_MODULE}: error: {exc}", file=sys.stderr)
        return 2
    from retrain.threads import configure_retrain_threads
    configure_retrain_threads(config)  # measured: torch's thread-per-core default stalls on a shared host
    result = run_job(config, args.job_dir, reason=args.reason, domain_gap_value=args.domain_gap, onset=args.onset,
                     mmd_value=args.mmd)
    return 0 if result.outcome in ("promoted", "rejected") else 1


if __name__ == "__main__":
    sys.exit(main())
