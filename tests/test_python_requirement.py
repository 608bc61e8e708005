"""The Python requirement is one fact: pyproject.toml, the README quickstart and the code agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_readme_and_interpreter_agree_on_python_3_11() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["requires-python"] == ">=3.11"  # monitor/config.py imports tomllib (3.11+)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"Python (3\.\d+)\+", quickstart) == ["3.11"]
    systemd = (ROOT / "deploy" / "systemd" / "README.md").read_text(encoding="utf-8")
    assert "python3.11 -m venv" in systemd
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.(1[1-9])", dockerfile, flags=re.M)
