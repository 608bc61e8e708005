"""The producer's writer: complete files only, rolls by rows and time, round trip, input errors."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ingest_helpers import probs_for
from monitor.ingest.config import IngestConfig
from monitor.ingest.tail import Tailer
from monitor.ingest.writer import LabelWriter, LogWriter
from waiting import wait_until


class Clock:
    def __init__(self, now: float = 1_790_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def rows(n: int, start: int = 0, dim: int = 4, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return ([f"q{i}" for i in range(start, start + n)], rng.normal(size=(n, dim)).astype(np.float32),
            probs_for(n, classes, rng))


def read_all(root: Path, kind: str = "inference"):
    tailer = Tailer(str(root), kind, IngestConfig())
    chunks = [c for f in tailer.discover({}) for c in tailer.read(f, 0, {})]
    assert all(not c.rejections for c in chunks)
    return chunks


def parquet_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_rolls_by_rows_with_time_sorted_names(tmp_path):
    clock = Clock()
    ids, feats, probs = rows(25)
    with LogWriter(tmp_path, roll_rows=10, clock=clock) as w:
        for i in range(25):
            clock.now += 0.5
            w.write(ids[i], clock.now, "v1", feats[i], probs=probs[i])
        assert w.files_written == 2
    names = parquet_names(tmp_path)
    assert len(names) == 3 and names == sorted(names)
    assert names[0] == "part-20260921T141325000000Z-000001.parquet"  # clock 1_790_000_005.0, UTC
    chunks = read_all(tmp_path)
    assert [len(c.batch) for c in chunks] == [10, 10, 5]
    assert [r for c in chunks for r in c.batch.request_id] == ids


def test_rolls_by_time_on_write_and_in_background(tmp_path):
    clock = Clock()
    w = LogWriter(tmp_path / "a", roll_rows=1000, roll_seconds=60, clock=clock)
    ids, feats, probs = rows(3)
    w.write(ids[0], clock.now, "v1", feats[0], probs=probs[0])
    clock.now += 59
    w.write(ids[1], clock.now, "v1", feats[1], probs=probs[1])
    assert w.files_written == 0
    clock.now += 1
    w.write(ids[2], clock.now, "v1", feats[2], probs=probs[2])
    assert w.files_written == 1 and [len(c.batch) for c in read_all(tmp_path / "a")] == [3]
    w.close()

    bg = LogWriter(tmp_path / "b", roll_seconds=60, clock=clock, flush_interval=0.01)
    bg.write(ids[0], clock.now, "v1", feats[0], probs=probs[0])
    time.sleep(0.05)
    assert bg.files_written == 0  # not due yet
    clock.now += 61
    # the flusher thread has no progress to show but the file: wait up to the stall limit (60 s)
    wait_until(lambda: bg.files_written, "the background flush", poll_seconds=0.01)
    assert bg.files_written == 1
    bg.close()
    assert bg.files_written == 1  # nothing left to flush


def test_round_trip_through_tailer_and_contract(tmp_path):
    ids, feats, probs = rows(6, dim=5, classes=4)
    when = dt.datetime(2026, 11, 26, 10, 0, 0, 250_000)  # naive: UTC
    with LogWriter(tmp_path, clock=Clock()) as w:
        w.write_batch(ids[:4], when, "v2", feats[:4], probs=probs[:4], input_uri=[f"s3://b/{i}" for i in ids[:4]],
                      label=[1, None, -1, 3])
        w.write(ids[4], 1_790_000_000.5, "v2", feats[4].tolist(), probs=probs[4].tolist(), prediction=0, label=2)
        w.write(ids[5], np.datetime64("2026-11-26T10:00:01"), "v2", feats[5], probs=probs[5])
    [chunk] = read_all(tmp_path)
    b = chunk.batch
    assert list(b.request_id) == ids and set(b.model_version) == {"v2"}
    np.testing.assert_array_equal(b.features, feats)
    np.testing.assert_allclose(b.probs, probs)
    expected_ts = dt.datetime(2026, 11, 26, 10, 0, 0, 250_000, tzinfo=dt.timezone.utc).timestamp()
    assert b.timestamp[0] == pytest.approx(expected_ts) and b.timestamp[4] == pytest.approx(1_790_000_000.5)
    assert b.timestamp[5] == pytest.approx(expected_ts + 0.75)
    assert list(b.prediction[:4]) == list(probs[:4].argmax(axis=1)) and b.prediction[4] == 0
    assert list(b.label) == [1, -1, -1, 3, 2, -1]
    assert list(b.input_uri[:4]) == [f"s3://b/{i}" for i in ids[:4]] and b.input_uri[4] is None


def test_logits_and_labels_round_trip(tmp_path):
    ids, feats, _ = rows(3)
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 1.0, 1.5]], np.float32)
    with LogWriter(tmp_path / "inf", clock=Clock()) as w:
        w.write_batch(ids, 1_790_000_000.0 + np.array([0.0, 0.5, 1.25]), "v1", feats, logits=logits)
        with pytest.raises(ValueError, match="logs logits"):
            w.write(ids[0], 1.0, "v1", feats[0], probs=[0.2, 0.3, 0.5])
    [chunk] = read_all(tmp_path / "inf")
    np.testing.assert_allclose(chunk.batch.timestamp, 1_790_000_000.0 + np.array([0.0, 0.5, 1.25]))
    np.testing.assert_allclose(chunk.batch.probs, np.exp(logits) / np.exp(logits).sum(1, keepdims=True), rtol=1e-6)
    with LabelWriter(tmp_path / "lab", clock=Clock()) as lw:
        lw.write("q0", 2, 1_790_000_100.0)
        lw.write_batch(["q1", "q2"], [0, 1], dt.datetime(2026, 11, 26, tzinfo=dt.timezone.utc))
    [lchunk] = read_all(tmp_path / "lab", "labels")
    assert list(lchunk.batch.request_id) == ["q0", "q1", "q2"] and list(lchunk.batch.label) == [2, 0, 1]
    assert lchunk.batch.labeled_at[0] == 1_790_000_100.0
    assert parquet_names(tmp_path / "lab")[0].startswith("labels-")


@pytest.mark.parametrize("call,match", [
    (lambda w, f, p: w.write_batch(["a", "b"], 1.0, "v1", [f[0], f[0][:3]], probs=p[:2]),
     r"row 1 \(request_id 'b'\): features has 3 values, expected 4"),
    (lambda w, f, p: w.write("late", 1.0, "v1", np.zeros(5), probs=p[0]),
     r"request_id 'late': features has 5 values, expected 4 \(fixed by the first row"),
    (lambda w, f, p: w.write_batch(["a", "b"], 1.0, "v1", np.where([[0], [1]], np.nan, f[:2]), probs=p[:2]),
     r"row 1 \(request_id 'b'\): features contains NaN"),
    (lambda w, f, p: w.write("a", 1.0, "v1", f[0], probs=[0.5, 0.6, 0.1]), r"request_id 'a': probs must be >= 0 and sum to 1"),
    (lambda w, f, p: w.write("a", 1.0, "v1", f[0], probs=[0.5, 0.5]), r"probs has 2 values, expected 3"),
    (lambda w, f, p: w.write("a", 1.0, "v1", f[0]), "exactly one of probs or logits"),
    (lambda w, f, p: w.write("a", float("nan"), "v1", f[0], probs=p[0]), "timestamp must be epoch seconds"),
    (lambda w, f, p: w.write_batch(["a", "b"], np.array([1.0, np.inf]), "v1", f[:2], probs=p[:2]),
     r"row 1 \(request_id 'b'\): timestamp must be epoch seconds"),
    (lambda w, f, p: w.write("", 1.0, "v1", f[0], probs=p[0]), "request_id must be a non-empty string"),
    (lambda w, f, p: w.write("a", 1.0, "v1", f[0], probs=p[0], prediction=3), r"class indices in \[0, 3\)"),
], ids=["batch-dim", "later-dim", "nan", "probs-sum", "probs-len", "no-scores", "bad-time", "bad-time-array", "empty-id", "bad-pred"])
def test_bad_inputs_name_the_row(tmp_path, call, match):
    ids, feats, probs = rows(3)
    w = LogWriter(tmp_path, clock=Clock())
    w.write("first", 1.0, "v1", feats[0], probs=probs[0])  # fixes D=4, C=3
    with pytest.raises(ValueError, match=match):
        call(w, feats, probs)
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write("x", 1.0, "v1", feats[0], probs=probs[0])
    with pytest.raises(ValueError, match=r"row 0 \(request_id 'q'\): label must be an int >= 0"):
        LabelWriter(tmp_path / "l").write_batch(["q"], [-1], 1.0)


def test_readers_never_see_partial_files(tmp_path):
    """A reader tailing the directory while several threads write never finds an unreadable file."""
    stop = threading.Event()
    problems: list[str] = []
    seen: set[str] = set()

    def reader():
        tailer = Tailer(str(tmp_path), "inference", IngestConfig(settle_seconds=0))
        while not stop.is_set():
            for f in tailer.discover({}):
                if f.path in seen:
                    continue
                try:
                    n = sum(len(c.batch) for c in tailer.read(f, 0, {}))
                    seen.add(f.path)
                    if n != 50:
                        problems.append(f"{f.path}: {n} rows")
                except Exception as exc:  # noqa: BLE001 - any failure is what this test looks for
                    problems.append(f"{f.path}: {exc!r}")

    w = LogWriter(tmp_path, roll_rows=50)
    ids, feats, probs = rows(50, dim=64, classes=10)

    def producer(k: int):
        for j in range(15):
            w.write_batch([f"{k}-{j}-{i}" for i in ids], time.time(), "v1", feats, probs=probs)

    t = threading.Thread(target=reader)
    t.start()
    producers = [threading.Thread(target=producer, args=(k,)) for k in range(3)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    w.close()
    stop.set()
    t.join()
    assert problems == []
    assert w.files_written == 45 and len(os.listdir(tmp_path)) == 45  # no temp files left behind
    total = sum(len(c.batch) for c in read_all(tmp_path))
    assert total == 45 * 50
