"""The checkpoint: one SQLite file (``state_dir/state.db``) holding everything driftd must not lose.

Read cursors (per file progress), cumulative counters, the engine's signal state (blobs), the
quarantine record and the label-join buffers live in one database, written through one
connection in explicit transactions. Everything written between two :meth:`StateStore.commit`
calls becomes durable together (WAL, ``synchronous=FULL``), so a crash or ``kill -9`` anywhere
rolls all of it back to the last commit: a chunk's rows are either counted and past the cursor,
or neither, which is what makes ingestion exactly-once.

Other processes (the retrain job, ``driftd status``) read through :func:`connect_readonly`;
WAL lets them read a consistent snapshot while the daemon writes (all on one host: SQLite's WAL
shares memory between them, which network filesystems cannot provide).

Opening runs SQLite's ``quick_check``, so a corrupt page anywhere is refused at start-up with the
restore message instead of failing cycles later; ``monitor.ingest.faults`` names the state faults
(full filesystem, corruption, I/O) that make a running cycle fail. One writer per state directory:
``monitor.ingest.claim`` holds its lock.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from monitor.errors import StateError
from monitor.ingest.claim import adopt_claim, take_lock

SCHEMA_VERSION = 3  # 2: labelled.joined_at; 3: marks, labelled.join_seq, event-time indexes
DB_NAME = "state.db"

FileStatus = Literal["partial", "done", "quarantined"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (schema_version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS file_progress (
    kind TEXT NOT NULL, path TEXT NOT NULL, status TEXT NOT NULL,
    rows_done INTEGER NOT NULL, size INTEGER NOT NULL, mtime REAL NOT NULL,
    PRIMARY KEY (kind, path)
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT NOT NULL, key TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (name, key)
);
CREATE TABLE IF NOT EXISTS blobs (name TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, path TEXT NOT NULL,
    reason TEXT NOT NULL, column_name TEXT NOT NULL, row INTEGER, rows INTEGER,
    message TEXT NOT NULL, moved_to TEXT, at REAL NOT NULL, whole_file INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_predictions (
    request_id TEXT PRIMARY KEY, timestamp REAL NOT NULL, model_version TEXT NOT NULL,
    prediction INTEGER NOT NULL, confidence REAL NOT NULL, source TEXT NOT NULL,
    row INTEGER NOT NULL, input_uri TEXT, arrived_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_predictions_arrived ON pending_predictions (arrived_at);
CREATE TABLE IF NOT EXISTS pending_labels (
    request_id TEXT PRIMARY KEY, label INTEGER NOT NULL, labeled_at REAL NOT NULL, arrived_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_labels_arrived ON pending_labels (arrived_at);
CREATE TABLE IF NOT EXISTS labelled (
    request_id TEXT PRIMARY KEY, model_version TEXT NOT NULL, timestamp REAL NOT NULL,
    labeled_at REAL NOT NULL, prediction INTEGER NOT NULL, label INTEGER NOT NULL,
    confidence REAL NOT NULL, source TEXT NOT NULL, row INTEGER NOT NULL, input_uri TEXT,
    joined_at REAL NOT NULL DEFAULT 0, join_seq INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS labelled_labeled_at ON labelled (labeled_at);
CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, value REAL NOT NULL);
"""
# Created after any migration: they name columns a version-1/2 table only has once migrated.
_INDEXES = """
CREATE INDEX IF NOT EXISTS labelled_timestamp ON labelled (timestamp);
CREATE INDEX IF NOT EXISTS labelled_join_seq ON labelled (join_seq);
CREATE INDEX IF NOT EXISTS pending_predictions_timestamp ON pending_predictions (timestamp);
"""
WATERMARK = "watermark"   # newest prediction timestamp accepted: the stream's own clock (epoch s)
JOIN_SEQ = "join_seq"     # joins so far: labelled.join_seq counts up from 1, whatever any clock says


@dataclass(frozen=True)
class FileProgress:
    """How far a log file has been consumed: ``rows_done`` rows are applied and committed."""

    path: str
    status: FileStatus
    rows_done: int
    size: int
    mtime: float


def restore_hint(path: Path) -> str:
    return f"restore {path.name} from a backup, or move it away to start from scratch (all log files will be re-read)"


def _corrupt(path: Path, exc: Exception | str) -> StateError:
    return StateError(f"{path}: checkpoint database is unreadable ({exc}); {restore_hint(path)}")


# How many of quick_check's messages the refusal quotes (it lists every damaged page).
_QUICK_CHECK_SHOWN = 3


class StateStore:
    """One writer connection to ``state.db``.

    Calls are serialised by a lock, so another thread (e.g. the HTTP API reading counters) may
    use it while the cycle writes, and sees the cycle's uncommitted writes. Processes other than
    the daemon use :func:`connect_readonly` instead.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, owner: IO[str] | None = None):
        self._conn = conn
        self._lock = threading.RLock()
        self.path = path
        self._owner = owner  # holds the state directory's flock while open
        self._commit_listeners: list[Callable[[], None]] = []

    @classmethod
    def open(cls, state_dir: Path) -> "StateStore":
        """Create or open ``state_dir/state.db``; raises StateError if corrupt or from a newer driftd."""
        state_dir = Path(state_dir)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"{state_dir}: cannot create state directory: {exc.strerror}; fix its permissions or point state_dir elsewhere") from None
        owner = adopt_claim(state_dir) or take_lock(state_dir)
        path = state_dir / DB_NAME
        # isolation_level=None: we issue BEGIN ourselves so a transaction spans exactly commit() to commit().
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            # The request_id B-trees are written at random; a larger page cache keeps joins near 100k rows/s.
            conn.execute("PRAGMA cache_size=-65536")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            row = conn.execute("SELECT schema_version FROM meta").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta (schema_version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] < SCHEMA_VERSION:
                _migrate(conn, row[0])
            elif row[0] > SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                conn.close()
                owner.close()
                raise StateError(
                    f"{path}: checkpoint has schema version {row[0]} but this driftd understands up to "
                    f"{SCHEMA_VERSION}; it was written by a newer driftd: upgrade driftd or point state_dir elsewhere"
                )
            for statement in _INDEXES.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("COMMIT")
            # A damaged page in the middle of the file passes the statements above; quick_check
            # reads every page (O(size), without the index cross-checks of integrity_check).
            problems = [line for r in conn.execute("PRAGMA quick_check").fetchall()
                        for line in str(r[0]).splitlines() if line.strip() and not line.startswith("***")]
        except sqlite3.DatabaseError as exc:
            conn.close()
            owner.close()
            raise _corrupt(path, exc) from None
        if problems != ["ok"]:  # one "ok", or one line per damaged page
            conn.close()
            owner.close()
            shown = "; ".join(problems[:_QUICK_CHECK_SHOWN]) + (f" (+{len(problems) - _QUICK_CHECK_SHOWN} more)"
                                                              if len(problems) > _QUICK_CHECK_SHOWN else "")
            raise _corrupt(path, f"quick_check: {shown}")
        return cls(conn, path, owner)

    # ------------------------------------------------------------------ transactions
    def _begin(self) -> None:
        if not self._conn.in_transaction:
            self._conn.execute("BEGIN")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement inside the open transaction (started on first use); returns rowcount."""
        with self._lock:
            self._begin()
            return self._conn.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._lock:
            self._begin()
            self._conn.executemany(sql, rows)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Read rows; sees this connection's uncommitted writes."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    @property
    def connection(self) -> sqlite3.Connection:
        """The underlying connection, for read helpers such as ``labels.labelled_rows``."""
        return self._conn

    def commit(self) -> None:
        """Make everything written since the last commit durable, atomically."""
        with self._lock:
            if not self._conn.in_transaction:
                return
            self._conn.execute("COMMIT")
        for listener in self._commit_listeners:
            listener()

    def add_commit_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after each commit that made writes durable: the daemon's health
        counts these as progress, so a long cycle that keeps checkpointing is not a stall."""
        self._commit_listeners.append(listener)

    def rollback(self) -> None:
        """Forget everything written since the last commit."""
        with self._lock:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")

    def close(self) -> None:
        """Close WITHOUT committing: uncommitted writes are rolled back, as after a crash."""
        with self._lock:
            self.rollback()
            self._conn.close()
            if self._owner is not None:
                self._owner.close()  # releases the flock
                self._owner = None

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ file progress
    def file_progress(self, kind: str) -> dict[str, FileProgress]:
        rows = self.query("SELECT path, status, rows_done, size, mtime FROM file_progress WHERE kind = ?", (kind,))
        return {r[0]: FileProgress(r[0], r[1], int(r[2]), int(r[3]), float(r[4])) for r in rows}

    def set_file_progress(self, kind: str, progress: FileProgress) -> None:
        self.execute(
            "INSERT OR REPLACE INTO file_progress (kind, path, status, rows_done, size, mtime) VALUES (?, ?, ?, ?, ?, ?)",
            (kind, progress.path, progress.status, progress.rows_done, progress.size, progress.mtime),
        )

    # ------------------------------------------------------------------ counters and blobs
    def add_counter(self, name: str, key: str, delta: float) -> None:
        """Add to a cumulative counter (e.g. ("rejected_rows", "non_finite")); created at 0."""
        self.execute(
            "INSERT INTO counters (name, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT (name, key) DO UPDATE SET value = value + excluded.value",
            (name, key, float(delta)),
        )

    def counters(self) -> dict[tuple[str, str], float]:
        return {(r[0], r[1]): float(r[2]) for r in self.query("SELECT name, key, value FROM counters")}

    def put_blob(self, name: str, data: bytes) -> None:
        self.execute("INSERT OR REPLACE INTO blobs (name, data) VALUES (?, ?)", (name, sqlite3.Binary(data)))

    def get_blob(self, name: str) -> bytes | None:
        rows = self.query("SELECT data FROM blobs WHERE name = ?", (name,))
        return bytes(rows[0][0]) if rows else None

    # ------------------------------------------------------------------ marks
    def set_mark(self, name: str, value: float) -> None:
        """A named number that moves with the checkpoint (the watermark, the join sequence)."""
        self.execute("INSERT OR REPLACE INTO marks (name, value) VALUES (?, ?)", (name, float(value)))

    def get_mark(self, name: str) -> float | None:
        rows = self.query("SELECT value FROM marks WHERE name = ?", (name,))
        return float(rows[0][0]) if rows else None


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    """Bring an older checkpoint up to SCHEMA_VERSION inside the open transaction."""
    if version < 2:
        # joined_at (the clock at the join): rows joined before it count as joined long ago.
        conn.execute("ALTER TABLE labelled ADD COLUMN joined_at REAL NOT NULL DEFAULT 0")
    if version < 3:
        # join_seq orders joins without any clock (a retrain counts the rows joined after its own);
        # rows joined before it get 0, i.e. joined before every retrain this driftd will record.
        conn.execute("ALTER TABLE labelled ADD COLUMN join_seq INTEGER NOT NULL DEFAULT 0")
    conn.execute("UPDATE meta SET schema_version = ?", (SCHEMA_VERSION,))


def read_mark(conn: sqlite3.Connection, name: str) -> float | None:
    """A mark through any connection (e.g. :func:`connect_readonly`); None when never set."""
    try:
        row = conn.execute("SELECT value FROM marks WHERE name = ?", (name,)).fetchone()
    except sqlite3.OperationalError:  # a checkpoint from before marks existed, not yet migrated
        return None
    return None if row is None else float(row[0])


def read_watermark(conn: sqlite3.Connection) -> float | None:
    """The stream's clock: the newest prediction timestamp the engine accepted (epoch s), as of
    the last checkpoint. Ages (retention, lookback, TTLs) are measured against it, never the wall
    clock, so a replay of old logs behaves as live traffic did."""
    return read_mark(conn, WATERMARK)


def connect_readonly(state_dir: Path) -> sqlite3.Connection:
    """A read-only connection for another process; raises StateError if there is no checkpoint yet."""
    path = Path(state_dir) / DB_NAME
    if not path.exists():
        raise StateError(f"{path}: no checkpoint yet; start the daemon (`driftd run`) or check state_dir")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        conn.execute("SELECT schema_version FROM meta").fetchone()
    except sqlite3.DatabaseError as exc:
        raise _corrupt(path, exc) from None
    return conn
