"""driftd's configuration: one YAML or TOML file, validated once into frozen dataclasses.

Every error names its key (``signals.mmd.permutations: must be >= 1, got 0``) and all of them
are reported together. Relative paths are resolved against the config file's directory.
Sections owned by other layers are parsed by their own modules: ``http``/``scheduler`` by
``monitor.service.config``, ``policy`` by ``monitor.policy.config``, ``retrain`` by ``retrain.config``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from monitor.configutil import Section, comparable_location, redact_location, resolve_location
from monitor.errors import ConfigError


@dataclass(frozen=True)
class LogsConfig:
    inference: str                  # directory or pyarrow.fs URI of the inference Parquet logs
    labels: str | None              # directory or URI of the label Parquet files (None: no labels)


@dataclass(frozen=True)
class IngestConfig:
    batch_rows: int = 16_384        # rows per bounded read: peak memory ~8 x batch_rows x row bytes
    settle_seconds: float = 30.0    # an unreadable file younger than this is retried, not quarantined
    max_files_per_cycle: int = 1000
    quarantine_dir: str | None = None  # move quarantined files here; None: record only, leave in place
    prediction_ttl_seconds: float = 14 * 86400.0  # how long a prediction waits for its label
    label_ttl_seconds: float = 86400.0            # how long an early label waits for its prediction
    max_pending_predictions: int = 5_000_000
    max_pending_labels: int = 1_000_000
    labelled_retention_seconds: float = 30 * 86400.0  # joined rows kept for retraining


@dataclass(frozen=True)
class WindowConfig:
    # A window's batch tests cost ~25 ms at the MMD defaults; 5000 rows keeps that near 5 us a row
    # and, at high traffic, keeps the number of batch tests (and chance alarms) per hour sane.
    rows: int = 5000                # close a window after this many rows ...
    seconds: float = 300.0          # ... or once it spans this much event time, whichever is first
    min_rows: int = 50              # a shorter window (time-closed) skips the MMD test


@dataclass(frozen=True)
class ActivationConfig:
    alpha: float = 0.05             # Benjamini-Hochberg false discovery rate
    top_k: int = 10


@dataclass(frozen=True)
class MmdConfig:
    enabled: bool = True
    # The default rule (p < 0.05 for 3 windows) needs p-values down to 5/101; 200 permutations
    # detected no more in the bench (bench/README.md (f)). A threshold <= 1/(1 + permutations)
    # can never fire.
    permutations: int = 100
    # Windows each draw of the permutations serves (their reference-only sums are the costly
    # part; 8 draws serve consecutive windows in turn). A p-value stays exact because the draw
    # never depends on the window's rows (monitor/signals/mmd.py, PermutationSchedule).
    redraw_permutations_every: int = 20
    alpha: float = 0.05
    max_window_rows: int = 500      # window rows are subsampled to this for the test
    max_reference_rows: int = 1000  # reference rows used by the test (of those stored)
    # Raw features: on real backbone features no projection kept 0.9 of raw's power on every
    # shift (best: random-256, 0.68 of it on a subtle contrast shift; PCA lost dense and sparse
    # shifts); bench/mmd_power_bench.py, bench/README.md.
    projection: str = "none"        # "none", "random" or "pca"
    projection_dims: int = 256      # for random/pca: 256 kept the most power of 32-256 (random)
    seed: int = 0


@dataclass(frozen=True)
class OnlineMmdConfig:
    enabled: bool = True
    window_rows: int = 50           # sliding test window of the sequential detector
    stride_rows: int = 25           # the statistic is tested every this many rows (a mini-batch)
    ert_rows: float = 100_000.0     # expected rows between false alarms on undrifted data
    bootstraps: int = 4500          # calibration samples: at least ~ert_rows / stride_rows
    # The statistic's noise comes mostly from the 50-row window; the sub-reference kernel is the
    # per-row cost, so 500 rows (not 1000) halves it for little power.
    max_reference_rows: int = 500
    # Its own projection, because it pays per row: on raw 1280-d features an update cost ~12x the
    # random-32 one (670 vs 57 us/row, bench/README.md); the batch test keeps raw features.
    projection: str = "random"      # random | pca | none
    projection_dims: int = 32
    seed: int = 0


@dataclass(frozen=True)
class AccuracyConfig:
    last_n: int = 1000
    last_seconds: float = 3600.0    # over predictions of the last T seconds of event time
    # Accuracy is judged when labels arrive: at the end of every cycle that joined labels, and
    # every this many labels within one (a backlog caught up in one cycle still gives a series
    # for `consecutive`).
    evaluate_every: int = 200


# Label-free estimators (monitor.signals.estimate.METHODS is this tuple; named here so reading a
# config imports neither the estimators nor scipy).
ESTIMATE_METHODS: tuple[str, ...] = ("cbpe", "doc", "atc_mc", "atc_ne", "cott")


@dataclass(frozen=True)
class EstimateConfig:
    # Lowest error on the real-backbone bench (bench/README.md, estimate_bench.py); every method
    # is fitted into the reference, so changing this needs no rebuild.
    method: str = "cott"            # cbpe | doc | atc_mc | atc_ne | cott
    bootstraps: int = 200           # resamples behind the interval (~0.1 ms each on a 5000-row window)
    interval: float = 0.9           # confidence level of [lower, upper]
    seed: int = 0


@dataclass(frozen=True)
class SignalsConfig:
    # Signal matrices are small: more intra-op threads mostly contend with each other and with the
    # inference service next to driftd (measured: 2 threads ran 6x slower than 1 on a busy 2-core host).
    threads: int = 1
    activations: ActivationConfig = field(default_factory=ActivationConfig)
    mmd: MmdConfig = field(default_factory=MmdConfig)
    online_mmd: OnlineMmdConfig = field(default_factory=OnlineMmdConfig)
    accuracy: AccuracyConfig = field(default_factory=AccuracyConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)


@dataclass(frozen=True)
class MonitorConfig:
    """What the monitoring core needs: where logs, references and state live, and how to measure."""

    model: str                      # a name for the monitored model (the `model` metric label)
    logs: LogsConfig
    state_dir: Path
    reference_dir: Path
    ingest: IngestConfig = field(default_factory=IngestConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    signals: SignalsConfig = field(default_factory=SignalsConfig)


@dataclass(frozen=True)
class Config:
    """The whole file. ``service``, ``policy`` and ``retrain`` are typed by their owners."""

    source: str                     # the file it was read from ("<flags>" for CLI flags)
    monitor: MonitorConfig
    service: Any
    policy: Any
    retrain: Any


def _check_online(root: Section, online: OnlineMmdConfig) -> None:
    """Settings the detector could not calibrate are config errors, not a failure every cycle."""
    from monitor.signals.bootstraps import required_bootstraps  # arithmetic only: no torch here

    key = "signals.online_mmd"
    if online.stride_rows > online.window_rows:
        root.error(f"{key}.stride_rows", f"must be <= window_rows ({online.window_rows}), got {online.stride_rows}")
    elif online.ert_rows <= online.stride_rows:
        root.error(f"{key}.ert_rows", f"must exceed stride_rows ({online.stride_rows}), got {online.ert_rows:g}")
    else:
        needed = required_bootstraps(online.ert_rows, online.window_rows, online.stride_rows)
        if online.bootstraps < needed:
            root.error(
                f"{key}.bootstraps",
                f"{online.bootstraps} cannot calibrate ert_rows={online.ert_rows:g} tested every "
                f"{online.stride_rows} rows: set bootstraps >= {needed}, raise stride_rows, or lower ert_rows",
            )


def _parse_monitor(root: Section, base: Path) -> MonitorConfig:
    logs = root.section("logs")
    inference = logs.str("inference")
    labels = logs.optional_str("labels")
    logs.finish()

    ing = root.section("ingest")
    d = IngestConfig()
    quarantine_dir = ing.optional_str("quarantine_dir")
    ingest = IngestConfig(
        batch_rows=ing.int("batch_rows", d.batch_rows, minimum=1),
        settle_seconds=ing.float("settle_seconds", d.settle_seconds, minimum=0),
        max_files_per_cycle=ing.int("max_files_per_cycle", d.max_files_per_cycle, minimum=1),
        quarantine_dir=None if quarantine_dir is None else resolve_location(quarantine_dir, base),
        prediction_ttl_seconds=ing.float("prediction_ttl_seconds", d.prediction_ttl_seconds, minimum=1),
        label_ttl_seconds=ing.float("label_ttl_seconds", d.label_ttl_seconds, minimum=1),
        max_pending_predictions=ing.int("max_pending_predictions", d.max_pending_predictions, minimum=1),
        max_pending_labels=ing.int("max_pending_labels", d.max_pending_labels, minimum=1),
        labelled_retention_seconds=ing.float("labelled_retention_seconds", d.labelled_retention_seconds, minimum=1),
    )
    ing.finish()
    for location in (inference, labels):
        if ingest.quarantine_dir is None or not location:
            continue
        q, logs_root = comparable_location(ingest.quarantine_dir), comparable_location(resolve_location(location, base))
        # The tailer skips names starting with "_" or "."; anything else inside the logs is read again.
        if q.is_relative_to(logs_root) and not any(p.startswith(("_", ".")) for p in q.relative_to(logs_root).parts):
            root.error(
                "ingest.quarantine_dir",
                f"{redact_location(ingest.quarantine_dir)} is inside the logs at "
                f"{redact_location(resolve_location(location, base))}, so moved files would be read again: "
                "put it elsewhere or give it a name starting with '_'",
            )

    win = root.section("window")
    w = WindowConfig()
    window = WindowConfig(
        rows=win.int("rows", w.rows, minimum=2),
        seconds=win.float("seconds", w.seconds, minimum=0.001),
        min_rows=win.int("min_rows", w.min_rows, minimum=2),
    )
    win.finish()
    if window.min_rows > window.rows:
        root.error("window.min_rows", f"must be <= window.rows ({window.rows}), got {window.min_rows}")

    sig = root.section("signals")
    act = sig.section("activations")
    a = ActivationConfig()
    activations = ActivationConfig(
        alpha=act.float("alpha", a.alpha, minimum=1e-9, maximum=1),
        top_k=act.int("top_k", a.top_k, minimum=1),
    )
    act.finish()
    mm = sig.section("mmd")
    m = MmdConfig()
    mmd = MmdConfig(
        enabled=mm.bool("enabled", m.enabled),
        permutations=mm.int("permutations", m.permutations, minimum=1),
        redraw_permutations_every=mm.int("redraw_permutations_every", m.redraw_permutations_every, minimum=1),
        alpha=mm.float("alpha", m.alpha, minimum=1e-9, maximum=1),
        max_window_rows=mm.int("max_window_rows", m.max_window_rows, minimum=2),
        max_reference_rows=mm.int("max_reference_rows", m.max_reference_rows, minimum=2),
        projection=mm.choice("projection", ("pca", "random", "none"), m.projection),
        projection_dims=mm.int("projection_dims", m.projection_dims, minimum=1),
        seed=mm.int("seed", m.seed, minimum=0),
    )
    mm.finish()
    on = sig.section("online_mmd")
    o = OnlineMmdConfig()
    online = OnlineMmdConfig(
        enabled=on.bool("enabled", o.enabled),
        window_rows=on.int("window_rows", o.window_rows, minimum=2),
        stride_rows=on.int("stride_rows", o.stride_rows, minimum=1),
        ert_rows=on.float("ert_rows", o.ert_rows, minimum=1),
        bootstraps=on.int("bootstraps", o.bootstraps, minimum=10),
        max_reference_rows=on.int("max_reference_rows", o.max_reference_rows, minimum=4),
        projection=on.choice("projection", ("pca", "random", "none"), o.projection),
        projection_dims=on.int("projection_dims", o.projection_dims, minimum=1),
        seed=on.int("seed", o.seed, minimum=0),
    )
    on.finish()
    if online.enabled:
        _check_online(root, online)
    if online.max_reference_rows <= 2 * online.window_rows:
        root.error(
            "signals.online_mmd.max_reference_rows",
            f"must exceed 2 x window_rows ({2 * online.window_rows}) so the detector can be calibrated",
        )
    acc = sig.section("accuracy")
    ac = AccuracyConfig()
    accuracy = AccuracyConfig(
        last_n=acc.int("last_n", ac.last_n, minimum=1),
        last_seconds=acc.float("last_seconds", ac.last_seconds, minimum=1),
        evaluate_every=acc.int("evaluate_every", ac.evaluate_every, minimum=1),
    )
    acc.finish()
    est = sig.section("estimate")
    e = EstimateConfig()
    estimate = EstimateConfig(
        method=est.choice("method", ESTIMATE_METHODS, e.method),
        bootstraps=est.int("bootstraps", e.bootstraps, minimum=10, maximum=100_000),
        interval=est.float("interval", e.interval, minimum=0.5, maximum=0.999),
        seed=est.int("seed", e.seed, minimum=0),
    )
    est.finish()
    threads = sig.int("threads", SignalsConfig.threads, minimum=1)
    sig.finish()

    state_dir = root.str("state_dir", "./driftd-state")
    reference_dir = root.str("reference_dir", "./driftd-reference")
    return MonitorConfig(
        model=root.str("model", "model"),
        logs=LogsConfig(
            inference=resolve_location(inference, base) if inference else "",
            labels=None if labels is None else resolve_location(labels, base),
        ),
        state_dir=Path(resolve_location(state_dir, base)),
        reference_dir=Path(resolve_location(reference_dir, base)),
        ingest=ingest,
        window=window,
        signals=SignalsConfig(threads=threads, activations=activations, mmd=mmd, online_mmd=online, accuracy=accuracy,
                              estimate=estimate),
    )


def parse_config(data: Any, *, source: str, base: Path) -> Config:
    """Validate a parsed document; raises ConfigError listing every bad key."""
    from monitor.policy.config import parse_policy, unreachable_rules
    from monitor.service.config import parse_service
    from retrain.config import parse_retrain

    errors: list[str] = []
    root = Section(data, "", errors)
    monitor = _parse_monitor(root, base)
    service = parse_service(root, base)
    policy = parse_policy(root.section("policy"))
    retrain = parse_retrain(root.section("retrain"), base)
    root.finish()
    # A rule that can never fire is a silent hole in the alerting: refuse it, naming both numbers.
    for index, message in unreachable_rules(policy, permutations=monitor.signals.mmd.permutations):
        key = "policy.rules" if index is None else f"policy.rules[{index}].threshold"
        errors.append(f"{key}: {message}" + (" (a default rule: set policy.rules to change it)" if index is None else ""))
    if errors:
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(errors))
    return Config(source=source, monitor=monitor, service=service, policy=policy, retrain=retrain)


def read_document(path: Path) -> Any:
    """Parse a YAML (.yaml/.yml) or TOML (.toml) file into plain Python data."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; pass --config with an existing YAML or TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(text)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path).expanduser().resolve()
    return parse_config(read_document(p), source=str(p), base=p.parent)

