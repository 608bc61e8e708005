"""The producer side: what an inference service calls to log predictions (and labels) for driftd.

About ten lines in a service::

    import atexit, time
    from monitor.ingest.writer import LogWriter

    log = LogWriter("/var/log/model/inference", roll_rows=10_000, roll_seconds=60, flush_interval=10)
    atexit.register(log.close)

    def predict(batch):                                  # batch.images: [B, 3, H, W]
        feats = model.forward_head(model.forward_features(batch.images), pre_logits=True)  # [B, D]
        probs = model.get_classifier()(feats).softmax(-1)                               # [B, C]
        log.write_batch(request_id=batch.ids, timestamp=time.time(), model_version="v3",
                        features=feats.cpu().numpy(), probs=probs.cpu().numpy(), input_uri=batch.uris)
        return probs.argmax(-1)

Rows are buffered and written as one Parquet file per roll (``roll_rows`` rows, or
``roll_seconds`` after the first buffered row, checked on every write and by the optional
background thread every ``flush_interval`` seconds; ``flush()``/``close()`` write what is
buffered). Each file is written under a temporary name starting with ``.`` (which driftd never
reads) and renamed when complete to ``{prefix}-{UTC %Y%m%dT%H%M%S%fZ}-{seq:06d}.parquet``, so
a reader never sees half a file and names sort in time order.

Inputs are validated on write, so a bad row fails in the service with an error naming it rather
than being dropped later by driftd: features finite with the width D of the first row ever
written, probs (or logits) finite with C entries, probs non-negative and summing to 1.
Timestamps are float epoch seconds or ``datetime`` (naive means UTC), stored as
``timestamp[ms, UTC]``. All methods are thread-safe.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from monitor.ingest.contract import PROBS_TOLERANCE

log = logging.getLogger(__name__)

_UTC_MS = pa.timestamp("ms", tz="UTC")


def _row_name(i: int, ids: Sequence[str], single: bool) -> str:
    who = f"request_id {ids[i]!r}" if i < len(ids) else f"row {i}"
    return who if single else f"row {i} ({who})"


def _per_row(value: Any, n: int, name: str) -> list[Any]:
    """A scalar broadcast to n rows, or a sequence of exactly n values."""
    if value is None or isinstance(value, (str, bytes, int, float, dt.datetime, np.generic)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name}: got {len(values)} values for {n} rows")
    return values


def _epoch_ms(values: Any, ids: Sequence[str], single: bool, name: str) -> np.ndarray:
    """int64 epoch milliseconds from epoch seconds / datetimes (a list, or a numeric array at numpy speed)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiu":
        seconds = values.astype(np.float64)
        bad = ~np.isfinite(seconds)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{_row_name(i, ids, single)}: {name} must be epoch seconds or a datetime, got {seconds[i]!r}")
        return np.round(seconds * 1000.0).astype(np.int64)
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        if isinstance(v, dt.datetime):
            v = (v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)).timestamp()
        elif isinstance(v, np.datetime64):
            v = v.astype("datetime64[ms]").astype(np.int64) / 1e3
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
            raise ValueError(f"{_row_name(i, ids, single)}: {name} must be epoch seconds or a datetime, got {v!r}")
        out[i] = round(float(v) * 1000.0)
    return out


def _float_rows(values: Any, n: int, width: int | None, name: str, ids: Sequence[str], single: bool) -> np.ndarray:
    """float32[n, width] from a [n, width] array-like (or [width] when single), naming the bad row."""
    if single:
        values = [values]
    if not isinstance(values, np.ndarray):
        rows = list(values)
        if len(rows) != n:
            raise ValueError(f"{name}: got {len(rows)} rows for {n} request_ids")
        want = width if width is not None else (int(np.size(rows[0])) if rows else 0)
        for i, r in enumerate(rows):
            if np.ndim(r) != 1 or len(r) != want:
                raise ValueError(f"{_row_name(i, ids, single)}: {name} has {np.size(r)} values, expected {want}"
                                 + (" (fixed by the first row this writer logged)" if width is not None else ""))
        values = np.asarray(rows, dtype=np.float32).reshape(n, want)
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"{name}: expected shape [{n}, D], got {list(arr.shape)}")
    if width is not None and arr.shape[1] != width:
        raise ValueError(f"{_row_name(0, ids, single)}: {name} has {arr.shape[1]} values, expected {width} "
                         "(fixed by the first row this writer logged)")
    if arr.shape[1] == 0:
        raise ValueError(f"{name}: rows must not be empty")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise ValueError(f"{_row_name(int(np.argmax(bad)), ids, single)}: {name} contains NaN or infinity")
    return arr


def _fixed_lists(rows: list[np.ndarray]) -> pa.Array:
    matrix = np.concatenate(rows, axis=0)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), matrix.shape[1])


class _RollingWriter:
    """Buffers rows, writes one Parquet file per roll through a temporary name and a rename."""

    def __init__(self, location: str | os.PathLike[str], *, prefix: str, roll_rows: int, roll_seconds: float,
                 clock: Callable[[], float], filesystem: pafs.FileSystem | None, flush_interval: float | None):
        if roll_rows < 1 or roll_seconds <= 0:
            raise ValueError(f"roll_rows must be >= 1 and roll_seconds > 0, got {roll_rows} and {roll_seconds}")
        if not prefix or "/" in prefix or prefix.startswith((".", "_")):
            raise ValueError(f"prefix {prefix!r} must be non-empty, without '/', not starting with '.' or '_'")
        location = os.fspath(location)
        if filesystem is not None:
            self._fs, self._root = filesystem, location
        elif "://" in location:
            self._fs, self._root = pafs.FileSystem.from_uri(location)
        else:
            self._fs, self._root = pafs.LocalFileSystem(), os.path.abspath(location)
        self._fs.create_dir(self._root, recursive=True)
        self._prefix = prefix
        self._roll_rows = roll_rows
        self._roll_seconds = roll_seconds
        self._clock = clock
        self._lock = threading.RLock()
        self._seq = 0
        self._closed = False
        self._reset()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if flush_interval is not None:
            if flush_interval <= 0:
                raise ValueError(f"flush_interval must be > 0 seconds, got {flush_interval}")
            self._thread = threading.Thread(target=self._flush_loop, args=(flush_interval,), daemon=True,
                                            name=f"driftd-{prefix}-flusher")
            self._thread.start()

    # subclasses: the buffered columns and how to turn them into a table
    def _reset(self) -> None:
        self._rows = 0
        self._first_at: float | None = None

    def _table(self) -> pa.Table:
        raise NotImplementedError

    @property
    def files_written(self) -> int:
        return self._seq

    def _appended(self, n: int) -> None:
        """Call with the lock held after buffering n rows."""
        if self._first_at is None:
            self._first_at = self._clock()
        self._rows += n
        self._roll_if_due()

    def _roll_if_due(self) -> None:
        if self._rows and (self._rows >= self._roll_rows or self._clock() - (self._first_at or 0.0) >= self._roll_seconds):
            self._write_file()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self._root}: writer is closed")

    def _write_file(self) -> None:
        table = self._table()
        now = dt.datetime.fromtimestamp(self._clock(), tz=dt.timezone.utc)
        self._seq += 1
        name = f"{self._prefix}-{now:%Y%m%dT%H%M%S%f}Z-{self._seq:06d}.parquet"
        final = f"{self._root.rstrip('/')}/{name}"
        temp = f"{self._root.rstrip('/')}/.{name}.tmp"
        if isinstance(self._fs, pafs.LocalFileSystem):
            with open(temp, "wb") as handle:
                pq.write_table(table, handle)
                handle.flush()
                os.fsync(handle.fileno())  # the rename must never expose a file whose bytes are not on disk
            os.replace(temp, final)
        else:
            with self._fs.open_output_stream(temp) as stream:
                pq.write_table(table, stream)
            self._fs.move(temp, final)
        self._reset()

    def flush(self) -> None:
        """Write every buffered row to a file now."""
        with self._lock:
            if self._rows:
                self._write_file()

    def close(self) -> None:
        """Flush and stop the background flusher; later writes raise ValueError. Idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if not self._closed:
                self.flush()
                self._closed = True

    def _flush_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                with self._lock:
                    self._roll_if_due()
            except Exception:  # noqa: BLE001 - one catch point: the service must keep serving
                log.exception("driftd log writer could not write %s; rows stay buffered and are retried", self._root)

    def __enter__(self) -> "_RollingWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LogWriter(_RollingWriter):
    """Writes inference rows following the log contract (see the module docstring)."""

    def __init__(self, location: str | os.PathLike[str], *, prefix: str = "part", roll_rows: int = 10_000,
                 roll_seconds: float = 60.0, clock: Callable[[], float] = time.time,
                 filesystem: pafs.FileSystem | None = None, flush_interval: float | None = None):
        self._dims: tuple[int, int] | None = None
        self._scores: str | None = None
        super().__init__(location, prefix=prefix, roll_rows=roll_rows, roll_seconds=roll_seconds, clock=clock,
                         filesystem=filesystem, flush_interval=flush_interval)

    def _reset(self) -> None:
        super()._reset()
        self._buf: dict[str, list[Any]] = {k: [] for k in
                                           ("request_id", "timestamp", "model_version", "features", "scores",
                                            "prediction", "input_uri", "label")}

    def write(self, request_id: str, timestamp: float | dt.datetime, model_version: str, features: Any,
              probs: Any = None, logits: Any = None, prediction: int | None = None, input_uri: str | None = None,
              label: int | None = None) -> None:
        """Log one prediction; ``features`` [D], ``probs`` or ``logits`` [C]. Raises ValueError naming the row."""
        self._add([request_id], timestamp, model_version, features, probs, logits,
                  None if prediction is None else [prediction], input_uri, None if label is None else [label],
                  single=True)

    def write_batch(self, request_id: Sequence[str], timestamp: Any, model_version: Any, features: Any,
                    probs: Any = None, logits: Any = None, prediction: Any = None, input_uri: Any = None,
                    label: Any = None) -> None:
        """Log n predictions: arrays/sequences of n (``features`` [n, D], ``probs``/``logits`` [n, C]);
        ``timestamp``, ``model_version`` and ``input_uri`` may be scalars. None in ``label`` means unknown."""
        self._add(request_id, timestamp, model_version, features, probs, logits, prediction, input_uri, label,
                  single=False)

    def _add(self, request_id: Any, timestamp: Any, model_version: Any, features: Any, probs: Any, logits: Any,
             prediction: Any, input_uri: Any, label: Any, *, single: bool) -> None:
        ids = [str(r) if isinstance(r, (str, np.str_)) else r for r in request_id]
        n = len(ids)
        for i, r in enumerate(ids):
            if not isinstance(r, str) or not r:
                raise ValueError(f"row {i}: request_id must be a non-empty string, got {r!r}")
        if (probs is None) == (logits is None):
            raise ValueError("pass exactly one of probs or logits")
        if n == 0:
            return
        kind = "probs" if probs is not None else "logits"
        with self._lock:
            self._check_open()
            if self._scores is not None and kind != self._scores:
                raise ValueError(f"this writer logs {self._scores}; got {kind} (one file holds one kind of scores)")
            if isinstance(timestamp, np.ndarray) and timestamp.ndim == 1 and timestamp.shape[0] != n:
                raise ValueError(f"timestamp: got {timestamp.shape[0]} values for {n} rows")
            stamps = timestamp if isinstance(timestamp, np.ndarray) and timestamp.ndim == 1 else _per_row(timestamp, n, "timestamp")
            times = _epoch_ms(stamps, ids, single, "timestamp")
            versions = _per_row(model_version, n, "model_version")
            for i, v in enumerate(versions):
                if not isinstance(v, str) or not v:
                    raise ValueError(f"{_row_name(i, ids, single)}: model_version must be a non-empty string, got {v!r}")
            feats = _float_rows(features, n, None if self._dims is None else self._dims[0], "features", ids, single)
            scores = _float_rows(probs if probs is not None else logits, n,
                                 None if self._dims is None else self._dims[1], kind, ids, single)
            if kind == "probs":
                bad = (scores < 0).any(axis=1) | (np.abs(scores.sum(axis=1, dtype=np.float64) - 1) > PROBS_TOLERANCE)
                if bad.any():
                    raise ValueError(f"{_row_name(int(np.argmax(bad)), ids, single)}: probs must be >= 0 and sum to 1 "
                                     "(pass logits= to log raw scores)")
            preds = scores.argmax(axis=1) if prediction is None else np.asarray(list(prediction), dtype=np.int64)
            if preds.shape != (n,) or ((preds < 0) | (preds >= scores.shape[1])).any():
                raise ValueError(f"prediction: expected {n} class indices in [0, {scores.shape[1]})")
            labels = _per_row(label, n, "label")
            for i, lab in enumerate(labels):
                if lab is not None and (isinstance(lab, bool) or not isinstance(lab, (int, np.integer))):
                    raise ValueError(f"{_row_name(i, ids, single)}: label must be an int or None, got {lab!r}")
            self._dims = (feats.shape[1], scores.shape[1])
            self._scores = kind
            b = self._buf
            b["request_id"] += ids
            b["timestamp"].append(times)
            b["model_version"] += versions
            b["features"].append(feats)
            b["scores"].append(scores)
            b["prediction"].append(preds)
            b["input_uri"] += _per_row(input_uri, n, "input_uri")
            b["label"] += [None if lab is None or lab < 0 else int(lab) for lab in labels]
            self._appended(n)

    def _table(self) -> pa.Table:
        b = self._buf
        return pa.table({
            "request_id": pa.array(b["request_id"], pa.string()),
            "timestamp": pa.array(np.concatenate(b["timestamp"]), pa.int64()).cast(_UTC_MS),
            "model_version": pa.array(b["model_version"], pa.string()),
            "features": _fixed_lists(b["features"]),
            self._scores or "probs": _fixed_lists(b["scores"]),
            "prediction": pa.array(np.concatenate(b["prediction"]), pa.int64()),
            "input_uri": pa.array(b["input_uri"], pa.string()),
            "label": pa.array(b["label"], pa.int64()),
        })


class LabelWriter(_RollingWriter):
    """Writes ground-truth rows (``request_id``, ``label`` >= 0, ``labeled_at``) the same way."""

    def __init__(self, location: str | os.PathLike[str], *, prefix: str = "labels", roll_rows: int = 10_000,
                 roll_seconds: float = 60.0, clock: Callable[[], float] = time.time,
                 filesystem: pafs.FileSystem | None = None, flush_interval: float | None = None):
        super().__init__(location, prefix=prefix, roll_rows=roll_rows, roll_seconds=roll_seconds, clock=clock,
                         filesystem=filesystem, flush_interval=flush_interval)

    def _reset(self) -> None:
        super()._reset()
        self._ids: list[str] = []
        self._labels: list[int] = []
        self._at: list[np.ndarray] = []

    def write(self, request_id: str, label: int, labeled_at: float | dt.datetime) -> None:
        self.write_batch([request_id], [label], labeled_at)

    def write_batch(self, request_id: Sequence[str], label: Sequence[int], labeled_at: Any) -> None:
        """``labeled_at`` may be one time for all rows. Raises ValueError naming the bad row."""
        ids = list(request_id)
        if not ids:
            return
        labels = _per_row(label, len(ids), "label")
        for i, (r, lab) in enumerate(zip(ids, labels)):
            if not isinstance(r, str) or not r:
                raise ValueError(f"row {i}: request_id must be a non-empty string, got {r!r}")
            if isinstance(lab, bool) or not isinstance(lab, (int, np.integer)) or lab < 0:
                raise ValueError(f"{_row_name(i, ids, False)}: label must be an int >= 0, got {lab!r}")
        times = _epoch_ms(_per_row(labeled_at, len(ids), "labeled_at"), ids, False, "labeled_at")
        with self._lock:
            self._check_open()
            self._ids += ids
            self._labels += [int(x) for x in labels]
            self._at.append(times)
            self._appended(len(ids))

    def _table(self) -> pa.Table:
        return pa.table({
            "request_id": pa.array(self._ids, pa.string()),
            "label": pa.array(self._labels, pa.int64()),
            "labeled_at": pa.array(np.concatenate(self._at), pa.int64()).cast(_UTC_MS),
        })
