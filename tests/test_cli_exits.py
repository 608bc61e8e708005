"""How the CLI ends when its reader goes away: quietly, like any Unix tool killed by SIGPIPE."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_helpers import REPO

pytestmark = pytest.mark.slow  # starts interpreters that import torch


def _with_closed_stdout(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Run ``driftd ARGS`` with stdout a pipe whose reader has already gone (as after `| head`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "monitor", *args], stdout=write_end, stderr=subprocess.PIPE,
                              cwd=REPO, timeout=120, check=False)
    finally:
        os.close(write_end)


def test_a_closed_stdout_is_a_quiet_exit(tmp_path: Path) -> None:
    config = tmp_path / "driftd.yaml"
    config.write_text(f"logs:\n  inference: {tmp_path / 'logs'}\n", encoding="utf-8")
    (tmp_path / "logs").mkdir()  # a configured log directory must exist
    result = _with_closed_stdout(["config", "validate", "--config", str(config)])  # `... | head -2`
    assert result.returncode == 141, result.stderr.decode()
    assert result.stderr == b"", result.stderr.decode()  # no "internal error", no "Exception ignored"
