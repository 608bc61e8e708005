"""Joining late ground truth to predictions by ``request_id``, whichever arrives first.

A prediction waits in ``pending_predictions`` until its label comes (or ``prediction_ttl``
passes); a label that arrives before its prediction waits in ``pending_labels`` (up to
``label_ttl``). A match becomes a row of ``labelled``: the accuracy signal and the retraining
data. All of it lives in the checkpoint database and joins its transaction, so joins are
exactly-once with the cursors. Ages for the TTLs are measured from when driftd read the row
(the injected clock), so replaying old logs does not expire everything at once; labelled rows
are pruned by ``labeled_at``.
"""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from monitor.config import IngestConfig
from monitor.ingest.records import InferenceBatch, JoinedLabel, LabelBatch
from monitor.ingest.store import StateStore

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
    """Joins predictions and labels through the store's open transaction (commit is the caller's)."""

    def __init__(self, store: StateStore, config: IngestConfig, *, clock: Callable[[], float] = time.time):
        self.store = store
        self.config = config
        self.clock = clock

    def _lookup(self, sql: str, ids: list[str]) -> list[tuple]:
        # json_each turns the whole batch into one indexed join instead of one query per row.
        return self.store.query(sql, (json.dumps(ids),))

    def add_predictions(self, batch: InferenceBatch) -> tuple[np.ndarray, list[JoinedLabel]]:
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
        now = self.clock()
        self.store.executemany(
            "INSERT INTO pending_predictions (request_id, timestamp, model_version, prediction, confidence, source, row,"
            " input_uri, arrived_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            zip([ids[i] for i in wait.tolist()], batch.timestamp[wait].tolist(), batch.model_version[wait].tolist(),
                batch.prediction[wait].tolist(), confidence[wait].tolist(), itertools.repeat(batch.source),
                (batch.first_row + wait).tolist(), uris[wait].tolist(), itertools.repeat(now)))
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
            self._record(joined)
        return duplicate, joined

    def add_labels(self, batch: LabelBatch) -> list[JoinedLabel]:
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
            self.store.add_counter("labels", "duplicate", duplicates)
        keep = np.flatnonzero(fresh).tolist()
        preds = {r[0]: r[1:] for r in self._lookup(
            "SELECT p.request_id, p.model_version, p.timestamp, p.prediction, p.confidence, p.source, p.row, p.input_uri "
            "FROM json_each(?) j JOIN pending_predictions p ON p.request_id = j.value", [ids[i] for i in keep])}
        label = batch.label.tolist()
        at = batch.labeled_at.tolist()
        now = self.clock()
        waiting, joined = [], []
        for i in keep:
            p = preds.get(ids[i])
            if p is None:
                waiting.append((ids[i], label[i], at[i], now))
            else:
                joined.append(JoinedLabel(ids[i], p[0], float(p[1]), float(at[i]), int(p[2]), int(label[i]), float(p[3]),
                                          p[4], int(p[5]), p[6]))
        self.store.executemany(
            "INSERT INTO pending_labels (request_id, label, labeled_at, arrived_at) VALUES (?, ?, ?, ?)", waiting)
        if joined:
            self.store.executemany("DELETE FROM pending_predictions WHERE request_id = ?",
                                   [(j.request_id,) for j in joined])
            self._record(joined)
        return joined

    def _record(self, joined: list[JoinedLabel]) -> None:
        now = self.clock()
        self.store.executemany(
            f"INSERT INTO labelled ({_LABELLED_COLUMNS}, joined_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(j.request_id, j.model_version, j.timestamp, j.labeled_at, j.prediction, j.label, j.confidence, j.source,
              j.row, j.input_uri, now) for j in joined])
        self.store.add_counter("labels", "joined", len(joined))

    def expire(self) -> ExpiryCounts:
        """Apply TTLs, pending caps (oldest dropped first) and labelled retention; counts each."""
        now = self.clock()
        cfg = self.config
        counts = ExpiryCounts(
            labels_unmatched=self._delete("DELETE FROM pending_labels WHERE arrived_at < ?", now - cfg.label_ttl_seconds),
            predictions_expired=self._delete("DELETE FROM pending_predictions WHERE arrived_at < ?",
                                             now - cfg.prediction_ttl_seconds),
            predictions_dropped=self._cap("pending_predictions", cfg.max_pending_predictions),
            labels_dropped=self._cap("pending_labels", cfg.max_pending_labels),
            labelled_pruned=self._delete("DELETE FROM labelled WHERE labeled_at < ?", now - cfg.labelled_retention_seconds),
        )
        # Labels dropped over the cap never matched either: they count as unmatched (plus a warning).
        for name, key, value in (("labels", "unmatched", counts.labels_unmatched + counts.labels_dropped),
                                 ("labels", "dropped_over_cap", counts.labels_dropped),
                                 ("predictions", "expired", counts.predictions_expired),
                                 ("predictions", "dropped_over_cap", counts.predictions_dropped),
                                 ("labelled", "pruned", counts.labelled_pruned)):
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
                  model_version: str | None = None, limit: int | None = None) -> list[JoinedLabel]:
    """Joined rows with ``since <= labeled_at < until``, oldest first; with ``limit``, the newest
    ``limit`` rows, newest first. Works on a read-only connection (``store.connect_readonly``)."""
    where, params = [], []
    for clause, value in (("labeled_at >= ?", since), ("labeled_at < ?", until), ("model_version = ?", model_version)):
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


def count_labelled(conn: sqlite3.Connection, since: float | None = None) -> int:
    """Number of rows joined (by driftd's clock) at or after ``since`` (all when None).

    The daemon compares with its own last-retrain time, so the count uses driftd's clock rather
    than the producer's ``labeled_at``: late or backfilled labels still count as new."""
    if since is None:
        return int(conn.execute("SELECT COUNT(*) FROM labelled").fetchone()[0])
    return int(conn.execute("SELECT COUNT(*) FROM labelled WHERE joined_at >= ?", (since,)).fetchone()[0])


def prediction_watermark(conn: sqlite3.Connection) -> float | None:
    """The newest prediction timestamp the store holds (joined or still waiting for its label),
    or None when it holds none: the stream's own clock, as far as the state store can tell."""
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
