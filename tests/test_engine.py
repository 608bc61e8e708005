"""The engine end to end on real Parquet files, a real SQLite checkpoint and real references."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine_helpers import build_reference, config_doc, make_rows, write_inference, write_labels
from monitor.config import parse_config
from monitor.engine.cycle import Engine
from monitor.ingest.counters import (
    DUPLICATE_REQUEST_ID,
    FILES,
    JOINED,
    LABELS,
    QUARANTINED_FILES,
    REJECTED_ROWS,
    ROWS,
    ROWS_WITHOUT_REFERENCE,
    UNREADABLE,
    WINDOWS,
)
from monitor.ingest.store import connect_readonly
from monitor.errors import ReferenceMissingError


def _engine(tmp_path: Path, ref: Path, **overrides) -> Engine:
    cfg = parse_config(config_doc(tmp_path, ref, **overrides), source="test", base=tmp_path)
    return Engine(cfg.monitor)


def _drain(engine: Engine) -> list:
    windows = []
    while True:
        report = engine.run_cycle()
        windows += report.windows
        if report.rows == 0 and report.files == 0:
            return windows


@pytest.fixture
def ref(tmp_path: Path) -> Path:
    return build_reference(tmp_path)


def test_clean_then_shifted_traffic(tmp_path: Path, ref: Path):
    clean = make_rows(1000, seed=10)
    shifted = make_rows(1000, seed=11, shift=1.5, start=clean.timestamp[-1] + 1)
    write_inference(tmp_path / "logs", clean, per_file=250, name="a")
    write_inference(tmp_path / "logs", shifted, per_file=250, name="b")
    engine = _engine(tmp_path, ref)
    try:
        windows = _drain(engine)
        counters = engine.counters()
    finally:
        engine.close()
    assert [w.index for w in windows] == list(range(10))
    assert all(w.rows == 200 for w in windows)
    before, after = windows[:5], windows[5:]
    assert max(w.mmd.p_value for w in after) < 0.05
    assert np.median([w.mmd.p_value for w in before]) > 0.05
    assert min(w.activations.max_abs_shift for w in after) > 5 * max(w.activations.max_abs_shift for w in before) / 2
    assert any(w.online.alarm for w in after)
    assert counters[(ROWS, "v1")] == 2000
    assert counters[(FILES, "inference")] == 8


def test_labels_in_either_order_give_accuracy_and_estimate_tracks_it(tmp_path: Path, ref: Path):
    rows = make_rows(1200, seed=20)
    # half the labels arrive before their predictions' file, half after
    write_labels(tmp_path / "labels", rows.slice(0, 600), name="early")
    engine = _engine(tmp_path, ref)
    try:
        engine.run_cycle()
        write_inference(tmp_path / "logs", rows, per_file=400)
        write_labels(tmp_path / "labels", rows.slice(600, 1200), name="late")
        windows = _drain(engine)
        counters = engine.counters()
        last = engine.latest_windows()["v1"]
    finally:
        engine.close()
    true_acc = float((rows.probs.argmax(1) == rows.label).mean())
    assert counters[(LABELS, JOINED)] == 1200
    assert last.accuracy.labels_last_n == 500
    assert last.accuracy.accuracy_last_n == pytest.approx(float((rows.probs.argmax(1) == rows.label)[-500:].mean()), abs=1e-9)
    est = np.mean([w.estimate.estimated_accuracy for w in windows])
    assert est == pytest.approx(true_acc, abs=0.04)
    assert last.accuracy.label_delay_p50_seconds == pytest.approx(60.0)


def test_rows_for_a_version_without_reference_are_counted_not_lost(tmp_path: Path, ref: Path, caplog):
    write_inference(tmp_path / "logs", make_rows(300, seed=30, version="v9"), per_file=300)
    engine = _engine(tmp_path, ref)
    try:
        windows = _drain(engine)
        counters = engine.counters()
    finally:
        engine.close()
    assert windows == []
    assert counters[(ROWS_WITHOUT_REFERENCE, "v9")] == 300
    assert "no reference for it" in caplog.text and "driftd reference build" in caplog.text


def test_no_reference_at_all_is_a_clear_error(tmp_path: Path):
    cfg = parse_config(config_doc(tmp_path, tmp_path / "nowhere"), source="test", base=tmp_path)
    with pytest.raises(ReferenceMissingError, match="driftd reference build"):
        Engine(cfg.monitor)


def test_restart_resumes_the_open_window(tmp_path: Path, ref: Path):
    rows = make_rows(500, seed=40)
    write_inference(tmp_path / "logs", rows.slice(0, 300), per_file=300, name="a")
    engine = _engine(tmp_path, ref)
    first = _drain(engine)
    engine.close()
    write_inference(tmp_path / "logs", rows.slice(300, 500), per_file=200, name="b")
    engine = _engine(tmp_path, ref)
    second = _drain(engine)
    engine.close()
    assert [w.index for w in first + second] == [0, 1]
    assert second[0].rows == 200 and second[0].start_time == pytest.approx(rows.timestamp[200])


_CRASHY = textwrap.dedent(
    """
    import itertools, os, signal, sys, json
    sys.path.insert(0, {tests!r})
    from engine_helpers import config_doc
    from monitor.config import parse_config
    from monitor.engine.cycle import Engine
    tick = itertools.count()
    cfg = parse_config(json.loads({doc!r}), source="test", base=__import__("pathlib").Path({tmp!r}))
    # a clock that advances 1 s per reading forces frequent intermediate checkpoints
    engine = Engine(cfg.monitor, clock=lambda: 1_800_000_000.0 + next(tick))
    calls = itertools.count()
    kill_at = int(sys.argv[1])
    def should_stop():
        if next(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return False
    while True:
        r = engine.run_cycle(should_stop)
        if r.rows == 0 and r.files == 0:
            break
    print("finished")
    """
)


@pytest.mark.parametrize(("kill_at", "per_file"), [(5, 100), (24, 100), (17, 2000)],
                         ids=["early", "late", "mid-file"])
def test_exactly_once_across_kill_9(tmp_path: Path, ref: Path, kill_at: int, per_file: int):
    rows = make_rows(2000, seed=50)
    write_inference(tmp_path / "logs", rows, per_file=per_file, row_group_size=50)
    write_labels(tmp_path / "labels", rows.slice(0, 1000))
    doc = config_doc(tmp_path, ref, **{"ingest.batch_rows": 50})
    script = _CRASHY.format(tests=str(Path(__file__).parent), doc=json.dumps(doc), tmp=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    killed = subprocess.run([sys.executable, "-c", script, str(kill_at)], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = subprocess.run([sys.executable, "-c", script, "-1"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr

    # An uninterrupted run over a copy of the same logs is the ground truth.
    clean_tmp = tmp_path / "clean"
    write_inference(clean_tmp / "logs", rows, per_file=per_file, row_group_size=50)
    write_labels(clean_tmp / "labels", rows.slice(0, 1000))
    truth = parse_config(config_doc(clean_tmp, ref, **{"ingest.batch_rows": 50}), source="t", base=clean_tmp)
    engine = Engine(truth.monitor)
    expected_windows = _drain(engine)
    expected = engine.counters()
    expected_latest = engine.latest_windows()["v1"]
    engine.close()

    crashed_cfg = parse_config(doc, source="t", base=tmp_path)
    engine = Engine(crashed_cfg.monitor)
    got = engine.counters()
    latest = engine.latest_windows()["v1"]
    engine.close()
    assert got[(ROWS, "v1")] == 2000
    assert got[(LABELS, JOINED)] == 1000
    assert (REJECTED_ROWS, DUPLICATE_REQUEST_ID) not in got
    assert got[(WINDOWS, "v1")] == expected[(WINDOWS, "v1")] == 10
    assert latest.index == expected_windows[-1].index
    assert latest.activations.max_abs_shift == pytest.approx(expected_windows[-1].activations.max_abs_shift)
    assert latest.accuracy == expected_latest.accuracy and latest.accuracy.labels_last_n == 500


def test_an_unexpected_error_mid_cycle_rolls_back_to_the_checkpoint(tmp_path: Path, ref: Path, monkeypatch):
    rows = make_rows(1000, seed=60)
    write_inference(tmp_path / "logs", rows, per_file=1000, row_group_size=250)
    engine = _engine(tmp_path, ref, **{"ingest.batch_rows": 250})
    from monitor.engine import window as window_mod

    original = window_mod.WindowTracker.add
    calls = {"n": 0}

    def flaky(self, batch, *, now):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")  # e.g. a CUDA error in a signal
        return original(self, batch, now=now)

    monkeypatch.setattr(window_mod.WindowTracker, "add", flaky)
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            engine.run_cycle()
        windows = _drain(engine)
        counters = engine.counters()
    finally:
        engine.close()
    assert counters[(ROWS, "v1")] == 1000
    assert (REJECTED_ROWS, DUPLICATE_REQUEST_ID) not in counters
    assert sum(w.rows for w in windows) == 1000


def test_a_quarantined_file_is_recorded_then_moved_never_deleted(tmp_path: Path, ref: Path):
    write_inference(tmp_path / "logs", make_rows(100, seed=70), per_file=100, name="good")
    (tmp_path / "logs" / "broken.parquet").write_bytes(b"not parquet at all")
    engine = _engine(tmp_path, ref, **{"ingest.quarantine_dir": str(tmp_path / "quarantine")})
    try:
        _drain(engine)
        records = engine.quarantine.records()
        counters = engine.counters()
    finally:
        engine.close()
    (rec,) = [r for r in records if r.whole_file]
    assert rec.reason == UNREADABLE and rec.moved_to is not None
    assert Path(rec.moved_to).read_bytes() == b"not parquet at all"
    assert not (tmp_path / "logs" / "broken.parquet").exists()
    assert counters[(QUARANTINED_FILES, UNREADABLE)] == 1 and counters[(ROWS, "v1")] == 100


def test_windows_stay_pending_across_a_restart_until_acknowledged(tmp_path: Path, ref: Path):
    write_inference(tmp_path / "logs", make_rows(400, seed=80), per_file=400)
    engine = _engine(tmp_path, ref)
    closed = _drain(engine)
    assert [w.index for w in engine.pending_windows()] == [0, 1]
    engine.close()  # e.g. the daemon died before its policy acted on them

    engine = _engine(tmp_path, ref)
    pending = engine.pending_windows()
    assert [(w.index, w.rows) for w in pending] == [(w.index, w.rows) for w in closed]
    engine.acknowledge(pending)
    engine.run_cycle()  # the acknowledgement is committed with the next checkpoint
    engine.close()
    engine = _engine(tmp_path, ref)
    try:
        assert engine.pending_windows() == []
    finally:
        engine.close()


def test_a_large_file_commits_and_reports_progress_per_batch(tmp_path: Path, ref: Path):
    """One big file is not one step: the engine commits every couple of seconds mid-file and says
    so (the daemon refreshes /metrics then), and what it committed is what a restart resumes from."""
    rows = make_rows(3000, seed=51)
    write_inference(tmp_path / "logs", rows, per_file=3000, row_group_size=100)
    tick = iter(range(10**9))
    cfg = parse_config(config_doc(tmp_path, ref, **{"ingest.batch_rows": 100}), source="t", base=tmp_path)
    engine = Engine(cfg.monitor, clock=lambda: 1_800_000_000.0 + next(tick))  # 1 s per reading
    seen: list[tuple[float, float]] = []
    engine.run_cycle(on_checkpoint=lambda: seen.append(
        (engine.counters().get((ROWS, "v1"), 0.0), engine.counters().get((FILES, "inference"), 0.0))))
    engine.close()
    mid = [r for r, files in seen if files == 0]
    assert len(mid) >= 5 and mid == sorted(mid) and 0 < mid[0] < mid[-1] < 3000
    reader = connect_readonly(tmp_path / "state")
    assert reader.execute("SELECT rows_done FROM file_progress").fetchone()[0] == 3000
    reader.close()
