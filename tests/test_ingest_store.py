"""The checkpoint: atomic commits, exactly-once across crashes (including kill -9), versioning."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ingest_helpers import consume, inference_table, write
from monitor.errors import StateError
from monitor.ingest.counters import ROWS
from monitor.ingest.store import SCHEMA_VERSION, FileProgress, StateStore, connect_readonly

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def make_logs(root: Path, files: int = 4, rows: int = 250) -> set[str]:
    ids = set()
    for i in range(files):
        write(inference_table(rows, start=i * rows), root / f"part-{i:03d}.parquet", row_group_size=64)
        ids |= {f"r{j}" for j in range(i * rows, (i + 1) * rows)}
    return ids


def seen(state_dir: Path) -> Counter:
    with StateStore.open(state_dir) as store:
        return Counter({key: int(v) for (name, key), v in store.counters().items() if name == "seen"})


def test_everything_between_commits_is_atomic(tmp_path):
    store = StateStore.open(tmp_path)
    store.set_file_progress("inference", FileProgress("a.parquet", "partial", 10, 100, 1.5))
    store.add_counter(ROWS, "v1", 10)
    store.put_blob("engine", b"\x00state-1")
    store.commit()
    store.set_file_progress("inference", FileProgress("a.parquet", "done", 20, 100, 1.5))
    store.add_counter(ROWS, "v1", 10)
    store.put_blob("engine", b"\x00state-2")
    store.close()  # no commit: like a crash
    store = StateStore.open(tmp_path)
    assert store.file_progress("inference") == {"a.parquet": FileProgress("a.parquet", "partial", 10, 100, 1.5)}
    assert store.counters() == {(ROWS, "v1"): 10.0}
    assert store.get_blob("engine") == b"\x00state-1" and store.get_blob("other") is None
    store.add_counter(ROWS, "v1", 1)
    store.rollback()
    assert store.counters() == {(ROWS, "v1"): 10.0}
    assert store.file_progress("labels") == {}
    store.close()


@pytest.mark.parametrize("crash_after", [1, 5, 9], ids=["first-chunk", "mid-file", "late"])
def test_exactly_once_across_a_simulated_crash(tmp_path, crash_after):
    ids = make_logs(tmp_path / "logs")
    state = tmp_path / "state"
    consume(str(tmp_path / "logs"), state, commit_every=3, batch_rows=100, stop_after_chunks=crash_after)
    consume(str(tmp_path / "logs"), state, commit_every=3, batch_rows=100)
    counts = seen(state)
    assert set(counts) == ids and set(counts.values()) == {1}
    consume(str(tmp_path / "logs"), state, commit_every=3, batch_rows=100)  # nothing new: nothing twice
    assert seen(state) == counts


def test_exactly_once_across_kill_9(tmp_path):
    ids = make_logs(tmp_path / "logs", files=6)
    state = tmp_path / "state"
    code = (f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(ROOT)!r}]\n"
            "from pathlib import Path\nfrom ingest_helpers import consume\n"
            f"consume({str(tmp_path / 'logs')!r}, Path({str(state)!r}), commit_every=2, batch_rows=50, "
            "chunk_delay=0.02, announce=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        commits = 0
        for line in proc.stdout:
            commits += line.startswith("committed")
            if commits >= 3 or line.startswith("finished"):
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert commits >= 3 and proc.returncode == -signal.SIGKILL
    partial = seen(state)
    assert 0 < len(partial) < len(ids) and set(partial.values()) == {1}
    consume(str(tmp_path / "logs"), state, commit_every=2, batch_rows=50)
    counts = seen(state)
    assert set(counts) == ids and set(counts.values()) == {1}


def test_newer_schema_version_is_refused(tmp_path):
    StateStore.open(tmp_path).close()
    with sqlite3.connect(tmp_path / "state.db") as conn:
        conn.execute("UPDATE meta SET schema_version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StateError) as err:
        StateStore.open(tmp_path)
    message = str(err.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message and str(SCHEMA_VERSION) in message
    assert "upgrade driftd or point state_dir elsewhere" in message


def test_corrupt_database_names_the_file(tmp_path):
    (tmp_path / "state.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError, match="state.db"):
        StateStore.open(tmp_path)


def test_readonly_connection_sees_only_commits(tmp_path):
    with pytest.raises(StateError, match="no checkpoint"):
        connect_readonly(tmp_path)
    store = StateStore.open(tmp_path)
    store.add_counter(ROWS, "v1", 5)
    store.commit()
    store.add_counter(ROWS, "v1", 5)
    reader = connect_readonly(tmp_path)
    assert reader.execute("SELECT value FROM counters").fetchall() == [(5.0,)]
    with pytest.raises(sqlite3.OperationalError):
        reader.execute("DELETE FROM counters")
    store.commit()
    assert reader.execute("SELECT value FROM counters").fetchall() == [(10.0,)]
    reader.close()
    store.close()


def test_a_second_writer_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    import os

    first = StateStore.open(tmp_path / "state")
    try:
        with pytest.raises(StateError, match=rf"already in use by another driftd \(pid {os.getpid()}\)"):
            StateStore.open(tmp_path / "state")
    finally:
        first.close()
    StateStore.open(tmp_path / "state").close()  # free again once the first one closed


def test_a_version_1_state_is_migrated_in_place(tmp_path: Path) -> None:
    StateStore.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute("DROP TABLE labelled")  # the version-1 table had no joined_at
    conn.execute(
        "CREATE TABLE labelled (request_id TEXT PRIMARY KEY, model_version TEXT NOT NULL, timestamp REAL NOT NULL, "
        "labeled_at REAL NOT NULL, prediction INTEGER NOT NULL, label INTEGER NOT NULL, confidence REAL NOT NULL, "
        "source TEXT NOT NULL, row INTEGER NOT NULL, input_uri TEXT) WITHOUT ROWID")
    conn.execute("INSERT INTO labelled VALUES ('old', 'v1', 1.0, 2.0, 0, 0, 0.9, 'f', 0, NULL)")
    conn.execute("UPDATE meta SET schema_version = 1")
    conn.commit()
    conn.close()
    StateStore.open(tmp_path).close()
    reader = connect_readonly(tmp_path)
    try:
        assert reader.execute("SELECT schema_version FROM meta").fetchone()[0] == SCHEMA_VERSION
        assert reader.execute("SELECT joined_at FROM labelled").fetchall() == [(0.0,)]
    finally:
        reader.close()
