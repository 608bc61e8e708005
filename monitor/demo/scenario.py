"""The demo scenario, end to end: train, deploy, drift, detect, retrain, promote, recover.

Everything is real: a timm model trained on scikit-learn's handwritten digits, Parquet logs
written through the producer helper, the daemon (`driftd run`) as a subprocess on the embedded
default, its retraining job, its HTTP API. Only the traffic is scripted: clean inputs first,
then a real corruption from a known batch, so the timeline can say how fast each step reacted.

No step has a wall-clock budget of its own: the daemon gets as long as it needs to start, the
traffic goes on until the retrain has finished (and the promoted model has served a while), and
a slow host only makes the story slower. One generous limit on the traffic's duration catches a
run that cannot finish, and says so. Two things keep the story the same in rows on a busy host:
traffic waits while driftd is more than ``max_backlog_rows`` behind (a real service would not
wait; the demo does so that detection is measured in rows the monitor has seen), and it slows to
one batch per ``waiting_tick_seconds`` while a retrain runs, leaving the CPUs to training.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from monitor.demo.observer import DaemonObserver, get
from monitor.demo.timeline import DemoResult, Mark, Tick, Timeline
from monitor.errors import DriftdError

ARCHITECTURE = "test_resnet"   # timm's tiny ResNet: trains in seconds on 2 CPU cores at 32 px
IMAGE_SIZE = 32
HEARTBEAT_SECONDS = 15.0
DRAIN_STALL_SECONDS = 60.0


@dataclass(frozen=True)
class DemoSettings:
    workdir: Path
    seed: int = 0
    serve: bool = False
    port: int | None = None
    source_epochs: int = 10
    rows_per_tick: int = 40
    tick_seconds: float = 0.4
    waiting_tick_seconds: float = 1.0   # one batch per this while a retrain runs
    clean_ticks: int = 20
    after_ticks: int = 20               # batches served after the switch (or after a rejection)
    label_delay_ticks: int = 3
    corruption: str = "noise"
    severity: float = 0.6
    window_rows: int = 120
    mmd_permutations: int = 100
    retrain_epochs_head: int = 6
    retrain_epochs_finetune: int = 6
    min_gain: float = 0.02
    # A 3-point margin and a 5x L2-SP pull (the default is 0.01), not 2 points and the default:
    # the forgetting slice holds 318 source images at accuracy 0.994, where 2 points is shown only
    # with <= 2 images lost net of 1 gained. On one 640-row snapshot of this demo, 6 seeds each,
    # the default recipe lost 2-6 (3 of 6 promoted; the range test's rate, untripped at 0.012-0.020,
    # lost 4-6); at l2sp_weight 0.05 it lost 1-2 (6 of 6), production accuracy 0.68-0.74 instead of
    # 0.76-0.83. 0.03 lets a run lose up to 5 and still show the bound: `driftd demo` must
    # promote on every run, not on a coin flip.
    max_forgetting: float = 0.03
    l2sp_weight: float = 0.05
    max_backlog_rows: int = 600         # traffic waits while driftd has ingested fewer rows than served - this
    detect_within_rows: int = 6000      # shifted rows driftd may ingest without asking for a retrain
    time_limit_seconds: float = 1800.0  # of traffic, generous: a run this long cannot finish; it says so


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
            "mmd": {"permutations": s.mmd_permutations, "max_window_rows": s.window_rows, "max_reference_rows": 400,
                    "projection_dims": 16},
            # An expected 100,000 rows between false alarms: the demo serves ~2,000 rows, so a false
            # alarm on unchanged traffic (either version) happens in ~2% of runs, not the ~30% an ERT
            # of 5,000 gave. The shift still alarms within one window (statistic ~3x the threshold).
            "online_mmd": {"window_rows": 20, "stride_rows": 20, "ert_rows": 100000.0, "bootstraps": 6000,
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
                {"name": "mmd_p_value", "signal": "mmd_p_value", "op": "below", "threshold": 0.05,
                 "consecutive": 3, "action": "alert"},  # the default rule (bench/README.md: chosen by power)
                {"name": "accuracy_drop", "signal": "accuracy", "op": "below", "drop_from_reference": 0.15,
                 "min_rows": 100, "consecutive": 1, "action": "retrain"},
                {"name": "estimated_accuracy_drop", "signal": "estimated_accuracy", "op": "below",
                 "drop_from_reference": 0.15, "consecutive": 2, "action": "retrain"},
            ],
        },
        "retrain": {
            "registry_dir": "registry",
            "input_root": "inputs",
            # The source's training and validation images, labelled: 1,300 rows, so the gate's
            # forgetting slice holds ~325 of them and one image moves it by 0.3 points, not 1.1.
            "replay_logs": "replay",
            "min_labelled_rows": 200,
            "max_rows": 1500,
            "gate": {"min_gain": s.min_gain, "max_forgetting": s.max_forgetting},
            "hyper": {"epochs_head": s.retrain_epochs_head, "epochs_finetune": s.retrain_epochs_finetune,
                      "l2sp_weight": s.l2sp_weight, "seed": s.seed},
            "device": "auto",
        },
    }
    path = s.workdir / "driftd.yaml"
    path.write_text("# written by `driftd demo`; a complete, valid driftd config\n" + yaml.safe_dump(doc, sort_keys=False))
    return path


def _prepare(s: DemoSettings, say: Callable[[str], None]) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from monitor.ingest.writer import LogWriter
    from monitor.engine.reference import build_reference, save_reference
    from retrain.digits import load_digits_images, train_digits_model, write_images
    from retrain.model import images_to_tensor, predict
    from retrain.model_import import import_safetensors
    from retrain.registry import Registry

    torch.manual_seed(s.seed)
    images, labels = load_digits_images(IMAGE_SIZE)
    split = _split(len(images), s.seed)
    say(f"training the source model ({ARCHITECTURE}, {len(split['train'])} clean digits, {s.source_epochs} epochs)")
    choices = []

    def on_threads(choice: Any) -> None:
        choices.append(choice)
        say(f"  training with {choice.describe()}")

    started = time.time()
    model, data_config = train_digits_model(images[split["train"]], labels[split["train"]], architecture=ARCHITECTURE,
                                            epochs=s.source_epochs, seed=s.seed, on_threads=on_threads)
    seconds = time.time() - started
    torch.set_num_threads(choices[-1].threads)  # the service's inference runs beside driftd too
    say(f"  trained in {seconds:.1f} s")
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
    # The replay buffer: the labelled source data (training and validation images) the gate
    # checks forgetting on and the fine-tune mixes into every batch.
    replay_idx = np.concatenate([split["train"], ref_idx])
    ids = [f"src-{i:05d}" for i in replay_idx]
    uris = write_images(s.workdir / "inputs", images[replay_idx], ids)
    replay_feats, replay_probs = predict(model, images_to_tensor(images[replay_idx], data_config))
    with LogWriter(s.workdir / "replay", roll_rows=10**9) as replay:
        replay.write_batch(request_id=ids, timestamp=time.time(), model_version=version, features=replay_feats,
                           probs=replay_probs, input_uri=uris, label=labels[replay_idx])
    source = {"seconds": seconds, "epochs": s.source_epochs,
              "threads": [dataclasses.asdict(c) for c in choices]}
    return {"images": images, "labels": labels, "split": split, "registry": registry, "start_version": version,
            "data_config": data_config, "source_training": source}


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
    from monitor.config import load_config
    from monitor.engine.cycle import Engine
    from monitor.signals.results import to_json

    config = load_config(config_path)
    engine = Engine(dataclasses.replace(config.monitor, state_dir=state))
    try:
        return [to_json(w) for w in engine.catch_up()]
    finally:
        engine.close()


def _wait_ready(base: str, daemon: subprocess.Popen, s: DemoSettings, say: Callable[[str], None]) -> None:
    """Until /readyz answers 200: as long as the daemon lives, within the demo's time limit."""
    started = time.time()
    last_word = started
    while get(f"{base}/readyz")[0] != 200:
        now = time.time()
        if daemon.poll() is not None:
            raise DriftdError(f"the daemon exited with {daemon.returncode} before it was ready; "
                              f"see {s.workdir / 'daemon.log'}")
        if now - started > s.time_limit_seconds:
            raise DriftdError(f"the daemon was not ready after {s.time_limit_seconds:.0f} s (the demo's time limit); "
                              f"see {s.workdir / 'daemon.log'}")
        if now - last_word >= HEARTBEAT_SECONDS:
            say(f"  still waiting for the daemon to load its reference and scan the logs ({now - started:.0f} s)")
            last_word = now
        time.sleep(0.3)


def _stop(daemon: subprocess.Popen) -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def run_demo(s: DemoSettings, say: Callable[[str], None]) -> DemoResult:
    from monitor.demo.service import InferenceService

    s.workdir.mkdir(parents=True, exist_ok=True)
    if any(s.workdir.iterdir()):
        raise DriftdError(f"{s.workdir} is not empty: pass --workdir with a new directory, or delete it")
    timeline = Timeline(demo_started=time.time())
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
    ticks: list[Tick] = []

    def rows_at(when: float) -> int:
        """Rows served by ``when``: those of every batch stamped at or before it."""
        i = bisect.bisect_right([k.time for k in ticks], when)
        return ticks[i - 1].rows if i else 0

    observer = DaemonObserver(
        base, token, s.workdir / "state", timeline, say=say, rows_at=rows_at,
        max_epochs={"head": s.retrain_epochs_head, "finetune": s.retrain_epochs_finetune},
        gate_thresholds={"min_gain": s.min_gain, "max_forgetting": s.max_forgetting})
    try:
        say(f"started the daemon: driftd run --config {config_path} (http {base}, log {s.workdir / 'daemon.log'})")
        _wait_ready(base, daemon, s, say)
        service.refresh_model()
        say(f"serving {s.rows_per_tick} requests per batch, one every {s.tick_seconds:g} s: "
            f"{s.clean_ticks * s.rows_per_tick} clean rows, then '{s.corruption}' corruption (severity {s.severity})")
        _traffic(s, service, observer, timeline, ticks, daemon, say)
        timeline.traffic_finished = time.time()
        service.close()
        _drain(service, observer, daemon, s, say)
        if s.serve:
            say(f"--serve: driftd keeps running at {base} (/metrics, /api/v1/status; control token {token}); "
                "Ctrl-C to stop")
            try:
                daemon.wait()
            except KeyboardInterrupt:
                pass
    finally:
        service.close()  # idempotent: flushes buffered rows and pending labels even on an error
        _stop(daemon)
        log_file.close()
    say("replaying the logs to chart every window")
    windows = _replay_windows(config_path, s.workdir / "report-state")
    versions = [prep["start_version"]] + ([timeline.promoted_version] if timeline.promoted_version else [])
    holdout = prep["split"]["holdout"]
    shifted_acc, clean_acc = _evaluate(prep["registry"], versions, prep["images"][holdout], prep["labels"][holdout], s)
    timeline.finished = time.time()
    return DemoResult(
        timeline=timeline, start_version=prep["start_version"], final_version=service.version or "",
        shifted_accuracy=shifted_acc, clean_accuracy=clean_acc, ticks=ticks, windows=windows, live=observer.live,
        progress=observer.progress, rows_ingested=observer.rows_ingested, labels_written=service.labels_written,
        source_training=prep["source_training"], settings={k: str(v) if isinstance(v, Path) else v
                                                           for k, v in dataclasses.asdict(s).items()},
        report_dir=s.workdir / "report", config_path=config_path, workdir=s.workdir,
    )


def _traffic(s: DemoSettings, service: Any, observer: DaemonObserver, t: Timeline, ticks: list[Tick],
             daemon: subprocess.Popen, say: Callable[[str], None]) -> None:
    """Serve batches until the story is told (or cannot be): see the module docstring."""
    traffic_started = time.time()
    t.traffic_started = traffic_started
    after = 0               # batches served since the outcome (and, for a promotion, the switch)
    waiting_said = 0.0
    while True:
        started = time.time()
        if daemon.poll() is not None:
            raise DriftdError(f"the daemon exited with {daemon.returncode} during the demo; see {s.workdir / 'daemon.log'}")
        observer.poll(service.rows)
        if service.refresh_model():
            t.switch = Mark(time.time(), service.rows)
            say(f"the service picked up {service.version} from the registry and serves it from row {service.rows}")
        elapsed = time.time() - traffic_started
        if elapsed > s.time_limit_seconds:
            t.time_limit_hit = True
            t.stop_reason = (f"time limit: {s.time_limit_seconds:.0f} s of traffic passed and "
                             + ("no retrain was requested" if t.retrain_requested is None else
                                "the retrain had not finished" if t.retrain_outcome is None else
                                "the promoted model was not picked up yet"))
            say(f"stopping: {t.stop_reason} (raise it with --time-limit)")
            return
        done = t.retrain_outcome is not None and (t.retrain_outcome != "promoted" or service.version == t.promoted_version)
        if done and after >= s.after_ticks:
            t.stop_reason = (f"{service.version} served {after * s.rows_per_tick} rows after the switch"
                             if t.retrain_outcome == "promoted" else
                             f"the retrain was {t.retrain_outcome}; {after * s.rows_per_tick} more rows served on "
                             f"{service.version}")
            return
        ingested = observer.rows_ingested
        if (t.onset is not None and t.retrain_requested is None and ingested is not None
                and ingested - t.onset.row > s.detect_within_rows):
            t.stop_reason = (f"no retrain was requested after driftd had ingested {ingested - t.onset.row:.0f} "
                             "shifted rows: no retrain rule fired (see the alarms above and daemon.log)")
            say(f"stopping: {t.stop_reason}")
            return
        if ingested is not None and service.rows - ingested > s.max_backlog_rows:
            if started - waiting_said >= HEARTBEAT_SECONDS:
                say(f"  traffic waits: driftd is {service.rows - ingested:.0f} rows behind (a busy host)")
                waiting_said = started
            time.sleep(0.5)
            continue
        shifted = len(ticks) >= s.clean_ticks
        if shifted and t.onset is None:
            t.onset = Mark(time.time(), service.rows)
            say(f"onset: inputs are now corrupted with '{s.corruption}' (from row {service.rows})")
        out = service.serve(s.rows_per_tick, shifted=shifted)
        ticks.append(Tick(time=out.timestamp, rows=service.rows, batch_rows=out.rows, model_version=out.model_version,
                          accuracy=out.accuracy, shifted=shifted))
        if done:
            after += 1
        pace = s.waiting_tick_seconds if observer.retrain_busy else s.tick_seconds
        time.sleep(max(0.0, pace - (time.time() - started)))


def _drain(service: Any, observer: DaemonObserver, daemon: subprocess.Popen, s: DemoSettings,
           say: Callable[[str], None]) -> None:
    """Let driftd ingest every row served and join every label written before it stops; give up
    (and say so) once its counters have not moved for DRAIN_STALL_SECONDS."""
    seen, moved = None, time.time()
    while daemon.poll() is None:
        observer.poll(service.rows)
        counts = (observer.rows_ingested or 0, observer.labels_joined or 0)
        if counts[0] >= service.rows and counts[1] >= service.labels_written:
            return
        if counts != seen:
            seen, moved = counts, time.time()
        elif time.time() - moved > DRAIN_STALL_SECONDS:
            say(f"driftd stopped ingesting at {counts[0]:.0f} of {service.rows} rows and {counts[1]:.0f} of "
                f"{service.labels_written} labels; see {s.workdir / 'daemon.log'}")
            return
        time.sleep(0.5)
