"""Health = progress (monitor.service.health), on an injected clock; the config key; the state faults."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest

from monitor.config import parse_config
from monitor.errors import ConfigError, StateError
from monitor.ingest.claim import claim_state_dir
from monitor.ingest.faults import classify_fault
from monitor.ingest.store import StateStore
from monitor.service.health import Health


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


DISK_FULL = classify_fault(OSError(errno.ENOSPC, "No space left on device", "/state/policy.json.tmp"), Path("/state"))


def _health(limit: float = 60.0) -> tuple[Health, Clock]:
    clock = Clock()
    health = Health(limit, clock=clock)
    health.restart_clock()
    return health, clock


def test_an_idle_daemon_with_nothing_to_read_stays_healthy() -> None:
    health, clock = _health()
    for _ in range(100):  # cycles every 30 s that find nothing new
        clock.now += 30
        health.cycle_started()
        assert health.cycle_succeeded(backlog=False) is None
    verdict, turned = health.check()
    assert verdict.healthy and not turned and verdict.reason == "ok: last cycle succeeded 0.0s ago"


def test_failing_cycles_turn_unhealthy_after_the_limit_and_recover() -> None:
    health, clock = _health(60)
    health.cycle_started()
    health.cycle_succeeded(backlog=False)
    states = []
    for _ in range(3):  # 0, 30, 60 s after the last success
        clock.now += 30
        health.cycle_started()
        states.append(health.cycle_failed(DISK_FULL))
    assert [new for _, new in states] == [True, False, False]  # one failure state, logged once
    clock.now += 1
    verdict, turned = health.check()
    assert not verdict.healthy and turned
    assert verdict.reason.startswith("no progress for 91s (scheduler.unhealthy_after_seconds=60): 3 cycle(s) failed")
    assert "filesystem holding the state is full" in verdict.reason
    assert health.check() == (verdict, False)  # the turn is reported once
    clock.now += 30
    ended = health.cycle_succeeded(backlog=False)
    assert ended is not None and ended.count == 3 and ended.fault.kind == "disk_full"
    assert health.check()[0].healthy


def test_a_failure_before_the_limit_is_degraded_not_unhealthy() -> None:
    health, clock = _health(60)
    clock.now += 10
    health.cycle_failed(DISK_FULL)
    verdict, _ = health.check()
    assert verdict.healthy and verdict.reason.startswith("degraded, unhealthy in 50s")


def test_a_long_cycle_that_keeps_committing_is_progress() -> None:
    health, clock = _health(60)
    health.cycle_started()
    for _ in range(100):  # a 1M-row file: one cycle for 500 s, a checkpoint every 5 s
        clock.now += 5
        health.progress()
        assert health.check()[0].healthy
    clock.now += 61  # then it hangs (a stuck read): no commit for longer than the limit
    verdict, turned = health.check()
    assert not verdict.healthy and turned and "the running cycle (started 561s ago)" in verdict.reason
    assert "committed nothing" in verdict.reason


def test_commits_of_a_cycle_that_then_fails_are_not_progress() -> None:
    health, clock = _health(60)
    for _ in range(4):  # each cycle commits the engine's checkpoint, then cannot save the policy state
        clock.now += 20
        health.cycle_started()
        health.progress()
        health.cycle_failed(DISK_FULL)
    verdict, _ = health.check()
    assert not verdict.healthy and verdict.reason.startswith("no progress for 80s")


def test_a_backlog_left_by_the_last_cycle_is_pending_work() -> None:
    health, clock = _health(60)
    health.cycle_started()
    health.cycle_succeeded(backlog=True)  # stopped early, files unread
    clock.now += 61
    verdict, _ = health.check()
    assert not verdict.healthy and "files are waiting" in verdict.reason


def test_a_scheduler_that_stops_starting_cycles_is_unhealthy() -> None:
    health, clock = _health(60)
    health.cycle_started()
    health.cycle_succeeded(backlog=False)
    clock.now += 61
    verdict, _ = health.check()
    assert not verdict.healthy and "no cycle started for 61s" in verdict.reason


def test_unhealthy_after_defaults_to_five_intervals_and_must_exceed_one(tmp_path: Path) -> None:
    doc = {"logs": {"inference": "logs"}}
    assert parse_config(doc, source="t", base=tmp_path).service.scheduler.unhealthy_after_seconds == 150
    cfg = parse_config({**doc, "scheduler": {"interval_seconds": 2}}, source="t", base=tmp_path)
    assert cfg.service.scheduler.unhealthy_after_seconds == 10
    with pytest.raises(ConfigError, match=r"scheduler.unhealthy_after_seconds: must be more than interval_seconds \(30\)"):
        parse_config({**doc, "scheduler": {"unhealthy_after_seconds": 30}}, source="t", base=tmp_path)


# -- the state faults the health block names ------------------------------------------------------

def test_a_corrupt_page_in_the_middle_is_refused_at_open_with_the_restore_message(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path)
    store.executemany("INSERT INTO counters (name, key, value) VALUES (?, ?, ?)",
                      [("n", f"k{i:06d}", float(i)) for i in range(30_000)])
    store.commit()
    store.close()
    db = tmp_path / "state.db"
    pages = db.stat().st_size // 4096
    with open(db, "r+b") as fh:  # one page in the middle: the file still opens and answers queries
        fh.seek((pages // 2) * 4096)
        fh.write(os.urandom(4096))
    sqlite3.connect(db).execute("SELECT count(*) FROM meta").fetchall()
    with pytest.raises(StateError) as err:
        StateStore.open(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{db}: checkpoint database is unreadable (quick_check: ")
    assert "restore state.db from a backup, or move it away to start from scratch" in message and "\n" not in message
    claim_state_dir(tmp_path).release()  # the refusal released the state lock


def test_real_sqlite_faults_are_named(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path)
    store.execute("PRAGMA max_page_count = 30")  # SQLite's own SQLITE_FULL, as on a full filesystem
    with pytest.raises(sqlite3.OperationalError) as full:
        store.executemany("INSERT INTO counters (name, key, value) VALUES (?, ?, ?)",
                          [("n", f"k{i}", 1.0) for i in range(100_000)])
    store.close()
    fault = classify_fault(RuntimeError("cycle failed"), tmp_path)  # not a state fault
    assert (fault.kind, fault.key) == ("other", "other: RuntimeError: cycle failed")
    try:
        raise RuntimeError("wrapped") from full.value
    except RuntimeError as exc:
        fault = classify_fault(exc, tmp_path)  # found through the exception chain
    assert fault.kind == "disk_full" and fault.key == "disk_full"
    assert "free space or grow the volume" in fault.message and "database or disk is full" in fault.message
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "state.db").write_bytes(b"\0" * 100 + os.urandom(8000))
    with pytest.raises(sqlite3.DatabaseError) as corrupt:
        sqlite3.connect(tmp_path / "bad" / "state.db").execute("SELECT * FROM meta").fetchall()
    fault = classify_fault(corrupt.value, tmp_path / "bad")
    assert fault.kind == "corrupt" and "restore state.db from a backup" in fault.message
    assert classify_fault(OSError(errno.EROFS, "Read-only file system"), tmp_path).kind == "read_only"


def test_a_claim_is_adopted_by_the_store_and_refuses_a_second_claimant(tmp_path: Path) -> None:
    claim = claim_state_dir(tmp_path / "state")
    with pytest.raises(StateError, match=rf"already in use by another driftd \(pid {os.getpid()}\)"):
        claim_state_dir(tmp_path / "state")
    store = StateStore.open(tmp_path / "state")  # adopts the claim: the same lock, no conflict
    claim.release()  # adopted: releasing does nothing
    with pytest.raises(StateError, match="already in use"):
        StateStore.open(tmp_path / "state")
    store.close()
    claim_state_dir(tmp_path / "state").release()  # free once the store closed
