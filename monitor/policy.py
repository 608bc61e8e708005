"""PLACEHOLDER owned by the daemon work (issue 3): trigger rules over window signals."""

from __future__ import annotations

from dataclasses import dataclass

from monitor.configutil import Section


@dataclass(frozen=True)
class PolicyConfig:
    pass


def parse_policy(section: Section) -> PolicyConfig:
    section.finish()
    return PolicyConfig()
