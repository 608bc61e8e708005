"""The configuration is typed end to end: mypy (pyproject.toml's [tool.mypy]: strict, and no
expression typed Any in the section owners) passes on the config modules, and what a caller reads
of a config has its owner's type, never Any.

Types are checked by mypy's ``assert_type`` on a small program written to tmp_path: mypy reports
an ``Any`` that stands where a type is asserted (shown by the control line in the program), so a
section or accessor falling back to Any fails here, naming the line.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy is not installed: pip install -e '.[test]' brings it")

REPO = Path(__file__).resolve().parents[1]
CONFIG_MODULES = sorted(
    str(p.relative_to(REPO))
    for p in [REPO / "monitor" / "configutil.py", REPO / "monitor" / "config.py", REPO / "retrain" / "config.py",
              *(REPO / "monitor").glob("*/config.py")]
)


@pytest.fixture
def mypy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run mypy with the project's settings from the repository root (the packages' import root);
    returns (exit status, output lines). Its cache goes to tmp_path, not the checkout."""
    monkeypatch.chdir(REPO)

    def run(*args: str) -> tuple[int, list[str]]:
        out, err, status = mypy_api.run(["--config-file", str(REPO / "pyproject.toml"),
                                         "--cache-dir", str(tmp_path / "mypy-cache"), *args])
        return status, [line for line in (out + err).splitlines() if line.strip()]

    return run


def test_the_config_modules_pass_mypy_strict(mypy) -> None:
    assert len(CONFIG_MODULES) >= 8, CONFIG_MODULES  # configutil, config, retrain's and every section owner's
    status, lines = mypy(*CONFIG_MODULES)
    assert status == 0, "\n".join(lines)
    assert lines[-1].startswith(f"Success: no issues found in {len(CONFIG_MODULES)} source files")


PROGRAM = '''
from pathlib import Path
from typing import Any, assert_type

from monitor.config import Config, load_config, parse_config
from monitor.configutil import Section, parse_section
from monitor.engine.config import MonitorConfig, WindowConfig
from monitor.ingest.config import IngestConfig, LogsConfig
from monitor.policy.config import PolicyConfig
from monitor.policy.rules import Rule
from monitor.service.config import HttpConfig, SchedulerConfig, ServiceConfig
from monitor.signals.config import MmdConfig, SignalsConfig
from retrain.config import GateConfig, HyperConfig, JobSettings, KubernetesConfig, RetrainConfig, load_retrain

config = load_config("driftd.yaml")
assert_type(config, Config)
assert_type(parse_config({}, source="x", base=Path(".")), Config)
assert_type(config.monitor, MonitorConfig)
assert_type(config.service, ServiceConfig)
assert_type(config.policy, PolicyConfig)
assert_type(config.retrain, RetrainConfig)
assert_type(config.monitor.logs, LogsConfig)
assert_type(config.monitor.ingest, IngestConfig)
assert_type(config.monitor.window, WindowConfig)
assert_type(config.monitor.signals, SignalsConfig)
assert_type(config.monitor.signals.mmd, MmdConfig)
assert_type(config.monitor.signals.mmd.permutations, int)
assert_type(config.monitor.logs.labels, str | None)
assert_type(config.monitor.state_dir, Path)
assert_type(config.service.http, HttpConfig)
assert_type(config.service.http.port, int)
assert_type(config.service.http.token_file, Path | None)
assert_type(config.service.scheduler, SchedulerConfig)
assert_type(config.service.scheduler.interval_seconds, float)
assert_type(config.policy.rules, tuple[Rule, ...])
assert_type(config.policy.rules[0].threshold, float | None)
assert_type(config.retrain.gate, GateConfig)
assert_type(config.retrain.hyper, HyperConfig)
assert_type(config.retrain.hyper.lr_backbone, float | None)
assert_type(config.retrain.kubernetes, KubernetesConfig)
assert_type(config.retrain.on_promote.command, tuple[str, ...])
assert_type(load_retrain("driftd.yaml"), RetrainConfig)
settings: JobSettings = config  # what a retrain reads of the file: the whole Config is one
assert_type(settings.retrain, RetrainConfig)
assert_type(settings.monitor, MonitorConfig)

section = Section({}, "", [])
assert_type(section.str("a"), str)
assert_type(section.str("a", "d"), str)
assert_type(section.str("a", None), str | None)
assert_type(section.int("a"), int)
assert_type(section.int("a", 1, minimum=0), int)
assert_type(section.int("a", None), int | None)
assert_type(section.float("a"), float)
assert_type(section.float("a", None, minimum=0.0), float | None)
assert_type(section.bool("a", True), bool)
assert_type(section.choice("a", ("x", "y")), str)
assert_type(section.choice("a", ("x", "y"), None), str | None)
assert_type(section.str_list("a"), tuple[str, ...])
assert_type(section.section("a"), Section)
assert_type(section.sections("a"), list[Section])
assert_type(parse_section(section, HttpConfig), HttpConfig)

def control(value: Any) -> None:
    assert_type(value, int)  # CONTROL: an Any must be reported, or the lines above prove nothing
'''


def test_what_a_config_gives_its_reader_is_typed_never_any(mypy, tmp_path: Path) -> None:
    program = tmp_path / "reads_config.py"
    program.write_text(textwrap.dedent(PROGRAM), encoding="utf-8")
    control_line = next(i for i, line in enumerate(program.read_text().splitlines(), 1) if "# CONTROL" in line)
    status, lines = mypy(str(program))
    errors = [line for line in lines if re.match(rf"{re.escape(str(program))}:\d+: error", line)]
    expected = f'{program}:{control_line}: error: Expression is of type "Any", not "int"  [assert-type]'
    assert expected in errors, "the control line was not reported: mypy no longer flags Any\n" + "\n".join(lines)
    unexpected = [line for line in errors if line != expected]
    assert not unexpected, "a config value is not the type its reader expects (or is Any):\n" + "\n".join(unexpected)
    assert status == 1 and len(errors) == 1, "\n".join(lines)
