"""The ``driftd`` command line: one module per command group, errors mapped to exit codes here.

Exit codes: 0 ok, 2 usage or configuration error, 1 runtime failure. Every error is one
line on stderr that says what to do.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from monitor.errors import DriftdError

# Each module exposes ``register(subparsers)`` and sets ``func`` on its parsers.
COMMAND_MODULES = (
    "monitor.cli.run",
    "monitor.cli.check",
    "monitor.cli.status",
    "monitor.cli.retrain",
    "monitor.cli.config_cmd",
    "monitor.cli.reference",
    "monitor.cli.models",
    "monitor.cli.demo",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints usage twice as much as needed
        self.exit(2, f"driftd: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="driftd",
        description="Drift monitoring and guarded retraining for deployed vision models.",
        epilog="example: driftd check --config driftd.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command group not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except DriftdError as exc:
        print(f"driftd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("driftd: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one catch point for what no command anticipated
        logging.getLogger("driftd").debug("unexpected error", exc_info=True)
        print(
            f"driftd: internal error: {type(exc).__name__}: {exc} (rerun with --log-level DEBUG for the "
            "traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
