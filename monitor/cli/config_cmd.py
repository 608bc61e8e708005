"""`driftd config validate`: check a config file and summarise it, or list every bad key."""

from __future__ import annotations

import argparse

from monitor.cli.common import add_config_argument, load_config
from monitor.config import redact_location
from monitor.errors import ConfigError

EPILOG = """examples:
  driftd config validate --config driftd.yaml
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


def validate(args: argparse.Namespace) -> int:
    if args.signals:
        from monitor.signals.results import SIGNAL_NAMES

        print("\n".join(SIGNAL_NAMES))
        return 0
    if not args.config:
        raise ConfigError("config validate: pass --config FILE (or --signals to list signal names)")
    config = load_config(args.config)  # ConfigError lists every bad key (exit 2)
    print(f"ok: {config.source}")
    for line in summary(config):
        print(f"  {line}")
    return 0
