"""The log contract: what an inference or label Parquet file must contain, checked on read.

Inference files (one row per prediction; extra columns are ignored, only these are read):

=============== ===================================================== ==========
column          type                                                  required
=============== ===================================================== ==========
request_id      string (unique)                                       yes
timestamp       Arrow timestamp (any unit; naive means UTC) or int64  yes
                epoch milliseconds
model_version   string                                                yes
features        fixed_size_list or list of float16/32/64 ([D])        yes
probs           fixed_size_list or list of float ([C]) ...            one of
logits          ... or the same for raw logits (softmaxed on read)    the two
prediction      integer class index (argmax of probs when absent)     no
input_uri       string (where to re-read the input for retraining)    no
label           integer, nullable (ground truth logged inline)        no
=============== ===================================================== ==========

Label files: ``request_id`` string, ``label`` integer >= 0, ``labeled_at`` timestamp or int64
epoch milliseconds. Timestamps leave this module as float64 epoch seconds (UTC).

Two kinds of defect:

* file-level (checked from the footer only, before any row is used, in
  ``monitor.ingest.schema``): a missing or mistyped column, or a fixed-size list whose length
  matches no reference -> :class:`ContractError`; the caller quarantines the whole file.
* row-level (this module): a bad row is dropped and counted by reason in
  :class:`~monitor.ingest.rejections.RowRejections`, the rest of
  the file goes on. Reasons (``monitor.ingest.counters``), checked in this order (a row counts once, under its first reason):
  ``null_field``, ``non_finite``, ``feature_dim``, ``probs_length``, ``probs_invalid``,
  ``prediction_invalid`` (a logged prediction outside ``[0, C)``); labels: ``null_field``,
  ``label_invalid``.

A batch carries a single feature width D and class count C. Per row the expected (D, C) is
``expectations[model_version]`` when that version has a reference, otherwise the dims of the
file (fixed-size list type, or the first valid row the reader saw in this file, ``file_dims``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from monitor.ingest.counters import (
    FEATURE_DIM,
    LABEL_INVALID,
    NON_FINITE,
    NULL_FIELD,
    PREDICTION_INVALID,
    PROBS_INVALID,
    PROBS_LENGTH,
)
from monitor.ingest.records import InferenceBatch, LabelBatch
from monitor.ingest.rejections import RowRejections, classify_rows
from monitor.ingest.schema import InferenceLayout, LabelLayout

PROBS_TOLERANCE = 1e-3  # |sum(probs) - 1| allowed per row (float32 producers round)

_TIME_UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}


def _column(data: pa.RecordBatch | pa.Table, name: str) -> pa.Array:
    col = data.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _epoch_seconds(arr: pa.Array, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """(float64 epoch seconds with 0 for nulls, null mask)."""
    nulls = arr.is_null().to_numpy(zero_copy_only=False)
    ints = arr.cast(pa.int64()).fill_null(0).to_numpy()
    scale = 1e3 if unit == "epoch_ms" else _TIME_UNITS[unit]
    return ints.astype(np.float64) / scale, nulls


def _strings(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    return arr.to_numpy(zero_copy_only=False), arr.is_null().to_numpy(zero_copy_only=False)


@dataclass(frozen=True)
class _FloatLists:
    """A list<float> column flattened: ``values`` float32, row ``lengths`` and ``starts`` into values."""

    values: np.ndarray
    lengths: np.ndarray     # int64[n], 0 for null rows
    starts: np.ndarray      # int64[n]
    null: np.ndarray        # bool[n], the list itself is null
    bad: np.ndarray         # bool[n], some value is null, NaN or infinite

    @classmethod
    def of(cls, arr: pa.Array) -> "_FloatLists":
        n = len(arr)
        null = arr.is_null().to_numpy(zero_copy_only=False)
        lengths = pc.list_value_length(arr).fill_null(0).to_numpy().astype(np.int64)
        flat = pc.list_flatten(arr)  # skips null rows, honours slicing
        values = flat.cast(pa.float32()).to_numpy(zero_copy_only=False)  # null values -> NaN
        starts = np.cumsum(lengths) - lengths
        bad = np.zeros(n, dtype=bool)
        with np.errstate(over="ignore"):
            bad_values = ~np.isfinite(values)
        if bad_values.any():
            rows = np.repeat(np.arange(n), lengths)
            bad[rows[bad_values]] = True
        return cls(values, lengths, starts, null, bad)

    def matrix(self, rows: np.ndarray, width: int) -> np.ndarray:
        """float32[len(rows), width] for rows known to hold exactly ``width`` values."""
        if rows.shape[0] == 0:
            return np.zeros((0, width), dtype=np.float32)
        starts = self.starts[rows]
        if rows.shape[0] * width == self.values.shape[0] and np.all(np.diff(starts) == width) and starts[0] == 0:
            return self.values.reshape(rows.shape[0], width)  # common case: every row kept, no copy
        return self.values[starts[:, None] + np.arange(width)]


def _expected_dims(
    versions: pa.Array, expectations: Mapping[str, tuple[int, int]], default: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row expected (D, C): the version's reference dims, else the file's."""
    encoded = versions.dictionary_encode()
    table = [expectations.get(v, default) for v in encoded.dictionary.to_pylist()] or [default]
    lookup = np.asarray(table, dtype=np.int64).reshape(-1, 2)
    index = encoded.indices.fill_null(0).to_numpy().astype(np.int64)
    return lookup[index, 0], lookup[index, 1]


def _first_dims(features: _FloatLists, scores: _FloatLists, usable: np.ndarray) -> tuple[int, int]:
    ok = np.flatnonzero(usable)
    if ok.shape[0] == 0:
        return (0, 0)
    return int(features.lengths[ok[0]]), int(scores.lengths[ok[0]])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted, dtype=np.float32)
    return e / e.sum(axis=1, keepdims=True)


def to_inference_batch(
    batch: pa.RecordBatch | pa.Table,
    layout: InferenceLayout,
    *,
    path: str,
    first_row: int,
    expectations: Mapping[str, tuple[int, int]],
    file_dims: tuple[int, int] | None = None,
) -> tuple[InferenceBatch, RowRejections]:
    """Validate and convert rows to numpy; bad rows are dropped and counted (see module docstring).

    ``first_row`` is the file row index of ``batch[0]``. ``expectations`` maps model_version to
    its reference (D, C). ``file_dims`` is the (D, C) of the file's first valid row when a reader
    has seen it in an earlier chunk; otherwise the fixed-size type or this batch's first valid row.
    ``features``/``probs`` may be read-only views of the Arrow buffers (no copy when every row
    is kept): copy before modifying them in place.
    """
    n = batch.num_rows
    request_id, rid_null = _strings(_column(batch, "request_id"))
    timestamp, ts_null = _epoch_seconds(_column(batch, "timestamp"), layout.timestamp_unit)
    versions = _column(batch, "model_version")
    model_version, mv_null = _strings(versions)
    features = _FloatLists.of(_column(batch, "features"))
    scores = _FloatLists.of(_column(batch, layout.scores))

    null = rid_null | ts_null | mv_null | features.null | scores.null
    usable = ~null & ~features.bad & ~scores.bad
    dims = file_dims or (layout.feature_dim or 0, layout.class_dim or 0)
    if 0 in dims:
        first = _first_dims(features, scores, usable)
        dims = (dims[0] or first[0], dims[1] or first[1])
    want_d, want_c = _expected_dims(versions, expectations, dims)
    # One batch holds one (D, C): rows expecting other dims (another version's reference) are
    # checked against the batch's first usable row after the per-row expectation.
    wrong_d = (features.lengths != want_d) | (features.lengths == 0)
    wrong_c = (scores.lengths != want_c) | (scores.lengths < 1)
    ok_so_far = usable & ~wrong_d & ~wrong_c
    batch_d, batch_c = _first_dims(features, scores, ok_so_far)
    wrong_d |= ok_so_far & (features.lengths != batch_d)
    wrong_c |= ok_so_far & (scores.lengths != batch_c)

    keep, rejections = classify_rows(first_row, [
        (NULL_FIELD, _first_null_column([("request_id", rid_null), ("timestamp", ts_null), ("model_version", mv_null),
                                            ("features", features.null), (layout.scores, scores.null)]), null),
        (NON_FINITE, "features", features.bad),
        (NON_FINITE, layout.scores, scores.bad),
        (FEATURE_DIM, "features", wrong_d),
        (PROBS_LENGTH, layout.scores, wrong_c),
    ])
    rows = np.flatnonzero(keep)
    feats = features.matrix(rows, batch_d)
    raw = scores.matrix(rows, batch_c)
    probs = _softmax(raw.astype(np.float32)) if layout.scores == "logits" else raw
    invalid = np.zeros(n, dtype=bool)
    if layout.scores == "probs" and rows.shape[0]:
        invalid[rows] = (probs < 0).any(axis=1) | (np.abs(probs.sum(axis=1, dtype=np.float64) - 1.0) > PROBS_TOLERANCE)

    argmax = np.zeros(n, dtype=np.int64)
    if rows.shape[0]:
        argmax[rows] = probs.argmax(axis=1)
    prediction = argmax
    bad_pred = np.zeros(n, dtype=bool)
    if layout.has_prediction:
        logged = _column(batch, "prediction")
        pred_null = logged.is_null().to_numpy(zero_copy_only=False)
        values = logged.cast(pa.int64()).fill_null(0).to_numpy()
        prediction = np.where(pred_null, argmax, values)  # a null prediction falls back to argmax
        bad_pred = keep & ((prediction < 0) | (prediction >= max(batch_c, 1)))

    keep2, late = classify_rows(first_row, [(PROBS_INVALID, layout.scores, invalid), (PREDICTION_INVALID, "prediction", bad_pred)])
    keep &= keep2
    rejections = rejections.merge(late)
    final = np.flatnonzero(keep)
    if final.shape[0] != rows.shape[0]:  # indexing copies: only when the late checks dropped rows
        sub = np.isin(rows, final, assume_unique=True)
        feats, probs = feats[sub], probs[sub]

    input_uri = _strings(_column(batch, "input_uri"))[0][final] if layout.has_input_uri else None
    label = None
    if layout.has_label:
        raw_label = _column(batch, "label")
        label = raw_label.cast(pa.int64()).fill_null(-1).to_numpy()[final]
        label = np.where(label < 0, -1, label)
    out = InferenceBatch(
        source=path,
        first_row=first_row,
        request_id=request_id[final],
        timestamp=timestamp[final],
        model_version=model_version[final],
        features=np.ascontiguousarray(feats, dtype=np.float32),
        probs=np.ascontiguousarray(probs, dtype=np.float32),
        prediction=prediction[final].astype(np.int64),
        input_uri=input_uri,
        label=label,
    )
    return out, rejections


def _first_null_column(masks: Sequence[tuple[str, np.ndarray]]) -> str:
    """Name of the column that made the first null row null (for the quarantine record)."""
    any_null = np.logical_or.reduce([mask for _, mask in masks])
    if not any_null.any():
        return ""
    row = int(np.argmax(any_null))
    return next(name for name, mask in masks if mask[row])


def to_label_batch(
    batch: pa.RecordBatch | pa.Table, layout: LabelLayout, *, path: str, first_row: int
) -> tuple[LabelBatch, RowRejections]:
    """Validate and convert label rows; reasons ``null_field`` and ``label_invalid`` (negative)."""
    request_id, rid_null = _strings(_column(batch, "request_id"))
    labels = _column(batch, "label")
    label_null = labels.is_null().to_numpy(zero_copy_only=False)
    label = labels.cast(pa.int64()).fill_null(0).to_numpy()
    labeled_at, at_null = _epoch_seconds(_column(batch, "labeled_at"), layout.timestamp_unit)
    null_col = _first_null_column([("request_id", rid_null), ("label", label_null), ("labeled_at", at_null)])
    keep, rejections = classify_rows(first_row, [
        (NULL_FIELD, null_col, rid_null | label_null | at_null),
        (LABEL_INVALID, "label", label < 0),
    ])
    out = LabelBatch(source=path, request_id=request_id[keep], label=label[keep].astype(np.int64), labeled_at=labeled_at[keep])
    return out, rejections
