"""`driftd config validate`: check a config file and summarise it, or list every bad key."""

from __future__ import annotations

import argparse
import urllib.parse
from pathlib import Path

from monitor.cli.common import add_config_argument, load_config
from monitor.configutil import redact_location
from monitor.errors import ConfigError

EPILOG = """examples:
  driftd config validate --config driftd.yaml
  driftd config validate --config driftd.yaml --skip-paths   # validating for another machine
  driftd config validate --signals          # the signal names policy rules may use"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="work with the config file", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    inner = p.add_subparsers(dest="config_command", metavar="COMMAND")
    inner.required = True
    v = inner.add_parser("validate", help="validate a config file (exit 2 listing every bad key)", epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_argument(v)
    v.add_argument("--signals", action="store_true", help="list the signal names policy rules may use, then exit")
    v.add_argument("--skip-paths", action="store_true",
                   help="do not check that local log, replay and input directories exist (validating on another machine)")
    v.set_defaults(func=validate)


def summary(config) -> list[str]:
    m, svc, pol = config.monitor, config.service, config.policy
    rules = ", ".join(f"{r.name} ({r.action})" for r in pol.rules) or "none"
    return [
        f"model: {m.model}",
        f"logs: {redact_location(m.logs.inference)} (labels: {redact_location(m.logs.labels or 'none')})",
        f"state_dir: {m.state_dir}   reference_dir: {m.reference_dir}",
        f"window: {m.window.rows} rows or {m.window.seconds:g}s",
        f"http: {svc.http.url} (control token: {'set' if svc.http.has_token else 'none, loopback only'})",
        f"scheduler: every {svc.scheduler.interval_seconds:g}s, shutdown grace {svc.scheduler.shutdown_grace_seconds:g}s",
        f"policy: {'default rules' if pol.default_rules else 'rules'}: {rules}; cooldown {pol.cooldown_seconds:g}s",
        f"retrain: launcher {config.retrain.launcher}, min_labelled_rows {config.retrain.min_labelled_rows}, "
        f"registry {config.retrain.registry_dir}",
    ]


def _local_path(location: str) -> Path | None:
    """The local path of a location, or None for an object store (checked when driftd starts)."""
    if "://" not in location:
        return Path(location)
    parts = urllib.parse.urlsplit(location)
    return Path(urllib.parse.unquote(parts.path)) if parts.scheme == "file" else None


def missing_paths(config) -> list[str]:
    """Local directories the config names that do not exist, as `key: problem` lines.

    The daemon refuses to start on a missing log directory (monitor.ingest.tail); the replay
    logs and inputs are read by retraining, which would otherwise fail only when it first runs."""
    m, r = config.monitor, config.retrain
    wanted = [("logs.inference", m.logs.inference), ("logs.labels", m.logs.labels),
              ("retrain.replay_logs", r.replay_logs), ("retrain.input_root", None if r.input_root is None else str(r.input_root))]
    problems = []
    for key, location in wanted:
        path = None if location is None else _local_path(location)
        if path is None:
            continue
        if not path.exists():
            problems.append(f"{key}: {path} does not exist; fix the path, or create the directory (mkdir -p) "
                            "before starting driftd")
        elif not path.is_dir() and key != "retrain.replay_logs":
            problems.append(f"{key}: {path} is not a directory")
    return problems


def validate(args: argparse.Namespace) -> int:
    if args.signals:
        from monitor.signals.results import SIGNAL_NAMES

        print("\n".join(SIGNAL_NAMES))
        return 0
    if not args.config:
        raise ConfigError("config validate: pass --config FILE (or --signals to list signal names)")
    config = load_config(args.config)  # ConfigError lists every bad key (exit 2)
    problems = [] if args.skip_paths else missing_paths(config)
    if problems:
        raise ConfigError(f"{config.source}: invalid configuration:\n  " + "\n  ".join(problems)
                          + "\n  (--skip-paths validates the file alone, e.g. for another machine)")
    print(f"ok: {config.source}")
    for line in summary(config):
        print(f"  {line}")
    return 0
