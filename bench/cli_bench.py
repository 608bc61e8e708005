"""Benchmark: how long each `driftd` command takes, as a ratio to `python -c pass`.

    .venv/bin/python bench/cli_bench.py [--repeats 7]

Builds a small world in a temporary directory (a config, a reference, a registry with two
versions) and starts a real daemon (`driftd run`) for `status` and `retrain`. Each command then
runs ``--repeats`` times as ``python -m monitor ...`` in a fresh process, interleaved with the
baseline ``python -c pass`` so both see the same load; the headline is the median of each as a
ratio to the baseline's median, beside the absolute time against the 1 s target (2 cores).
``python -c "import torch"`` is measured the same way to show what a command would pay if it
imported torch. `retrain` runs last: each request queues a real job on the daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_SECONDS = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_world(tmp: Path) -> Path:
    """Config, reference, logs directory and a registry with v1 and v2 (v2 CURRENT)."""
    import timm

    from monitor.engine.reference import build_reference, save_reference
    from retrain.registry import ModelMeta, Registry

    rng = np.random.default_rng(0)
    features = rng.normal(size=(1000, 16)).astype(np.float32)
    logits = rng.normal(size=(1000, 3))
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    save_reference(build_reference(model_version="v1", features=features, probs=probs,
                                   labels=probs.argmax(1), projection_dims=8), tmp / "reference")
    (tmp / "logs").mkdir()
    registry = Registry(tmp / "registry")
    meta = ModelMeta(architecture="test_resnet", num_classes=3, data_config={"input_size": [3, 32, 32]})
    for _ in range(2):
        registry.promote(registry.add(timm.create_model("test_resnet", num_classes=3), meta))
    config = tmp / "driftd.yaml"
    config.write_text(yaml.safe_dump({
        "logs": {"inference": "logs"}, "reference_dir": "reference", "state_dir": "state",
        "http": {"port": _free_port()}, "scheduler": {"interval_seconds": 3600},
        "retrain": {"registry_dir": "registry"},
    }))
    return config


def start_daemon(config: Path, env: dict[str, str]) -> subprocess.Popen:
    port = yaml.safe_load(config.read_text())["http"]["port"]
    log = open(config.with_suffix(".log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--config", str(config)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=config.parent)
    while True:  # wait on the daemon's own readiness, however long a busy machine takes
        if proc.poll() is not None:
            raise SystemExit(f"driftd run exited with {proc.returncode}: {config.with_suffix('.log').read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
                if answer.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)


def timed(argv: list[str], cwd: Path, env: dict[str, str], expect: int) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != expect:
        raise SystemExit(f"{' '.join(argv)}: exit {done.returncode}, expected {expect}\n{done.stdout}\n{done.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="driftd-cli-bench-") as name:
        tmp = Path(name)
        config = build_world(tmp)
        daemon = start_daemon(config, env)
        cfg = ["--config", str(config)]
        commands = [
            ("--help", ["--help"], 0),
            ("usage error", ["bogus"], 2),
            ("config validate", ["config", "validate", *cfg], 0),
            ("status (live daemon)", ["status", *cfg], 0),
            ("models list", ["models", "list", *cfg], 0),
            ("models show v1", ["models", "show", "v1", *cfg], 0),
            ("models rollback", ["models", "rollback", *cfg], 0),      # v2 -> v1 ...
            ("models promote v2", ["models", "promote", "v2", *cfg], 0),  # ... and back, every round
            ("retrain (live daemon)", ["retrain", *cfg, "--reason", "bench"], 0),
        ]
        try:
            base: list[float] = []
            torch_import: list[float] = []
            times: dict[str, list[float]] = {label: [] for label, _, _ in commands}
            for _ in range(args.repeats):
                for label, argv, code in commands:
                    if label.startswith("retrain"):
                        continue
                    base.append(timed([py, "-c", "pass"], tmp, env, 0))
                    times[label].append(timed([py, "-m", "monitor", *argv], tmp, env, code))
                base.append(timed([py, "-c", "pass"], tmp, env, 0))
                torch_import.append(timed([py, "-c", "import torch"], tmp, env, 0))
            label, argv, code = commands[-1]
            for _ in range(min(3, args.repeats)):  # last: each request queues a real job on the daemon
                base.append(timed([py, "-c", "pass"], tmp, env, 0))
                times[label].append(timed([py, "-m", "monitor", *argv], tmp, env, code))
        finally:
            daemon.terminate()
            daemon.wait()
    b = statistics.median(base)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    print(f"baseline `python -c pass`: median {b * 1000:.0f} ms over {len(base)} runs; load average {' '.join(load)}")
    print(f"{'command':24s} {'median':>9s} {'x pass':>8s}  < {TARGET_SECONDS:g} s")
    for label, values in [*times.items(), ('python -c "import torch"', torch_import)]:
        m = statistics.median(values)
        print(f"{label:24s} {m * 1000:7.0f} ms {m / b:7.1f}x  {'yes' if m < TARGET_SECONDS else 'NO'}")
    print(json.dumps({"baseline_s": b, "median_s": {k: statistics.median(v) for k, v in times.items()},
                      "import_torch_s": statistics.median(torch_import)}))


if __name__ == "__main__":
    main()
