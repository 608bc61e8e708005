"""Recording (and optionally moving aside) log files that break the contract.

Decision: whole-file defects (``unreadable``, ``schema``, a fixed-size list whose length matches
no reference) quarantine the whole file before any of its rows is used: nothing in it can be
trusted. Row-level defects reject only those rows, because one bad row must not blind the
monitor to 10k good ones; the file goes on and is still recorded in the ``quarantine`` table
with the reason, the first bad row and column, so the producer can be fixed.

Quarantined files are never deleted. With ``quarantine_dir`` set they are moved there, under
``<quarantine_dir>/<kind>/<path relative to the log location>``; a failed move is recorded and
logged, and the file stays in place (its progress says "quarantined", so it is not re-read).
Keep ``quarantine_dir`` outside the log location (or under a name starting with ``_``, which the
tailer skips), or moved files would be discovered again. ``quarantine_dir`` may be a URI like the
log location (``s3://bucket/quarantine?endpoint_override=...``); a file is moved only within one
filesystem (for S3: the same endpoint and client options, a server-side copy then delete), so a
quarantine_dir elsewhere is recorded as not moved, with the reason in the log line.

The move happens at once while the record joins the open transaction: commit right after
:meth:`Quarantine.file` so a crash cannot leave a moved file without its record.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from monitor.configutil import redact_location
from monitor.errors import ContractError
from monitor.ingest.counters import QUARANTINED_FILES, REJECTED_ROWS
from monitor.ingest.rejections import RowRejections
from monitor.ingest.store import FileProgress, StateStore
from monitor.ingest.tail import FileInfo, resolve_filesystem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuarantineRecord:
    kind: str
    path: str
    reason: str
    column: str
    row: int | None              # first offending row within the file, when known
    rows: int | None             # rows rejected (whole file: rows not yet used; None if unknown)
    message: str
    moved_to: str | None         # where the file now is, when it was moved
    at: float                    # epoch seconds (injected clock)
    whole_file: bool


class Quarantine:
    """Writes into the store's open transaction; the caller commits with its cursor."""

    def __init__(self, store: StateStore, quarantine_dir: str | None, *, clock: Callable[[], float] = time.time):
        self.store = store
        self.quarantine_dir = quarantine_dir
        self.clock = clock

    def file(self, kind: str, file: FileInfo, error: ContractError, *, move: bool = True) -> QuarantineRecord:
        """Quarantine a whole file: record, mark progress "quarantined", count, move if configured.

        ``move=False`` leaves the move to :meth:`move`, for callers that commit the record first
        (the engine does: a crash between a move and its commit would leave a moved file with
        no record of why).
        """
        done = self.store.file_progress(kind).get(file.path)
        rows_done = done.rows_done if done else 0
        total = _row_count(file)
        rows = None if total is None else max(total - rows_done, 0)
        moved_to = self._move(kind, file) if self.quarantine_dir and move else None
        self.store.set_file_progress(kind, FileProgress(file.path, "quarantined", rows_done, file.size, file.mtime))
        self.store.add_counter(QUARANTINED_FILES, error.reason, 1)
        if rows:
            self.store.add_counter(REJECTED_ROWS, error.reason, rows)
        where = (f"moved to {moved_to}" if moved_to else "to be moved to quarantine_dir" if self.quarantine_dir and not move
                 else "left in place and skipped from now on")
        # the ContractError's message already says what to do about the producer
        log.warning("quarantined %s file %s: reason=%s column=%s row=%s; the file is %s: %s", kind, file.path,
                    error.reason, error.column or "-", "-" if error.row is None else error.row, where, error)
        return self._insert(QuarantineRecord(kind, file.path, error.reason, error.column, error.row, rows, str(error),
                                             moved_to, self.clock(), True))

    def move(self, kind: str, file: FileInfo) -> str | None:
        """Move a file already recorded by ``file(..., move=False)`` and note where it went."""
        if not self.quarantine_dir:
            return None
        moved_to = self._move(kind, file)
        if moved_to is not None:
            self.store.execute("UPDATE quarantine SET moved_to = ? WHERE kind = ? AND path = ? AND whole_file = 1",
                               (moved_to, kind, file.path))
            log.info("moved quarantined %s file %s to %s", kind, file.path, moved_to)
        return moved_to

    def rows(self, kind: str, file: FileInfo, rejections: RowRejections) -> QuarantineRecord | None:
        """Record row-level rejections of a file that otherwise goes on; counts each reason.

        Call it per chunk: a file keeps one row-level record (rows added up, first offender kept)
        and logs one WARNING, when its first bad row is seen.
        """
        if not rejections:
            return None
        for reason, n in rejections.counts.items():
            self.store.add_counter(REJECTED_ROWS, reason, n)
        existing = self.store.query(
            "SELECT id FROM quarantine WHERE kind = ? AND path = ? AND whole_file = 0", (kind, file.path))
        if existing:
            self.store.execute("UPDATE quarantine SET rows = rows + ? WHERE id = ?", (rejections.total, existing[0][0]))
            return self._read("WHERE id = ?", (existing[0][0],))[0]
        summary = ", ".join(f"{reason}={n}" for reason, n in sorted(rejections.counts.items()))
        message = (f"{file.path}: rows rejected ({summary} in the first chunk); first at row {rejections.first_row} "
                   f"column {rejections.first_column!r} ({rejections.first_reason})")
        log.warning("%s; the other rows are used. Fix the producer's %s values", message, rejections.first_column)
        return self._insert(QuarantineRecord(kind, file.path, rejections.first_reason, rejections.first_column,
                                             rejections.first_row, rejections.total, message, None, self.clock(), False))

    def records(self, limit: int = 100) -> list[QuarantineRecord]:
        """Newest first."""
        return self._read("ORDER BY id DESC LIMIT ?", (int(limit),))

    def _read(self, clause: str, params: tuple[object, ...]) -> list[QuarantineRecord]:
        rows = self.store.query(
            "SELECT kind, path, reason, column_name, row, rows, message, moved_to, at, whole_file FROM quarantine "
            + clause, params)
        return [QuarantineRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], float(r[8]), bool(r[9])) for r in rows]

    def _insert(self, rec: QuarantineRecord) -> QuarantineRecord:
        self.store.execute(
            "INSERT INTO quarantine (kind, path, reason, column_name, row, rows, message, moved_to, at, whole_file) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rec.kind, rec.path, rec.reason, rec.column, rec.row, rec.rows, rec.message, rec.moved_to, rec.at,
             int(rec.whole_file)))
        return rec

    def _move(self, kind: str, file: FileInfo) -> str | None:
        """Move the file under quarantine_dir; None (and a log line) when it cannot be moved."""
        source_fs = file.filesystem or pafs.LocalFileSystem()
        try:
            # quarantine_dir may be a URI with a query (s3://b/q?endpoint_override=...): the
            # kind and relative path join the path it resolves to, never the URI's text.
            target_fs, root = resolve_filesystem(self.quarantine_dir)
            target_path = _free_name(target_fs, f"{root.rstrip('/')}/{kind}/{file.relative}")
            if isinstance(source_fs, pafs.LocalFileSystem) and isinstance(target_fs, pafs.LocalFileSystem):
                os.makedirs(os.path.dirname(target_path), exist_ok=True)
                shutil.move(file.path, target_path)  # rename, or copy then unlink across devices
            elif source_fs.equals(target_fs):
                target_fs.create_dir(os.path.dirname(target_path), recursive=True)
                source_fs.move(file.path, target_path)  # object stores: server-side copy, then delete
            else:
                raise OSError("the log location and quarantine_dir are on different filesystems (or S3 "
                              "endpoints or options); files are moved only within one")
        except (OSError, ValueError, ContractError) as exc:
            log.warning("could not move quarantined file %s to quarantine_dir %s (%s); it stays in place and is skipped",
                        file.path, redact_location(self.quarantine_dir), exc)
            return None
        return target_path


def _free_name(fs: pafs.FileSystem, path: str) -> str:
    """``path``, or ``path.1``, ``path.2``... so an earlier quarantined file is never overwritten
    (an object store's move would replace it without a word)."""
    candidate, n = path, 0
    while fs.get_file_info(candidate).type != pafs.FileType.NotFound:
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def _row_count(file: FileInfo) -> int | None:
    """Rows in the file from its footer, or None when the footer cannot be read."""
    fs = file.filesystem or pafs.LocalFileSystem()
    try:
        with fs.open_input_file(file.path) as handle:
            return int(pq.read_metadata(handle).num_rows)
    except (pa.ArrowException, OSError):  # an unreadable footer is a common reason to be here
        return None
