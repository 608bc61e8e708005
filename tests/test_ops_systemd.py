"""The systemd unit: `systemd-analyze verify` prints nothing, the security exposure stays low."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from ops_helpers import DEPLOY, require_binary, run_tool

SYSTEMD = DEPLOY / "systemd"
UNIT = SYSTEMD / "driftd.service"
# Exposure is reported as 0.0-10.0 and --threshold takes tenths: 20 means "fail above 2.0".
SECURITY_THRESHOLD = 20


def _staged_unit(tmp_path: Path, *drop_ins: tuple[str, str]) -> Path:
    """A copy of the unit whose ExecStart points at a stub, plus optional drop-ins.

    verify insists the ExecStart binary exists; /opt/driftd/venv/bin/driftd does not exist on a
    test machine, so a drop-in beside the copy (verify reads ``<unit>.d/`` next to the file)
    replaces the path and keeps every other line under test.
    """
    stub = tmp_path / "driftd-stub"
    stub.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stub.chmod(0o755)
    unit = tmp_path / UNIT.name
    shutil.copy(UNIT, unit)
    drop_dir = tmp_path / f"{UNIT.name}.d"
    drop_dir.mkdir()
    (drop_dir / "00-test-execstart.conf").write_text(
        f"[Service]\nExecStart=\nExecStart={stub} run --config /etc/driftd/driftd.yaml\n", encoding="utf-8"
    )
    for name, text in drop_ins:
        (drop_dir / name).write_text(text, encoding="utf-8")
    return unit


def _verify(unit: Path) -> str:
    result = run_tool([require_binary("systemd-analyze"), "verify", "--man=no", str(unit)])
    return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else f"\n(exit {result.returncode})")


def test_verify_prints_nothing_for_the_unit(tmp_path) -> None:
    assert _verify(_staged_unit(tmp_path)) == ""


def test_verify_prints_nothing_with_the_gpu_drop_in(tmp_path) -> None:
    gpu = (SYSTEMD / "gpu.conf.example").read_text(encoding="utf-8")
    assert _verify(_staged_unit(tmp_path, ("gpu.conf", gpu))) == ""


def test_verify_does_report_a_broken_unit(tmp_path) -> None:
    # Proves the check above can fail: a missing binary and an unknown directive are reported.
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text(encoding="utf-8").replace("Restart=on-failure", "Restart=sometimes"), encoding="utf-8")
    output = _verify(unit)
    assert "/opt/driftd/venv/bin/driftd" in output
    assert "restart spec" in output


def _exposure(unit: Path) -> tuple[int, float, str]:
    result = run_tool([require_binary("systemd-analyze"), "security", "--offline=yes",
                       f"--threshold={SECURITY_THRESHOLD}", str(unit)])
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    return result.returncode, float(match.group(1)), result.stdout


def test_security_exposure_is_below_threshold() -> None:
    rc, level, output = _exposure(UNIT)
    assert rc == 0, output
    assert level <= SECURITY_THRESHOLD / 10


def test_security_threshold_catches_a_weakened_unit(tmp_path) -> None:
    weak = tmp_path / UNIT.name
    text = UNIT.read_text(encoding="utf-8")
    for directive in ("ProtectSystem=strict", "NoNewPrivileges=yes", "CapabilityBoundingSet=", "PrivateDevices=yes",
                      "SystemCallFilter=@system-service", "RestrictNamespaces=yes", "ProtectKernelModules=yes"):
        text = text.replace(f"\n{directive}\n", "\n")
    weak.write_text(text, encoding="utf-8")
    rc, level, _ = _exposure(weak)
    assert level > SECURITY_THRESHOLD / 10 and rc != 0


@pytest.mark.parametrize(
    "directive",
    ["Type=notify", "NotifyAccess=main", "WatchdogSec=", "Restart=on-failure", "DynamicUser=yes",
     "StateDirectory=driftd", "ProtectSystem=strict", "ExecReload=/bin/kill -HUP $MAINPID",
     "EnvironmentFile=-/etc/driftd/driftd.env"],
)
def test_unit_declares(directive: str) -> None:
    lines = UNIT.read_text(encoding="utf-8").splitlines()
    assert any(line.startswith(directive) for line in lines)


def test_gpu_drop_in_opens_nvidia_devices_only() -> None:
    text = (SYSTEMD / "gpu.conf.example").read_text(encoding="utf-8")
    allowed = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("DeviceAllow=")]
    assert allowed and all("nvidia" in a for a in allowed)
    assert "SupplementaryGroups=video" in text


def test_example_config_parses_and_reads_the_token_from_the_environment() -> None:
    from monitor.config import load_config

    config = load_config(SYSTEMD / "driftd.yaml")
    assert config.service.http.token_env == "DRIFTD_TOKEN"
    assert str(config.monitor.state_dir).startswith("/var/lib/driftd/")
    assert "DRIFTD_TOKEN=" in (SYSTEMD / "driftd.env.example").read_text(encoding="utf-8")
