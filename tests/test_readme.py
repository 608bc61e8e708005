"""The README's promises: its config reference is complete and valid, its commands match CI."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from monitor.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _config_example() -> dict:
    (block,) = [b for b in _code_blocks("yaml") if b.startswith("model:")]
    return yaml.safe_load(block)


def _leaf_keys(obj: object, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            keys |= _leaf_keys(value, path + ".")
        else:
            keys.add(path)
    return keys


def _doc_keys(doc: object, prefix: str = "") -> set[str]:
    if not isinstance(doc, dict):
        return {prefix.rstrip(".")}
    keys: set[str] = set()
    for k, v in doc.items():
        keys |= _doc_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}"}
    return keys


def test_config_reference_parses_and_matches_the_defaults(tmp_path: Path):
    doc = _config_example()
    cfg = parse_config(doc, source="README", base=tmp_path)
    defaults = parse_config({"logs": {"inference": "./logs/inference", "labels": "./logs/labels"}}, source="d",
                            base=tmp_path)
    # The example documents the defaults: parsing it gives the same objects as parsing nothing.
    assert dataclasses.replace(cfg.monitor) == defaults.monitor
    assert cfg.service == defaults.service
    assert cfg.retrain == defaults.retrain


def test_config_reference_documents_every_key():
    doc_keys = _doc_keys(_config_example())
    cfg = parse_config(_config_example(), source="README", base=ROOT)
    code_keys = set()
    for section, prefix in ((cfg.monitor, ""), (cfg.service, ""), (cfg.retrain, "retrain.")):
        code_keys |= {prefix + k for k in _leaf_keys(section)}
    # MonitorConfig.logs is a dataclass; paths were renamed only in the file for readability.
    missing = {k for k in code_keys if not any(d == k or d.startswith(k + ".") for d in doc_keys)}
    assert not missing, f"README config reference lacks: {sorted(missing)}"


def test_ci_runs_the_readme_test_command():
    (test_cmd,) = [line for b in _code_blocks("bash") for line in b.splitlines() if "pytest" in line]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.strip() in ci
    (install,) = [line for b in _code_blocks("bash") for line in b.splitlines() if "pip install" in line]
    assert "pip install -q -e '.[test]'" in ci and "pip install -e '.[test]'" in install


def test_every_exported_metric_is_documented():
    source = (ROOT / "monitor" / "service" / "metrics.py").read_text()
    names = set(re.findall(r'"(driftd_[a-z0-9_]+)"', source))
    assert len(names) > 30
    documented = set(re.findall(r"`(driftd_[a-z0-9_]+)`", README))
    # Counters are exported without `_total` in the source (prometheus-client adds it).
    missing = {n for n in names if n not in documented and f"{n}_total" not in documented}
    assert not missing, f"README metrics table lacks: {sorted(missing)}"
