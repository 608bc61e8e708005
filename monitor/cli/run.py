"""`driftd run`: the long-running daemon (scheduler, HTTP API, Prometheus metrics, sd_notify)."""

from __future__ import annotations

import argparse
import logging
import os

from monitor.cli.common import add_config_argument, load_config
from monitor.service.logging_setup import FORMATS, setup_logging

EPILOG = """example:
  driftd run --config /etc/driftd/driftd.yaml --log-format json

SIGTERM/SIGINT finish the current batch and exit 0; SIGHUP reloads the config and references.
Endpoints: /metrics /healthz /readyz /api/v1/status, POST /api/v1/retrain (bearer token)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the monitoring daemon", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_argument(p, required=True)
    p.add_argument("--log-format", choices=FORMATS, default="text", help="text (default) or json lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)  # a bad config exits 2 before logging or anything else is set up
    setup_logging(args.log_format, getattr(args, "log_level", "INFO"))
    # The engine (torch, scipy: seconds on a busy host) loads before Daemon() binds the API socket.
    # The other way round, a readiness probe connects to a socket nobody serves yet, gives up, and
    # its late answer fails with a broken pipe that lands in the log as a non-JSON traceback.
    import monitor.engine.cycle  # noqa: F401
    from monitor.service.daemon import Daemon
    code = Daemon(config, config_path=config.source).serve()
    if code != 0:
        # a job overran the shutdown grace: its thread would hold the interpreter open at exit
        logging.shutdown()
        os._exit(code)
    return code
