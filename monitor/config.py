"""driftd's configuration: one YAML or TOML file, validated once into frozen dataclasses.

Every error names its key (``signals.mmd.permutations: must be >= 1, got 0``) and all of them
are reported together. Relative paths are resolved against the config file's directory. Each
section is declared and read by the layer that owns it (``monitor.ingest.config``,
``monitor.signals.config``, ``monitor.engine.config``, ``monitor.policy.config``,
``retrain.config``, ``monitor.service.config``); this module sits above all of them and
assembles the whole file, so every part of :class:`Config` has its owner's type.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from monitor.configutil import Section, raise_config_errors, read_document
from monitor.engine.config import MonitorConfig, parse_monitor
from monitor.policy.config import PolicyConfig, parse_policy, unreachable_rules
from monitor.service.config import ServiceConfig, parse_service
from retrain.config import RetrainConfig, parse_retrain


@dataclass(frozen=True)
class Config:
    """The whole file."""

    source: str                     # the file it was read from ("<flags>" for CLI flags)
    monitor: MonitorConfig
    service: ServiceConfig
    policy: PolicyConfig
    retrain: RetrainConfig


def parse_config(data: object, *, source: str, base: Path) -> Config:
    """Validate a parsed document; raises ConfigError listing every bad key."""
    errors: list[str] = []
    root = Section(data, "", errors)
    monitor = parse_monitor(root, base)
    service = parse_service(root, base)
    policy = parse_policy(root.section("policy"))
    retrain = parse_retrain(root.section("retrain"), base)
    root.finish()
    # A rule that can never fire is a silent hole in the alerting: refuse it, naming both numbers.
    for index, message in unreachable_rules(policy, permutations=monitor.signals.mmd.permutations):
        key = "policy.rules" if index is None else f"policy.rules[{index}].threshold"
        errors.append(f"{key}: {message}" + (" (a default rule: set policy.rules to change it)" if index is None else ""))
    raise_config_errors(source, errors)
    return Config(source=source, monitor=monitor, service=service, policy=policy, retrain=retrain)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raises ConfigError naming the file and every bad key."""
    p = Path(path).expanduser().resolve()
    return parse_config(read_document(p), source=str(p), base=p.parent)

