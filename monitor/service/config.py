"""PLACEHOLDER owned by the daemon work (issue 3): parses the `http` and `scheduler` sections."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from monitor.configutil import Section


@dataclass(frozen=True)
class ServiceConfig:
    pass


def parse_service(root: Section, base: Path) -> ServiceConfig:
    root.section("http").finish()
    root.section("scheduler").finish()
    return ServiceConfig()
