"""Helpers shared by CLI commands: loading config from --config or from flags.

Imports here stay light (no torch, scipy, timm): every command module imports this when the
parser is built, and `driftd --help` must answer at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from monitor.config import Config, load_config, parse_config
from monitor.errors import ConfigError, DriftdError


class UsageError(DriftdError):
    """A command was called wrongly (a flag out of range, a missing choice): exit 2, as argparse's own."""

    exit_code = 2


def add_config_argument(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    parser.add_argument("--config", metavar="FILE", required=required, help="driftd YAML or TOML config file")


def config_from_flags(args: argparse.Namespace, flag_to_key: dict[str, str]) -> Config:
    """``--config FILE``, else a config document assembled from flags and validated the same way.

    ``flag_to_key`` maps argparse dests to dotted config keys (e.g. ``logs -> logs.inference``).
    Flags given together with --config override the file.
    """
    overrides: dict[str, Any] = {k: getattr(args, d) for d, k in flag_to_key.items() if getattr(args, d, None) is not None}
    if getattr(args, "config", None):
        path = Path(args.config).expanduser().resolve()
        from monitor.configutil import read_document

        doc = read_document(path) or {}
        base = path.parent
        source = str(path)
    else:
        if not overrides:
            raise ConfigError("no configuration: pass --config FILE, or the flags this command documents in --help")
        doc, base, source = {}, Path.cwd(), "<flags>"
    for dotted, value in overrides.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_config(doc, source=source, base=base)


__all__ = ["UsageError", "add_config_argument", "config_from_flags", "load_config"]
