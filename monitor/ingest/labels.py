"""Joining late ground truth to predictions by ``request_id``, whichever arrives first.

A prediction waits in ``pending_predictions`` until its label comes (or ``prediction_ttl``
passes); a label that arrives before its prediction waits in ``pending_labels`` (up to
``label_ttl``). A match becomes a row of ``labelled``: the accuracy signal and the retraining
data. All of it lives in the checkpoint database and joins its transaction, so joins are
exactly-once with the cursors.

Every age here is event time: measured against the stream's watermark (the newest prediction
timestamp accepted, passed in by the engine), never the wall clock, so a replay of logs stamped
months ago joins, waits, expires and is retained exactly as the live traffic was. A prediction's
age is ``watermark - timestamp``; an early label's is the watermark's advance since it arrived;
a joined row is kept for retraining while ``watermark - timestamp < labelled_retention``. With no
watermark yet (labels before any prediction) nothing ages. Joins are numbered (``join_seq``) so
"rows joined since the last retrain" needs no clock either.
"""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
from dataclasses import dataclass

import numpy as np

from monitor.ingest.config import IngestConfig
from monitor.ingest.counters import (
    DROPPED_OVER_CAP,
    DUPLICATE,
    EXPIRED,
    JOINED,
    LABELLED,
    LABELS,
    PREDICTIONS,
    PRUNED,
    UNMATCHED,
)
from monitor.ingest.records import InferenceBatch, JoinedLabel, LabelBatch
from monitor.ingest.store import JOIN_SEQ, StateStore, read_watermark

log = logging.getLogger(__name__)

# Which of a batch's request_ids are already known, in one statement over one JSON parameter.
_SEEN_OR_EARLY = """
WITH ids(v) AS (SELECT value FROM json_each(?))
SELECT v, 'pending_predictions', NULL, NULL FROM ids JOIN pending_predictions ON request_id = v
UNION ALL SELECT v, 'labelled', NULL, NULL FROM ids JOIN labelled ON request_id = v
UNION ALL SELECT v, 'pending_labels', label, labeled_at FROM ids JOIN pending_labels ON request_id = v
"""
_LABELLED_OR_WAITING = """
WITH ids(v) AS (SELECT value FROM json_each(?))
SELECT v FROM ids JOIN labelled ON request_id = v UNION ALL SELECT v FROM ids JOIN pending_labels ON request_id = v
"""

_LABELLED_COLUMNS = "request_id, model_version, timestamp, labeled_at, prediction, label, confidence, source, row, input_uri"


@dataclass(frozen=True)
class ExpiryCounts:
    labels_unmatched: int = 0        # labels whose prediction never came within label_ttl
    predictions_expired: int = 0     # predictions never labelled within prediction_ttl
    predictions_dropped: int = 0     # oldest pending predictions dropped over max_pending_predictions
    labels_dropped: int = 0          # oldest pending labels dropped over max_pending_labels
    labelled_pruned: int = 0         # joined rows older than labelled_retention_seconds

    @property
    def any(self) -> bool:
        return any(getattr(self, f) for f in self.__dataclass_fields__)


def _id_list(values: np.ndarray) -> list[str]:
    """The ids as a list of str (the contract reads them as str already: no per-row conversion)."""
    ids = values.tolist()
    if all(type(v) is str for v in ids):
        return ids
    return [str(v) for v in ids]


def _first_occurrence(ids: list[str]) -> np.ndarray:
    """bool mask: True for the first row of each distinct id."""
    first = np.ones(len(ids), dtype=bool)
    if len(set(ids)) == len(ids):  # the usual case: no repeats, no per-row loop
        return first
    seen: set[str] = set()
    for i, rid in enumerate(ids):
        if rid in seen:
            first[i] = False
        seen.add(rid)
    return first


class LabelJoiner:
    """Joins predictions and labels through the store's open transaction (commit is the caller's).

    ``event_time`` arguments are the engine's watermark (None before the first prediction)."""

    def __init__(self, store: StateStore, config: IngestConfig):
        self.store = store
        self.config = config
        mark = store.get_mark(JOIN_SEQ)
        self.join_seq = int(mark) if mark is not None else 0

    def _lookup(self, sql: str, ids: list[str]) -> list[tuple]:
        # json_each turns the whole batch into one indexed join instead of one query per row.
        return self.store.query(sql, (json.dumps(ids),))

    def add_predictions(self, batch: InferenceBatch, event_time: float | None = None
                        ) -> tuple[np.ndarray, list[JoinedLabel]]:
        """Store predictions to await labels; returns (duplicate mask, joins completed by early labels).

        A row is a duplicate when its request_id was seen before (pending or labelled) or earlier in
        this batch; duplicates are not stored (the engine rejects them as ``duplicate_request_id``).
        Labels logged inline (``batch.label`` >= 0) join at once, with ``labeled_at`` = timestamp.
        """
        n = len(batch)
        if n == 0:
            return np.zeros(0, dtype=bool), []
        ids = _id_list(batch.request_id)
        seen: set[str] = set()
        early: dict[str, tuple[int, float]] = {}
        for rid, table, label, labeled_at in self._lookup(_SEEN_OR_EARLY, ids):
            if table == "pending_labels":
                early[rid] = (int(label), float(labeled_at))
            else:
                seen.add(rid)
        duplicate = ~_first_occurrence(ids)
        if seen:
            duplicate |= np.fromiter((i in seen for i in ids), dtype=bool, count=n)
        has_label = np.zeros(n, dtype=bool)
        if early:
            has_label = np.fromiter((i in early for i in ids), dtype=bool, count=n)
        inline = batch.label if batch.label is not None else np.full(n, -1, dtype=np.int64)
        joins = ~duplicate & (has_label | (inline >= 0))
        wait = np.flatnonzero(~duplicate & ~joins)

        confidence = batch.probs.max(axis=1).astype(np.float64) if batch.probs.shape[1] else np.zeros(n)
        uris = batch.input_uri if batch.input_uri is not None else np.full(n, None, dtype=object)
        # arrived_at orders the pending buffer for its cap: event time, as everything here
        arrived = np.full(n, event_time) if event_time is not None else batch.timestamp
        self.store.executemany(
            "INSERT INTO pending_predictions (request_id, timestamp, model_version, prediction, confidence, source, row,"
            " input_uri, arrived_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            zip([ids[i] for i in wait.tolist()], batch.timestamp[wait].tolist(), batch.model_version[wait].tolist(),
                batch.prediction[wait].tolist(), confidence[wait].tolist(), itertools.repeat(batch.source),
                (batch.first_row + wait).tolist(), uris[wait].tolist(), arrived[wait].tolist()))
        joined = []
        for i in np.flatnonzero(joins).tolist():
            label, labeled_at = early.get(ids[i]) or (int(inline[i]), float(batch.timestamp[i]))
            joined.append(JoinedLabel(ids[i], str(batch.model_version[i]), float(batch.timestamp[i]), labeled_at,
                                      int(batch.prediction[i]), label, float(confidence[i]), batch.source,
                                      batch.first_row + i, None if uris[i] is None else str(uris[i])))
        if early:
            self.store.executemany("DELETE FROM pending_labels WHERE request_id = ?",
                                   [(j.request_id,) for j in joined if j.request_id in early])
        if joined:
            self._record(joined, event_time)
        return duplicate, joined

    def add_labels(self, batch: LabelBatch, event_time: float | None = None) -> list[JoinedLabel]:
        """Join labels with pending predictions; unmatched ones wait. Returns the completed joins.

        A label for a request_id already labelled or already waiting counts ("labels", "duplicate")
        and is ignored (the first label wins).
        """
        n = len(batch)
        if n == 0:
            return []
        ids = _id_list(batch.request_id)
        already = {r[0] for r in self._lookup(_LABELLED_OR_WAITING, ids)}
        fresh = _first_occurrence(ids)
        if already:
            fresh &= np.fromiter((i not in already for i in ids), dtype=bool, count=n)
        duplicates = n - int(fresh.sum())
        if duplicates:
            self.store.add_counter(LABELS, DUPLICATE, duplicates)
        keep = np.flatnonzero(fresh).tolist()
        preds = {r[0]: r[1:] for r in self._lookup(
            "SELECT p.request_id, p.model_version, p.timestamp, p.prediction, p.confidence, p.source, p.row, p.input_uri "
            "FROM json_each(?) j JOIN pending_predictions p ON p.request_id = j.value", [ids[i] for i in keep])}
        label = batch.label.tolist()
        at = batch.labeled_at.tolist()
        waiting, joined = [], []
        for i in keep:
            p = preds.get(ids[i])
            if p is None:
                # An early label's age counts from the watermark when it arrived (before any
                # prediction: from its own labeled_at, the only time it has).
                waiting.append((ids[i], label[i], at[i], at[i] if event_time is None else event_time))
            else:
                joined.append(JoinedLabel(ids[i], p[0], float(p[1]), float(at[i]), int(p[2]), int(label[i]), float(p[3]),
                                          p[4], int(p[5]), p[6]))
        self.store.executemany(
            "INSERT INTO pending_labels (request_id, label, labeled_at, arrived_at) VALUES (?, ?, ?, ?)", waiting)
        if joined:
            self.store.executemany("DELETE FROM pending_predictions WHERE request_id = ?",
                                   [(j.request_id,) for j in joined])
            self._record(joined, event_time)
        return joined

    def _record(self, joined: list[JoinedLabel], event_time: float | None) -> None:
        first = self.join_seq + 1
        self.join_seq += len(joined)
        self.store.executemany(
            f"INSERT INTO labelled ({_LABELLED_COLUMNS}, joined_at, join_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(j.request_id, j.model_version, j.timestamp, j.labeled_at, j.prediction, j.label, j.confidence, j.source,
              j.row, j.input_uri, j.timestamp if event_time is None else event_time, first + i)
             for i, j in enumerate(joined)])
        self.store.set_mark(JOIN_SEQ, self.join_seq)
        self.store.add_counter(LABELS, JOINED, len(joined))

    def expire(self, event_time: float | None) -> ExpiryCounts:
        """Apply TTLs and labelled retention against ``event_time`` (the watermark; None: only the
        pending caps apply) and the pending caps (oldest dropped first); counts each."""
        cfg = self.config
        aged = event_time is not None
        counts = ExpiryCounts(
            labels_unmatched=self._delete("DELETE FROM pending_labels WHERE arrived_at < ?",
                                          event_time - cfg.label_ttl_seconds) if aged else 0,
            predictions_expired=self._delete("DELETE FROM pending_predictions WHERE timestamp < ?",
                                             event_time - cfg.prediction_ttl_seconds) if aged else 0,
            predictions_dropped=self._cap("pending_predictions", cfg.max_pending_predictions),
            labels_dropped=self._cap("pending_labels", cfg.max_pending_labels),
            labelled_pruned=self._delete("DELETE FROM labelled WHERE timestamp < ?",
                                         event_time - cfg.labelled_retention_seconds) if aged else 0,
        )
        # Labels dropped over the cap never matched either: they count as unmatched (plus a warning).
        for name, key, value in ((LABELS, UNMATCHED, counts.labels_unmatched + counts.labels_dropped),
                                 (LABELS, DROPPED_OVER_CAP, counts.labels_dropped),
                                 (PREDICTIONS, EXPIRED, counts.predictions_expired),
                                 (PREDICTIONS, DROPPED_OVER_CAP, counts.predictions_dropped),
                                 (LABELLED, PRUNED, counts.labelled_pruned)):
            if value:
                self.store.add_counter(name, key, value)
        if counts.predictions_dropped or counts.labels_dropped:
            log.warning("label join buffers over their caps: dropped the oldest %d pending predictions and %d pending "
                        "labels; raise ingest.max_pending_* or lower the TTLs if labels come later than that",
                        counts.predictions_dropped, counts.labels_dropped)
        return counts

    def _delete(self, sql: str, cutoff: float) -> int:
        return self.store.execute(sql, (cutoff,))

    def _cap(self, table: str, cap: int) -> int:
        excess = self.store.query(f"SELECT COUNT(*) FROM {table}")[0][0] - cap
        if excess <= 0:
            return 0
        return self.store.execute(
            f"DELETE FROM {table} WHERE request_id IN (SELECT request_id FROM {table} ORDER BY arrived_at, request_id LIMIT ?)",
            (excess,))

    def pending_counts(self) -> tuple[int, int]:
        """(pending predictions, pending labels), e.g. for a gauge."""
        return (self.store.query("SELECT COUNT(*) FROM pending_predictions")[0][0],
                self.store.query("SELECT COUNT(*) FROM pending_labels")[0][0])


def labelled_rows(conn: sqlite3.Connection, *, since: float | None = None, until: float | None = None,
                  model_version: str | None = None, limit: int | None = None,
                  predicted_since: float | None = None) -> list[JoinedLabel]:
    """Joined rows with ``since <= labeled_at < until`` and prediction ``timestamp >= predicted_since``
    (event time: what lookbacks select on), oldest first; with ``limit``, the newest ``limit`` rows,
    newest first. Works on a read-only connection (``store.connect_readonly``)."""
    where, params = [], []
    for clause, value in (("labeled_at >= ?", since), ("labeled_at < ?", until), ("model_version = ?", model_version),
                          ("timestamp >= ?", predicted_since)):
        if value is not None:
            where.append(clause)
            params.append(value)
    sql = f"SELECT {_LABELLED_COLUMNS} FROM labelled"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if limit is not None:
        sql += " ORDER BY labeled_at DESC, request_id DESC LIMIT ?"
        params.append(int(limit))
    else:
        sql += " ORDER BY labeled_at, request_id"
    return [JoinedLabel(r[0], r[1], float(r[2]), float(r[3]), int(r[4]), int(r[5]), float(r[6]), r[7], int(r[8]), r[9])
            for r in conn.execute(sql, params)]


def count_labelled(conn: sqlite3.Connection, *, after_join: int = 0, predicted_since: float | None = None,
                   model_version: str | None = None) -> int:
    """Joined rows still retained whose join came after join number ``after_join`` (0: all), whose
    prediction ``timestamp >= predicted_since`` (event time) and of ``model_version`` when given.

    The daemon counts "new labelled rows since the last retrain" by join number, so late or
    backfilled labels count as new whatever their timestamps say, and no clock is involved."""
    where, params = ["join_seq > ?"], [int(after_join)]
    for clause, value in (("timestamp >= ?", predicted_since), ("model_version = ?", model_version)):
        if value is not None:
            where.append(clause)
            params.append(value)
    sql = "SELECT COUNT(*) FROM labelled WHERE " + " AND ".join(where)
    return int(conn.execute(sql, params).fetchone()[0])


def window_accuracy(conn: sqlite3.Connection, model_version: str, start: float, end: float) -> tuple[int, int]:
    """(labelled rows, correct) among the joined predictions of ``model_version`` made in
    ``[start, end]`` (event time): a window's own accuracy, once its labels have arrived."""
    n, hits = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(prediction = label), 0) FROM labelled "
        "WHERE model_version = ? AND timestamp >= ? AND timestamp <= ?", (model_version, start, end)).fetchone()
    return int(n), int(hits)


def prediction_watermark(conn: sqlite3.Connection) -> float | None:
    """The stream's own clock: the engine's persisted watermark (``store.read_watermark``), or for
    a checkpoint written before it existed the newest prediction timestamp the store holds
    (joined or still waiting for its label); None when it holds none."""
    mark = read_watermark(conn)
    if mark is not None:
        return mark
    row = conn.execute(
        "SELECT MAX(t) FROM (SELECT MAX(timestamp) AS t FROM labelled UNION ALL "
        "SELECT MAX(timestamp) FROM pending_predictions)").fetchone()
    return None if row is None or row[0] is None else float(row[0])


def labelled_rows_by_prediction_time(conn: sqlite3.Connection, *, since: float, until: float | None = None,
                                     limit: int | None = None) -> list[JoinedLabel]:
    """Joined rows predicted in ``since <= timestamp <= until``, newest prediction first (at most
    ``limit``). Selecting on prediction time, not on the producer's ``labeled_at``, keeps a replay
    of old logs or a late label batch inside the window its predictions belong to."""
    sql = f"SELECT {_LABELLED_COLUMNS} FROM labelled WHERE timestamp >= ?"
    params: list[float | int] = [since]
    if until is not None:
        sql += " AND timestamp <= ?"
        params.append(until)
    sql += " ORDER BY timestamp DESC, request_id DESC"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    return [JoinedLabel(r[0], r[1], float(r[2]), float(r[3]), int(r[4]), int(r[5]), float(r[6]), r[7], int(r[8]), r[9])
            for r in conn.execute(sql, params)]
