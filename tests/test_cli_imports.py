"""Commands that need no model import neither torch nor scipy, so they answer at once.

Checked by what each command imported (sys.modules at exit, in a subprocess running the real
`driftd`), never by timing: bench/cli_bench.py measures the time. The producer side is checked
the same way: the writers work with numpy and pyarrow alone.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli_helpers import HEAVY, REPO, audit_records, audited_driftd, cli_env, run_driftd


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A config and a registry with two versions (made here, in the test process, with torch)."""
    import timm
    import torch

    from retrain.model_import import import_safetensors
    from retrain.registry import Registry

    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "logs").mkdir()
    (tmp / "driftd.yaml").write_text(yaml.safe_dump({
        "logs": {"inference": "logs"}, "retrain": {"registry_dir": "registry"}, "http": {"port": 1}}))
    weights = tmp / "w.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), weights)
    registry = Registry(tmp / "registry")
    for _ in range(2):
        import_safetensors(registry, "test_resnet", 3, weights, input_size=32)
    audit = tmp / "audit.jsonl"
    shim = audited_driftd(tmp / "bin", audit)
    return {"tmp": tmp, "shim": shim, "audit": audit, "env": cli_env(tmp / "bin")}


LIGHT = [
    (["--help"], 0),
    (["models", "--help"], 0),
    (["models", "import", "--help"], 0),
    (["reference", "build", "--help"], 0),
    (["bogus"], 2),
    (["check", "--window-rows", "x"], 2),
    (["config", "validate", "--config", "driftd.yaml"], 0),
    (["config", "validate", "--signals"], 0),
    (["models", "list", "--config", "driftd.yaml"], 0),
    (["models", "show", "v1", "--config", "driftd.yaml"], 0),
    (["models", "promote", "v1", "--config", "driftd.yaml"], 0),
    (["models", "rollback", "--config", "driftd.yaml"], 0),
    # No daemon listens on port 1: the client side runs in full up to the request.
    (["status", "--config", "driftd.yaml"], 1),
    (["retrain", "--config", "driftd.yaml", "--reason", "x"], 1),
    (["reference", "build", "--logs", "nowhere", "--out", "ref"], 2),
    (["models", "import", "--registry", "registry", "--arch", "x", "--num-classes", "0", "--checkpoint", "w.pth"], 2),
]


@pytest.mark.parametrize("argv, code", LIGHT, ids=[" ".join(a) for a, _ in LIGHT])
def test_commands_without_a_model_import_no_torch_or_scipy(world: dict, argv: list[str], code: int) -> None:
    before = len(audit_records(world["audit"]))
    done = run_driftd(world["shim"], *argv, cwd=world["tmp"], env=world["env"])
    assert done.returncode == code, done.stderr
    (record,) = audit_records(world["audit"])[before:]
    assert record["argv"] == argv
    assert record["heavy"] == [], f"`driftd {' '.join(argv)}` imported {record['heavy']}"


def test_the_audit_sees_heavy_imports(world: dict) -> None:
    """The check above can fail: a command that loads a model is seen importing torch."""
    before = len(audit_records(world["audit"]))
    done = run_driftd(world["shim"], "reference", "build", "--logs", "logs", "--out", "ref",
                      cwd=world["tmp"], env=world["env"])
    assert done.returncode == 1 and "no valid rows" in done.stderr
    (record,) = audit_records(world["audit"])[before:]
    assert "torch" in record["heavy"]


def test_reference_help_default_matches_the_builder() -> None:
    from monitor.cli.reference import DEFAULT_MAX_ROWS
    from monitor.engine.reference import DEFAULT_MAX_ROWS as BUILDER_DEFAULT

    assert DEFAULT_MAX_ROWS == BUILDER_DEFAULT


_BLOCK = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY + ("apscheduler", "prometheus_client", "yaml", "sqlalchemy")!r}:
            raise ImportError(f"{{name}} is not installed for a producer")
sys.meta_path.insert(0, Block())
"""


def test_a_producer_needs_only_numpy_and_pyarrow(tmp_path: Path) -> None:
    """`from monitor import LogWriter, LabelWriter` with torch, timm, scipy, APScheduler, YAML and
    prometheus-client made unimportable, as after `pip install --no-deps driftd numpy pyarrow`."""
    code = _BLOCK + f"""
import time, numpy as np, monitor
from monitor import LabelWriter, LogWriter
assert monitor.__version__ and set(monitor.__all__) == {{"LabelWriter", "LogWriter", "__version__"}}
with LogWriter({str(tmp_path / 'inference')!r}) as log:
    log.write_batch(["a", "b"], time.time(), "v1", np.ones((2, 4), np.float32), probs=[[0.5, 0.5], [1.0, 0.0]])
with LabelWriter({str(tmp_path / 'labels')!r}) as labels:
    labels.write_batch(["a", "b"], [0, 1], time.time())
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "inference").glob("*.parquet"))) == 1
    assert len(list((tmp_path / "labels").glob("*.parquet"))) == 1


def test_version_matches_the_package_metadata() -> None:
    import tomllib

    import monitor

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "monitor.__version__"}
    assert monitor.__version__.count(".") == 2
