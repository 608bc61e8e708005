"""Prometheus export: one custom collector rendering a snapshot of the daemon, plus three histograms.

Counters that must survive a restart (rows, files, labels, windows, ...) are read from
``engine.counters()`` (persisted in the state store) through the snapshot, never kept in
in-process Counter objects. Labels are only ``model``, ``model_version`` and bounded enums.
Every labelled family the daemon knows about is emitted at 0 from start-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from monitor.ingest import counters as k
from monitor.ingest.counters import FILE_REASONS, ROW_REASONS
from monitor.signals.results import WindowSignals

# Enums that label series from the start, so alerts on rate() see a 0 first.
FILE_KINDS = ("inference", "labels")
JOB_NAMES = ("cycle", "retrain", "http")  # each has one catch point that counts here
RETRAIN_OUTCOMES = ("promoted", "rejected", "failed", "dropped", "deferred")
LABEL_OUTCOMES = (k.JOINED, k.UNMATCHED, k.DUPLICATE)
ON_PROMOTE_KINDS = ("command", "webhook")    # retrain.hooks.KINDS
ON_PROMOTE_OUTCOMES = ("ok", "failed")       # retrain.hooks.OUTCOMES
CYCLE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LABEL_DELAY_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400, 14 * 86400)
RETRAIN_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 12 * 3600)


@dataclass(frozen=True)
class RetrainProgress:
    epoch: float = math.nan
    grad_norm: float = math.nan
    weight_drift: float = math.nan


@dataclass(frozen=True)
class MetricsSnapshot:
    """Everything the collector renders; built by the daemon after each cycle / state change."""

    model: str
    counters: Mapping[tuple[str, str], float] = field(default_factory=dict)  # engine.counters()
    model_versions: tuple[str, ...] = ()                 # versions with a reference (series start at 0)
    reference_accuracy: Mapping[str, float | None] = field(default_factory=dict)
    windows: Mapping[str, WindowSignals] = field(default_factory=dict)  # latest window per version
    lag_seconds: float = math.nan
    last_success: float = math.nan                     # epoch seconds of the last successful cycle
    job_errors: Mapping[str, float] = field(default_factory=dict)
    alarms: Mapping[tuple[str, str], bool] = field(default_factory=dict)      # (rule, model_version) -> on
    thresholds: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (rule, model_version) -> in force
    breaches: Mapping[str, float] = field(default_factory=dict)    # rule -> observations in breach
    retrain_runs: Mapping[str, float] = field(default_factory=dict)  # outcome -> count
    retrain_in_progress: bool = False
    last_promotion: float = math.nan
    current_version: str | None = None
    progress: RetrainProgress = field(default_factory=RetrainProgress)
    build_version: str = "unknown"
    top_k: int = 10
    watermark: float = math.nan                         # the stream's clock: newest prediction time
    pending_predictions: float = math.nan               # predictions waiting for their labels
    pending_labels: float = math.nan                    # labels waiting for their predictions
    on_promote: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (kind, outcome) -> hook runs


def _enum_counter(counters: Mapping[tuple[str, str], float], kind: str) -> dict[str, float]:
    return {label: v for (counter_kind, label), v in counters.items() if counter_kind == kind}


class SnapshotCollector(Collector):
    """Renders :class:`MetricsSnapshot` from ``snapshot()`` at scrape time (cheap: no I/O)."""

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]):
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        yield from self._ingest(s)
        yield from self._signals(s)
        yield from self._policy(s)
        yield from self._retrain(s)
        info = GaugeMetricFamily("driftd_build_info", "driftd build; value is always 1", labels=["version"])
        info.add_metric([s.build_version], 1.0)
        yield info

    def _ingest(self, s: MetricsSnapshot) -> Iterable[Metric]:
        m, c = s.model, s.counters
        # Only the versions shown (served, recent or not yet seen): a retired one drops out once its
        # rows have stopped for window.seconds of event time.
        versions = sorted(set(s.model_versions) | set(s.windows))

        def per_version(name: str, doc: str, kind: str, source: Iterable[str]) -> CounterMetricFamily:
            fam = CounterMetricFamily(name, doc, labels=["model", "model_version"])
            for mv in sorted(set(source)):
                fam.add_metric([m, mv], c.get((kind, mv), 0.0))
            return fam

        def enum(name: str, doc: str, label: str, kind: str, defaults: Iterable[str] = ()) -> CounterMetricFamily:
            fam = CounterMetricFamily(name, doc, labels=["model", label])
            values = {d: 0.0 for d in defaults} | _enum_counter(c, kind)
            for key in sorted(values):
                fam.add_metric([m, key], values[key])
            return fam

        yield per_version("driftd_ingest_rows", "Inference rows ingested", k.ROWS, versions)
        yield enum("driftd_ingest_files", "Log files fully ingested, by kind", "kind", k.FILES, FILE_KINDS)
        yield enum("driftd_ingest_rejected_rows", "Rows rejected by the log contract, by reason", "reason",
                   k.REJECTED_ROWS, ROW_REASONS)
        yield enum("driftd_ingest_quarantined_files", "Files quarantined, by reason", "reason", k.QUARANTINED_FILES,
                   FILE_REASONS)
        labels = _enum_counter(c, k.LABELS)
        for outcome in LABEL_OUTCOMES:
            fam = CounterMetricFamily(f"driftd_labels_{outcome}", f"Label rows {outcome}", labels=["model"])
            fam.add_metric([m], labels.get(outcome, 0.0))
            yield fam
        yield per_version(
            "driftd_rows_without_reference", "Rows of a model_version with no reference (not evaluated)",
            k.ROWS_WITHOUT_REFERENCE, [mv for (kind, mv) in c if kind == k.ROWS_WITHOUT_REFERENCE and mv in versions],
        )
        yield per_version("driftd_windows", "Windows closed and evaluated", k.WINDOWS, versions)
        for name, doc, kind, key in (
                ("driftd_labelled_rows_pruned", "Joined rows pruned past ingest.labelled_retention_seconds (event time)",
                 k.LABELLED, k.PRUNED),
                ("driftd_predictions_expired", "Predictions that waited ingest.prediction_ttl_seconds (event time) "
                 "without a label", k.PREDICTIONS, k.EXPIRED)):
            fam = CounterMetricFamily(name, doc, labels=["model"])
            fam.add_metric([m], c.get((kind, key), 0.0))
            yield fam
        yield _gauge("driftd_pending_predictions", "Predictions waiting for their labels", m, s.pending_predictions)
        yield _gauge("driftd_pending_labels", "Labels waiting for their predictions (unknown request ids so far)", m,
                     s.pending_labels)
        yield _gauge("driftd_event_time_seconds", "The stream's clock: newest prediction timestamp ingested (epoch s)",
                     m, s.watermark)
        yield _gauge("driftd_ingest_lag_seconds", "Age of the oldest log file not yet fully ingested (0 when caught up)", m, s.lag_seconds)
        yield _gauge("driftd_last_successful_cycle_timestamp_seconds", "End of the last successful cycle (epoch s)", m, s.last_success)
        errors = CounterMetricFamily("driftd_job_errors", "Scheduled job runs that failed, by job", labels=["model", "job"])
        for job in sorted(set(JOB_NAMES) | set(s.job_errors)):
            errors.add_metric([m, job], s.job_errors.get(job, 0.0))
        yield errors

    def _signals(self, s: MetricsSnapshot) -> Iterable[Metric]:
        m = s.model
        gauges: dict[str, tuple[str, Callable[[WindowSignals], float | None]]] = {
            "driftd_activation_max_abs_shift": ("Max |mean shift| over feature dims (standard errors)", lambda w: w.activations.max_abs_shift),
            "driftd_activation_mean_abs_shift": ("Mean |mean shift| over feature dims (standard errors)", lambda w: w.activations.mean_abs_shift),
            "driftd_activation_share_significant": ("Share of feature dims shifted after BH correction", lambda w: w.activations.share_significant),
            "driftd_activation_max_abs_log_variance_ratio": ("Max |log variance ratio| over feature dims", lambda w: w.activations.max_abs_log_variance_ratio),
            "driftd_prediction_entropy_mean": ("Mean normalised prediction entropy", lambda w: w.predictions.entropy_mean),
            "driftd_prediction_entropy_p90": ("90th percentile of normalised prediction entropy", lambda w: w.predictions.entropy_p90),
            "driftd_prediction_max_prob_mean": ("Mean max class probability", lambda w: w.predictions.max_prob_mean),
            "driftd_predicted_class_tvd": ("Total variation distance of predicted classes vs reference", lambda w: w.predictions.class_tvd),
            "driftd_predicted_class_chi2_p_value": ("Two-sample p-value of predicted-class counts vs the reference sample", lambda w: w.predictions.class_chi2_p_value),
            "driftd_estimated_class_prior_tvd": ("Total variation of the BBSD-estimated class prior vs the reference's", lambda w: w.predictions.class_prior_tvd),
            "driftd_mmd2": ("Unbiased MMD^2 of the window vs the reference", lambda w: None if w.mmd is None else w.mmd.mmd2),
            "driftd_mmd_p_value": ("Permutation p-value of the MMD test", lambda w: None if w.mmd is None else w.mmd.p_value),
            "driftd_online_mmd_statistic": ("Sequential MMD statistic", lambda w: w.online.statistic),
            "driftd_online_mmd_threshold": ("Sequential MMD threshold in force", lambda w: w.online.threshold),
            "driftd_window_accuracy": ("Accuracy over the last N joined labels (ratio)", lambda w: w.accuracy.accuracy_last_n),
            "driftd_window_accuracy_labels": ("Labels behind driftd_window_accuracy", lambda w: float(w.accuracy.labels_last_n)),
            "driftd_estimated_accuracy": ("Label-free accuracy estimate (ratio)", lambda w: None if w.estimate is None else w.estimate.estimated_accuracy),
            "driftd_estimated_accuracy_lower": ("Lower end of the estimate's bootstrap interval (ratio)", lambda w: None if w.estimate is None else w.estimate.lower),
            "driftd_estimated_accuracy_upper": ("Upper end of the estimate's bootstrap interval (ratio)", lambda w: None if w.estimate is None else w.estimate.upper),
            "driftd_window_rows": ("Rows in the last closed window", lambda w: float(w.rows)),
        }
        versions = sorted(set(s.model_versions) | set(s.windows))
        for name, (doc, get) in gauges.items():
            fam = GaugeMetricFamily(name, doc, labels=["model", "model_version"])
            for mv in versions:
                w = s.windows.get(mv)
                fam.add_metric([m, mv], _value(None if w is None else get(w)))
            yield fam
        ref = GaugeMetricFamily("driftd_reference_accuracy", "Accuracy on the labelled reference (ratio)", labels=["model", "model_version"])
        for mv in versions:
            ref.add_metric([m, mv], _value(s.reference_accuracy.get(mv)))
        yield ref
        # Info-style: which estimator produced driftd_estimated_accuracy (signals.estimate.method, or
        # the fallback a reference from an older driftd forces), one series per version at 1.
        method = GaugeMetricFamily("driftd_estimate_method_info", "1 for the label-free estimator in force",
                                   labels=["model", "model_version", "method"])
        for mv, w in sorted(s.windows.items()):
            if w.estimate is not None:
                method.add_metric([m, mv, w.estimate.method], 1.0)
        yield method
        alarms = CounterMetricFamily("driftd_online_mmd_alarms", "Sequential MMD alarms since the detector started", labels=["model", "model_version"])
        for mv in versions:
            w = s.windows.get(mv)
            alarms.add_metric([m, mv], 0.0 if w is None else float(w.online.alarms_total))
        yield alarms
        dim = GaugeMetricFamily("driftd_top_shifted_dimension", "Feature dim index at this shift rank", labels=["model", "model_version", "rank"])
        shift = GaugeMetricFamily("driftd_top_shifted_dimension_shift", "Signed shift (standard errors) at this rank", labels=["model", "model_version", "rank"])
        for mv, w in sorted(s.windows.items()):
            for rank, d in enumerate(w.activations.top_dims[: s.top_k], start=1):
                dim.add_metric([m, mv, str(rank)], float(d.dim))
                shift.add_metric([m, mv, str(rank)], _value(d.shift))
        yield dim
        yield shift

    def _policy(self, s: MetricsSnapshot) -> Iterable[Metric]:
        m = s.model
        alarm = GaugeMetricFamily("driftd_alarm", "1 while a rule's alarm is on for this model_version",
                                  labels=["model", "model_version", "rule"])
        threshold = GaugeMetricFamily("driftd_rule_threshold", "Threshold in force for a rule and model_version",
                                      labels=["model", "model_version", "rule"])
        breaches = CounterMetricFamily("driftd_threshold_breaches", "Observations (windows or label evaluations) "
                                       "in which a rule's threshold was breached", labels=["model", "rule"])
        for rule, mv in sorted(set(s.alarms) | set(s.thresholds)):
            alarm.add_metric([m, mv, rule], 1.0 if s.alarms.get((rule, mv)) else 0.0)
            threshold.add_metric([m, mv, rule], _value(s.thresholds.get((rule, mv))))
        for rule in sorted(set(s.breaches) | {r for r, _ in s.alarms} | {r for r, _ in s.thresholds}):
            breaches.add_metric([m, rule], s.breaches.get(rule, 0.0))
        yield alarm
        yield threshold
        yield breaches

    def _retrain(self, s: MetricsSnapshot) -> Iterable[Metric]:
        m = s.model
        runs = CounterMetricFamily("driftd_retrain_runs", "Retrain runs by outcome", labels=["model", "outcome"])
        for outcome in sorted(set(RETRAIN_OUTCOMES) | set(s.retrain_runs)):
            runs.add_metric([m, outcome], s.retrain_runs.get(outcome, 0.0))
        yield runs
        yield _gauge("driftd_retrain_in_progress", "1 while a retrain is queued or running", m, 1.0 if s.retrain_in_progress else 0.0)
        yield _gauge("driftd_last_promotion_timestamp_seconds", "When a candidate was last promoted (epoch s)", m, s.last_promotion)
        yield _gauge("driftd_retrain_backbone_grad_norm", "Backbone gradient norm of the running retrain", m, s.progress.grad_norm)
        yield _gauge("driftd_retrain_weight_drift", "L2 distance of the running retrain's backbone weights from its start", m, s.progress.weight_drift)
        yield _gauge("driftd_retrain_epoch", "Epoch of the running retrain", m, s.progress.epoch)
        hooks = CounterMetricFamily("driftd_on_promote_runs", "retrain.on_promote runs after a promotion or rollback",
                                    labels=["model", "kind", "outcome"])
        for kind in ON_PROMOTE_KINDS:
            for outcome in ON_PROMOTE_OUTCOMES:
                hooks.add_metric([m, kind, outcome], s.on_promote.get((kind, outcome), 0.0))
        yield hooks
        info = GaugeMetricFamily("driftd_model_info", "1 for the model version currently served", labels=["model", "model_version"])
        if s.current_version is not None:
            info.add_metric([m, s.current_version], 1.0)
        yield info


def _gauge(name: str, doc: str, model: str, value: float | None) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(name, doc, labels=["model"])
    fam.add_metric([model], _value(value))
    return fam


def _value(v: float | None) -> float:
    return math.nan if v is None else float(v)


class Metrics:
    """The daemon's metrics in ``registry``: the snapshot collector and the histograms."""

    def __init__(self, model: str, registry: CollectorRegistry, snapshot: Callable[[], MetricsSnapshot]):
        self.registry = registry
        registry.register(SnapshotCollector(snapshot))
        self.cycle_duration = Histogram(
            "driftd_cycle_duration_seconds", "Duration of one ingest/evaluate cycle", ["model"],
            registry=registry, buckets=CYCLE_BUCKETS,
        ).labels(model)
        self.label_delay = Histogram(
            "driftd_label_delay_seconds", "Delay between a prediction and its label", ["model"],
            registry=registry, buckets=LABEL_DELAY_BUCKETS,
        ).labels(model)
        self.retrain_duration = Histogram(
            "driftd_retrain_duration_seconds", "Duration of retrain runs", ["model"],
            registry=registry, buckets=RETRAIN_BUCKETS,
        ).labels(model)

    def observe_cycle(self, duration_seconds: float, label_delays: Iterable[float]) -> None:
        self.cycle_duration.observe(max(0.0, duration_seconds))
        for d in label_delays:
            if math.isfinite(d):
                self.label_delay.observe(max(0.0, d))
