"""`driftd reference build`: a reference set from labelled validation-time logs."""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import replace
from pathlib import Path

from monitor.cli.common import UsageError, add_config_argument
from monitor.config import load_config
from monitor.ingest.config import IngestConfig
from monitor.signals.config import MmdConfig
from monitor.configutil import redact_location
from monitor.errors import ContractError, DriftdError

log = logging.getLogger(__name__)

# monitor.engine.reference.DEFAULT_MAX_ROWS, repeated so `--help` need not import torch
# (tests/test_cli_imports.py checks the two agree).
DEFAULT_MAX_ROWS = 2000


# Below this many labelled rows the reference's accuracy has a standard error above ~0.01-0.015:
# the accuracy rules' credible margin (monitor.policy) then costs real sensitivity.
WELL_MEASURED_LABELS = 1000


def build(args: argparse.Namespace) -> int:
    mmd = MmdConfig()
    ingest = IngestConfig()
    if args.config:
        config = load_config(args.config)
        mmd = config.monitor.signals.mmd
        ingest = config.monitor.ingest
    out = Path(args.out) if args.out else (config.monitor.reference_dir if args.config else None)
    if out is None:
        raise UsageError("no output directory: pass --out DIR (or --config with reference_dir)")
    if args.max_rows < 2:
        raise UsageError(f"--max-rows must be at least 2, got {args.max_rows}")
    from monitor.ingest.tail import FileNotReady, Tailer

    # Validation logs are complete by the time a reference is built: nothing to wait for.
    tailer = Tailer(args.logs, "inference", replace(ingest, settle_seconds=0.0, max_files_per_cycle=10**9),
                    key="--logs")  # a missing local directory: exit 2 naming the flag
    from monitor.engine.reference import ReferenceBuilder, save_reference  # torch and scipy: only to build one

    builder = ReferenceBuilder(
        max_rows=args.max_rows,
        projection=mmd.projection,
        projection_dims=mmd.projection_dims,
        seed=args.seed,
        source=redact_location(args.logs),  # stored in the reference's metadata
    )
    files = skipped = rejected = 0
    for info in tailer.discover({}):
        try:
            for chunk in tailer.read(info, 0, {}):
                rejected += chunk.rejections.total
                batch = chunk.batch
                if args.model_version:
                    batch = batch.take(batch.model_version == args.model_version)
                try:
                    builder.add(batch)
                except ValueError as exc:  # e.g. a feature width that differs from earlier files
                    raise DriftdError(f"{info.path}: {exc}; build references from logs of one model each") from None
            files += 1
        except (ContractError, FileNotReady) as exc:
            skipped += 1
            log.warning("skipping %s: %s", info.path, exc)
    if not builder.versions():
        which = f" for model_version {args.model_version!r}" if args.model_version else ""
        raise DriftdError(
            f"no valid rows{which} under {redact_location(args.logs)} ({files} files read, {skipped} skipped)"
        )
    for version, ref in builder.finish().items():
        path = save_reference(ref, out)
        acc = "no labels" if ref.accuracy is None else f"accuracy {ref.accuracy:.4f} on {ref.labelled_rows} labels"
        print(
            f"model_version {version}: {ref.rows_seen} rows, {ref.sample.shape[0]} sampled, D={ref.feature_dim}, "
            f"C={ref.n_classes}, {acc}, bandwidth {ref.bandwidth:.4g} -> {path}"
        )
        if ref.calibrator is None:
            print(f"  note: no `label` column for {version}: the label-free accuracy estimate is disabled")
        elif ref.labelled_rows < WELL_MEASURED_LABELS:
            se = math.sqrt(max(ref.accuracy * (1 - ref.accuracy), 0.01) / ref.labelled_rows)
            print(f"  warning: only {ref.labelled_rows} labelled rows back the accuracy of {version} "
                  f"(standard error ~{se:.3f}); the accuracy rules compare production with it, and their "
                  f"margin widens to cover it: build from >= {WELL_MEASURED_LABELS} labelled rows for sharp rules")
    if rejected or skipped:
        print(f"{rejected} rows rejected, {skipped} files skipped (see warnings above)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reference", help="build reference sets", description="Reference sets for drift signals.")
    rsub = p.add_subparsers(dest="reference_command", metavar="SUBCOMMAND")
    rsub.required = True
    b = rsub.add_parser(
        "build",
        help="build a reference from labelled validation-time logs",
        description="Read inference logs in the log contract (with a `label` column for the accuracy "
        "calibrator) and write one reference per model_version under --out.",
        epilog="example:\n  driftd reference build --logs val-logs/ --out driftd-reference/ --max-rows 2000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--logs", metavar="PATH", required=True, help="validation inference logs (directory or URI)")
    b.add_argument("--out", metavar="DIR", help="reference directory (default: reference_dir of --config)")
    add_config_argument(b)
    b.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, help=f"rows kept in the feature sample (default {DEFAULT_MAX_ROWS})")
    b.add_argument("--model-version", metavar="V", help="only this model_version")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=build)
