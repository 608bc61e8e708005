"""The ``driftd`` command line: one module per command group, errors mapped to exit codes here.

Exit codes: 0 ok, 2 usage or configuration error, 1 runtime failure, 141 (128 + SIGPIPE, as a
tool killed by the signal reports) when the reader of stdout went away, e.g. ``| head -2``: a
quiet exit, nothing on stderr. Every error is one line on stderr that says what to do.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
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
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, in the catch point, not at interpreter exit
        return code
    except BrokenPipeError:
        return _reader_went_away()
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


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


def _reader_went_away() -> int:
    """stdout's reader closed the pipe (``driftd ... | head``): nothing more to say, say nothing.

    stdout is pointed at /dev/null so the interpreter's final flush of what is still buffered
    does not print "Exception ignored ... BrokenPipeError" on the way out.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a descriptor (captured): nothing to redirect
        pass
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
