"""The demo scenario, end to end: train, deploy, drift, detect, retrain, promote, recover.

Everything is real: a timm model trained on scikit-learn's handwritten digits, Parquet logs
written through the producer helper, the daemon (`driftd run`) as a subprocess on the embedded
default, its retraining job, its HTTP API. Only the traffic is scripted: clean inputs first,
then a real corruption from a known tick, so the timeline can say how fast each step reacted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from monitor.errors import DriftdError

ARCHITECTURE = "test_resnet"   # timm's tiny ResNet: trains in seconds on 2 CPU cores at 32 px
IMAGE_SIZE = 32


@dataclass(frozen=True)
class DemoSettings:
    workdir: Path
    seed: int = 0
    serve: bool = False
    port: int | None = None
    source_epochs: int = 10
    rows_per_tick: int = 40
    tick_seconds: float = 0.4
    clean_ticks: int = 20
    max_ticks: int = 400
    after_promotion_ticks: int = 15
    label_delay_ticks: int = 3
    corruption: str = "noise"
    severity: float = 0.6
    window_rows: int = 120
    retrain_epochs_head: int = 6
    retrain_epochs_finetune: int = 6
    max_seconds: float = 300.0         # of traffic, after the source model is trained


@dataclass
class Timeline:
    """Wall-clock times (epoch seconds) and row counts of each event; None when it did not happen."""

    started: float = 0.0
    onset_time: float | None = None
    onset_row: int | None = None
    first_alarm_time: float | None = None
    first_alarm_row: int | None = None
    first_alarm_rule: str | None = None
    retrain_requested_time: float | None = None
    retrain_reason: str | None = None
    retrain_started_time: float | None = None
    retrain_finished_time: float | None = None
    retrain_outcome: str | None = None
    gate: dict[str, Any] = field(default_factory=dict)
    promoted_version: str | None = None
    switch_time: float | None = None
    switch_row: int | None = None
    finished: float = 0.0


@dataclass
class DemoResult:
    timeline: Timeline
    start_version: str
    final_version: str
    shifted_accuracy: dict[str, float]   # version -> accuracy on held-out shifted images
    clean_accuracy: dict[str, float]     # version -> accuracy on held-out clean images
    served: list[dict[str, Any]]         # per tick: time, rows, version, batch accuracy, shifted
    windows: list[dict[str, Any]]        # every window's signals (replayed from the logs)
    live: list[dict[str, Any]]           # what the daemon's status showed at each tick
    report_dir: Path
    config_path: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _split(n: int, seed: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return {"train": order[:900], "reference": order[900:1300], "production": order[1300:1650], "holdout": order[1650:]}


def write_config(s: DemoSettings, port: int) -> Path:
    doc = {
        "model": "digits-demo",
        "logs": {"inference": "logs/inference", "labels": "logs/labels"},
        "state_dir": "state",
        "reference_dir": "reference",
        "ingest": {"settle_seconds": 2.0},
        "window": {"rows": s.window_rows, "seconds": 3600.0, "min_rows": 30},
        "signals": {
            "mmd": {"permutations": 100, "max_window_rows": s.window_rows, "max_reference_rows": 400,
                    "projection_dims": 16},
            "online_mmd": {"window_rows": 20, "stride_rows": 5, "ert_rows": 5000.0, "bootstraps": 1500,
                           "max_reference_rows": 400},
            "accuracy": {"last_n": 200, "last_seconds": 600.0},
        },
        "http": {"host": "127.0.0.1", "port": port, "token_env": "DRIFTD_DEMO_TOKEN"},
        "scheduler": {"interval_seconds": 1.0, "shutdown_grace_seconds": 20.0, "retrain_poll_seconds": 1.0},
        "policy": {
            "cooldown_seconds": 3600.0,
            "rules": [
                {"name": "online_mmd_alarm", "signal": "online_mmd_alarm", "op": "above", "threshold": 0.5,
                 "consecutive": 1, "action": "alert"},
                {"name": "mmd_p_value", "signal": "mmd_p_value", "op": "below", "threshold": 0.01,
                 "consecutive": 2, "action": "alert"},
                {"name": "accuracy_drop", "signal": "accuracy", "op": "below", "drop_from_reference": 0.15,
                 "min_rows": 100, "consecutive": 1, "action": "retrain"},
                {"name": "estimated_accuracy_drop", "signal": "estimated_accuracy", "op": "below",
                 "drop_from_reference": 0.15, "consecutive": 2, "action": "retrain"},
            ],
        },
        "retrain": {
            "registry_dir": "registry",
            "input_root": "inputs",
            "replay_logs": "replay",
            "min_labelled_rows": 200,
            "max_rows": 1500,
            "gate": {"min_gain": 0.02, "max_forgetting": 0.02},
            "hyper": {"epochs_head": s.retrain_epochs_head, "epochs_finetune": s.retrain_epochs_finetune,
                      "seed": s.seed},
            "device": "auto",
        },
    }
    path = s.workdir / "driftd.yaml"
    path.write_text("# written by `driftd demo`; a complete, valid driftd config\n" + yaml.safe_dump(doc, sort_keys=False))
    return path


def _get(url: str) -> tuple[int, Any]:
    """GET a read-only endpoint: (status, parsed JSON or text); (0, None) while nothing listens."""
    req = urllib.request.Request(url)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = resp.read()
            return resp.status, json.loads(body) if body[:1] in (b"{", b"[") else body.decode()
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, None  # not listening (yet)


def _prepare(s: DemoSettings, say: Callable[[str], None]) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from monitor.ingest.writer import LogWriter
    from monitor.reference import build_reference, save_reference
    from retrain.digits import load_digits_images, train_digits_model, write_images
    from retrain.model import images_to_tensor, predict
    from retrain.registry import Registry, import_safetensors

    torch.manual_seed(s.seed)
    images, labels = load_digits_images(IMAGE_SIZE)
    split = _split(len(images), s.seed)
    say(f"training the source model ({ARCHITECTURE}, {len(split['train'])} clean digits, {s.source_epochs} epochs)")
    model, data_config = train_digits_model(images[split["train"]], labels[split["train"]], architecture=ARCHITECTURE,
                                            epochs=s.source_epochs, seed=s.seed)
    weights = s.workdir / "source-model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    registry = Registry(s.workdir / "registry")
    version = import_safetensors(registry, ARCHITECTURE, 10, weights, input_size=IMAGE_SIZE)
    say(f"registered the source model as {version} (CURRENT)")

    ref_idx = split["reference"]
    x = images_to_tensor(images[ref_idx], data_config)
    feats, probs = predict(model, x)
    ref = build_reference(model_version=version, features=feats, probs=probs, labels=labels[ref_idx],
                          projection="pca", projection_dims=16, seed=s.seed, source="demo validation set")
    save_reference(ref, s.workdir / "reference")
    say(f"built the reference for {version}: {len(ref_idx)} labelled validation images, accuracy {ref.accuracy:.3f}")
    ids = [f"ref-{i:05d}" for i in ref_idx]
    uris = write_images(s.workdir / "inputs", images[ref_idx], ids)
    with LogWriter(s.workdir / "replay", roll_rows=10**9) as replay:
        replay.write_batch(request_id=ids, timestamp=time.time(), model_version=version, features=feats, probs=probs,
                           input_uri=uris, label=labels[ref_idx])
    return {"images": images, "labels": labels, "split": split, "registry": registry, "start_version": version,
            "data_config": data_config}


def _evaluate(registry: Any, versions: list[str], images: np.ndarray, labels: np.ndarray, s: DemoSettings
              ) -> tuple[dict[str, float], dict[str, float]]:
    from retrain.digits import corrupt
    from retrain.model import images_to_tensor, predict

    shifted_images = corrupt(images, s.corruption, s.severity, seed=s.seed + 999)
    shifted, clean = {}, {}
    for v in dict.fromkeys(versions):
        model, mv = registry.load_model(v)
        for target, imgs in ((shifted, shifted_images), (clean, images)):
            _, probs = predict(model, images_to_tensor(imgs, dict(mv.meta.data_config)))
            target[v] = float((probs.argmax(1) == labels).mean())
    return shifted, clean


def _replay_windows(config_path: Path, state: Path) -> list[dict[str, Any]]:
    """Every window of the run, recomputed from the logs with the same config and references."""
    from dataclasses import replace

    from monitor.config import load_config
    from monitor.engine import Engine
    from monitor.signals.results import to_jsonable

    config = load_config(config_path)
    engine = Engine(replace(config.monitor, state_dir=state))
    try:
        return [to_jsonable(w) for w in engine.catch_up()]
    finally:
        engine.close()


def run_demo(s: DemoSettings, say: Callable[[str], None]) -> DemoResult:
    from monitor.demo.service import InferenceService

    s.workdir.mkdir(parents=True, exist_ok=True)
    if any(s.workdir.iterdir()):
        raise DriftdError(f"{s.workdir} is not empty: pass --workdir with a new directory, or delete it")
    timeline = Timeline(started=time.time())
    prep = _prepare(s, say)
    port = s.port or _free_port()
    config_path = write_config(s, port)
    token = f"demo-{os.getpid()}-{s.seed}"
    env = {**os.environ, "DRIFTD_DEMO_TOKEN": token}
    log_file = open(s.workdir / "daemon.log", "w")
    daemon = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--config", str(config_path)],
                              stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    service = InferenceService(
        registry=prep["registry"], images=prep["images"][prep["split"]["production"]],
        labels=prep["labels"][prep["split"]["production"]], logs=s.workdir / "logs" / "inference",
        label_logs=s.workdir / "logs" / "labels", inputs=s.workdir / "inputs",
        label_delay_ticks=s.label_delay_ticks, corruption=s.corruption, severity=s.severity, seed=s.seed,
    )
    served: list[dict[str, Any]] = []
    live: list[dict[str, Any]] = []
    try:
        say(f"started the daemon: driftd run --config {config_path} (http {base}, log {s.workdir / 'daemon.log'})")
        deadline = time.time() + 60
        while _get(f"{base}/readyz")[0] != 200:
            if daemon.poll() is not None or time.time() > deadline:
                raise DriftdError(f"the daemon did not become ready; see {s.workdir / 'daemon.log'}")
            time.sleep(0.3)
        service.refresh_model()
        say(f"serving {s.rows_per_tick} requests per tick; clean traffic for {s.clean_ticks} ticks, then "
            f"'{s.corruption}' corruption (severity {s.severity})")
        promoted_at_tick: int | None = None
        end = time.time() + s.max_seconds
        for tick in range(s.max_ticks):
            t0 = time.time()
            if service.refresh_model():
                timeline.switch_time, timeline.switch_row = time.time(), service.rows
                say(f"the service now serves {service.version} (row {service.rows})")
            shifted = tick >= s.clean_ticks
            if shifted and timeline.onset_time is None:
                timeline.onset_time, timeline.onset_row = time.time(), service.rows
                say(f"onset: inputs now corrupted with '{s.corruption}' (row {service.rows})")
            out = service.serve(s.rows_per_tick, shifted=shifted)
            served.append({"time": time.time(), "rows": service.rows, **asdict(out)})
            live += _observe(base, timeline, service.rows, say)
            if timeline.promoted_version and promoted_at_tick is None and service.version == timeline.promoted_version:
                promoted_at_tick = tick
            if promoted_at_tick is not None and tick - promoted_at_tick >= s.after_promotion_ticks:
                break
            if timeline.retrain_outcome in ("rejected", "failed") or time.time() > end:
                break
            time.sleep(max(0.0, s.tick_seconds - (time.time() - t0)))
        service.close()
        time.sleep(2.5)  # let the daemon ingest the last files before it stops
        live += _observe(base, timeline, service.rows, say)
        if s.serve:
            say(f"--serve: driftd keeps running at {base} (/metrics, /api/v1/status; control token {token}); "
                "Ctrl-C to stop")
            try:
                daemon.wait()
            except KeyboardInterrupt:
                pass
    finally:
        service.close()  # idempotent: flushes buffered rows and pending labels even on an error
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        log_file.close()
    timeline.finished = time.time()
    say("replaying the logs to chart every window")
    windows = _replay_windows(config_path, s.workdir / "report-state")
    versions = [prep["start_version"]] + ([timeline.promoted_version] if timeline.promoted_version else [])
    holdout = prep["split"]["holdout"]
    shifted_acc, clean_acc = _evaluate(prep["registry"], versions, prep["images"][holdout], prep["labels"][holdout], s)
    return DemoResult(
        timeline=timeline, start_version=prep["start_version"], final_version=service.version or "",
        shifted_accuracy=shifted_acc, clean_accuracy=clean_acc, served=served, windows=windows, live=live,
        report_dir=s.workdir / "report", config_path=config_path,
    )


def _observe(base: str, t: Timeline, rows: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Read the daemon's status, note the first time each event is visible, and return the
    accuracy it shows per model_version (measured on labels so far, and estimated)."""
    code, status = _get(f"{base}/api/v1/status")
    if code != 200 or not isinstance(status, dict):
        return []
    now = time.time()
    seen = []
    for version, view in (status.get("versions") or {}).items():
        window = view.get("window") or {}
        accuracy = (window.get("accuracy") or {}).get("accuracy_last_n")
        estimate = (window.get("estimate") or {}).get("estimated_accuracy")
        seen.append({"time": now, "model_version": version, "accuracy": accuracy, "estimated_accuracy": estimate})
    if t.onset_time is not None and t.first_alarm_time is None and status.get("alarms"):
        alarm = status["alarms"][0]
        t.first_alarm_time, t.first_alarm_row, t.first_alarm_rule = now, rows, alarm["rule"]
        say(f"first alarm: rule {alarm['rule']} on {alarm['model_version']} "
            f"(value {alarm['value']:.4g} vs threshold {alarm['threshold']:.4g}), "
            f"{rows - (t.onset_row or 0)} rows and {now - t.onset_time:.1f} s after the onset")
    retrain = status.get("retrain") or {}
    jobs = list(retrain.get("queued") or []) + [retrain.get("running"), retrain.get("last")]
    for job in (j for j in jobs if j):
        if t.retrain_requested_time is None:
            t.retrain_requested_time, t.retrain_reason = job["requested_at"], job["reason"]
            say(f"retrain requested: {job['reason']}")
        if job.get("started_at") and t.retrain_started_time is None:
            t.retrain_started_time = job["started_at"]
            say("retrain job started (head first, then guarded fine-tuning)")
    last = retrain.get("last")
    if last and last.get("result") and t.retrain_outcome is None:
        result = last["result"]
        t.retrain_outcome = result.get("outcome")
        t.retrain_finished_time = result.get("finished_at") or now
        t.gate = result.get("gate") or {}
        if t.retrain_outcome == "promoted":
            t.promoted_version = result.get("candidate_version")
        say(f"retrain finished: {t.retrain_outcome} ({result.get('reason', '')})")
    return seen
