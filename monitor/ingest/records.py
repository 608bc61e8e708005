"""Typed, validated batches that leave the ingest layer.

Everything downstream (signals, engine, retraining data) receives these, never raw Arrow
tables, so the contract is checked in exactly one place (``monitor.ingest.contract`` for rows,
``monitor.ingest.schema`` for a file's footer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InferenceBatch:
    """Rows of one file (or one bounded slice of it), already validated.

    Shapes: ``n`` rows, ``D`` feature dims, ``C`` classes.
    """

    source: str                 # file path/URI the rows came from
    first_row: int              # index of the first row of this batch within the file
    request_id: np.ndarray      # object[n] of str
    timestamp: np.ndarray       # float64[n], seconds since the epoch (UTC)
    model_version: np.ndarray   # object[n] of str
    features: np.ndarray        # float32[n, D], all finite
    probs: np.ndarray           # float32[n, C], rows sum to 1 (softmaxed if logits were logged)
    prediction: np.ndarray      # int64[n]
    input_uri: np.ndarray | None  # object[n] of str or None, when the column exists
    label: np.ndarray | None    # int64[n], -1 where missing, when the column exists

    def __len__(self) -> int:
        return int(self.request_id.shape[0])

    def take(self, index: np.ndarray) -> "InferenceBatch":
        """Rows selected by a boolean mask or integer index (e.g. one model_version)."""
        return InferenceBatch(
            source=self.source,
            first_row=self.first_row,
            request_id=self.request_id[index],
            timestamp=self.timestamp[index],
            model_version=self.model_version[index],
            features=self.features[index],
            probs=self.probs[index],
            prediction=self.prediction[index],
            input_uri=None if self.input_uri is None else self.input_uri[index],
            label=None if self.label is None else self.label[index],
        )


@dataclass(frozen=True)
class LabelBatch:
    """Ground-truth rows from one label file slice."""

    source: str
    request_id: np.ndarray      # object[n] of str
    label: np.ndarray           # int64[n], >= 0
    labeled_at: np.ndarray      # float64[n], seconds since the epoch (UTC)

    def __len__(self) -> int:
        return int(self.request_id.shape[0])


@dataclass(frozen=True)
class JoinedLabel:
    """One prediction matched with its ground truth: the unit of accuracy and of retraining data."""

    request_id: str
    model_version: str
    timestamp: float            # prediction time, epoch seconds
    labeled_at: float           # label time, epoch seconds
    prediction: int
    label: int
    confidence: float           # max probability of the prediction
    source: str                 # inference file the prediction came from
    row: int                    # row index within that file (to re-read features for training)
    input_uri: str | None

    @property
    def delay_seconds(self) -> float:
        return self.labeled_at - self.timestamp
