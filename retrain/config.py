"""PLACEHOLDER owned by the retraining work (issue 4): parses the `retrain` section."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from monitor.configutil import Section


@dataclass(frozen=True)
class RetrainConfig:
    pass


def parse_retrain(section: Section, base: Path) -> RetrainConfig:
    section.finish()
    return RetrainConfig()
