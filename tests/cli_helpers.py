"""Running the real `driftd` command in a subprocess and recording which heavy libraries it imported.

``audited_driftd(bin_dir, audit_file)`` writes an executable ``driftd`` that runs
``python -m monitor`` exactly (runpy) and, at exit, appends ``{"argv", "heavy"}`` to
``audit_file``: the names among HEAVY found in ``sys.modules``. Put ``bin_dir`` first on PATH
and every `driftd ...` line (the README's included) is checked by what it imported, not by
how long it took, which would fail on a busy machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "scipy", "timm", "torchvision")

_SHIM = """#!{python}
import atexit, json, os, runpy, sys

def _audit():
    heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))
    with open({audit!r}, "a") as f:
        f.write(json.dumps({{"argv": sys.argv[1:], "heavy": heavy}}) + "\\n")

atexit.register(_audit)
sys.argv[0] = "driftd"
runpy.run_module("monitor", run_name="__main__", alter_sys=True)
"""


def audited_driftd(bin_dir: Path, audit_file: Path) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "driftd"
    shim.write_text(_SHIM.format(python=sys.executable, heavy=HEAVY, audit=str(audit_file)))
    shim.chmod(0o755)
    return shim


def audit_records(audit_file: Path) -> list[dict]:
    if not audit_file.exists():
        return []
    return [json.loads(line) for line in audit_file.read_text().splitlines() if line.strip()]


def cli_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    """The environment for subprocesses: the shim first on PATH, this checkout importable."""
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep), **extra}


def run_driftd(shim: Path, *args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(shim), *args], cwd=cwd, env=env, capture_output=True, text=True)
