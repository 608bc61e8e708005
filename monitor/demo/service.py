"""The demo's stand-in for a user's inference service: real model, real logs through LogWriter.

It serves requests with whatever model the registry's CURRENT points at, through the same
hand-off an inference service uses (``retrain.serving.CurrentModel``: a new CURRENT is loaded
beside the old one and swapped between requests, so a promotion shows up in the logs as a new
model_version), keeps each request's input as a PNG under the input root (what retraining
reads), and writes the ground truth a fixed delay later, as a labelling team would.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitor.ingest.writer import LabelWriter, LogWriter
from retrain.digits import corrupt, write_images
from retrain.model import images_to_tensor
from retrain.registry import Registry
from retrain.serving import CurrentModel


@dataclass(frozen=True)
class Batch:
    """One batch of requests as the demo served it."""

    rows: int               # in this batch
    timestamp: float        # the batch's timestamp in the logs
    model_version: str
    accuracy: float         # on this batch (the demo knows the truth; driftd learns it later)
    shifted: bool


class InferenceService:
    def __init__(
        self,
        *,
        registry: Registry,
        images: np.ndarray,
        labels: np.ndarray,
        logs: Path,
        label_logs: Path,
        inputs: Path,
        label_delay_ticks: int,
        corruption: str,
        severity: float,
        seed: int,
    ):
        self.registry = registry
        self.images = images
        self.labels = labels
        self.inputs = inputs
        self.corruption = corruption
        self.severity = severity
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.writer = LogWriter(logs, roll_rows=10**9, roll_seconds=3600.0)
        self.label_writer = LabelWriter(label_logs, roll_rows=10**9, roll_seconds=3600.0)
        self.label_delay_ticks = label_delay_ticks
        self._pending: collections.deque[tuple[int, list[str], np.ndarray]] = collections.deque()
        self.switches: list[tuple[float, str]] = []
        # check_seconds=0: the demo asks between batches, the way a service asks per request
        self.current = CurrentModel(registry.path, check_seconds=0,
                                    on_swap=lambda new, old: self.switches.append((time.time(), new.version)))
        self.switches.append((time.time(), self.current.version))
        self.version: str | None = self.current.version
        self.tick = 0
        self.rows = 0
        self.labels_written = 0
        self._closed = False

    def refresh_model(self) -> bool:
        """Follow CURRENT (a promotion or rollback); True when the served version changed."""
        before = self.version
        self.version = self.current.get().version
        return self.version != before

    def serve(self, n: int, *, shifted: bool) -> Batch:
        """One tick of traffic: n requests, logged and flushed as one Parquet file."""
        served = self.current.get()  # one version for the whole batch
        self.version = served.version
        idx = self.rng.integers(0, len(self.images), size=n)
        batch = self.images[idx]
        if shifted:
            batch = corrupt(batch, self.corruption, self.severity, seed=self.seed * 100_003 + self.tick)
        ids = [f"req-{self.tick:06d}-{i:03d}" for i in range(n)]
        uris = write_images(self.inputs, batch, ids)
        x = images_to_tensor(batch, served.data_config)  # the version's own preprocessing (timm transforms)
        features, probs = served.predict(x)
        now = time.time()
        self.writer.write_batch(
            request_id=ids, timestamp=now, model_version=served.version, features=features, probs=probs, input_uri=uris
        )
        self.writer.flush()
        truth = self.labels[idx]
        self._pending.append((self.tick + self.label_delay_ticks, ids, truth))
        self._release_labels()
        self.tick += 1
        self.rows += n
        return Batch(rows=n, timestamp=now, model_version=served.version,
                     accuracy=float((probs.argmax(1) == truth).mean()), shifted=shifted)

    def _release_labels(self, *, all_of_them: bool = False) -> None:
        while self._pending and (all_of_them or self._pending[0][0] <= self.tick):
            _, ids, truth = self._pending.popleft()
            self.label_writer.write_batch(request_id=ids, label=truth, labeled_at=time.time())
            self.labels_written += len(ids)
        self.label_writer.flush()

    def close(self) -> None:
        """Write every pending label and close both writers; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._release_labels(all_of_them=True)
        self.writer.close()
        self.label_writer.close()
