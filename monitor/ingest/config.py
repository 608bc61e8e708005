"""The ingest config sections: ``logs`` (where the inference and label Parquet logs are) and
``ingest`` (bounded reads, settling, quarantine, the label buffers' ages and caps)."""

from __future__ import annotations

from dataclasses import dataclass, field

from monitor.configutil import Section, comparable_location, redact_location, rules, setting


@dataclass(frozen=True)
class LogsConfig:
    # directory or pyarrow.fs URI of the inference Parquet logs
    inference: str = field(metadata=rules(location=True))
    labels: str | None = setting(None, location=True)  # directory or URI of the label Parquet files (None: no labels)


@dataclass(frozen=True)
class IngestConfig:
    batch_rows: int = setting(16_384, minimum=1)       # rows per bounded read: peak memory ~8 x batch_rows x row bytes
    settle_seconds: float = setting(30.0, minimum=0)   # an unreadable file younger than this is retried, not quarantined
    max_files_per_cycle: int = setting(1000, minimum=1)
    # move quarantined files here; None: record only, leave in place
    quarantine_dir: str | None = setting(None, location=True)
    prediction_ttl_seconds: float = setting(14 * 86400.0, minimum=1)  # how long a prediction waits for its label
    label_ttl_seconds: float = setting(86400.0, minimum=1)            # how long an early label waits for its prediction
    max_pending_predictions: int = setting(5_000_000, minimum=1)
    max_pending_labels: int = setting(1_000_000, minimum=1)
    labelled_retention_seconds: float = setting(30 * 86400.0, minimum=1)  # joined rows kept for retraining


def check_ingest(root: Section, logs: LogsConfig, ingest: IngestConfig) -> None:
    """A quarantine directory inside the logs would have its moved files read again: refused."""
    for location in (logs.inference, logs.labels):
        if ingest.quarantine_dir is None or not location:
            continue
        q, logs_root = comparable_location(ingest.quarantine_dir), comparable_location(location)
        # The tailer skips names starting with "_" or "."; anything else inside the logs is read again.
        if q.is_relative_to(logs_root) and not any(p.startswith(("_", ".")) for p in q.relative_to(logs_root).parts):
            root.error(
                "ingest.quarantine_dir",
                f"{redact_location(ingest.quarantine_dir)} is inside the logs at "
                f"{redact_location(location)}, so moved files would be read again: "
                "put it elsewhere or give it a name starting with '_'",
            )
