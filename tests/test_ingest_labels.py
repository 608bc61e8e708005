"""Label joins by request_id in either arrival order, duplicates, event-time TTLs and persistence."""

from __future__ import annotations

import numpy as np
import pytest

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
from monitor.ingest.labels import LabelJoiner, count_labelled, labelled_rows
from monitor.ingest.records import InferenceBatch, LabelBatch
from monitor.ingest.store import StateStore, connect_readonly


def predictions(ids: list[str], *, version: str = "v1", t0: float = 500.0, first_row: int = 0,
                labels: list[int] | None = None) -> InferenceBatch:
    n = len(ids)
    probs = np.tile(np.array([[0.1, 0.7, 0.2]], dtype=np.float32), (n, 1))
    return InferenceBatch(
        source="logs/p.parquet", first_row=first_row, request_id=np.array(ids, dtype=object),
        timestamp=t0 + np.arange(n, dtype=np.float64), model_version=np.array([version] * n, dtype=object),
        features=np.zeros((n, 2), np.float32), probs=probs, prediction=np.ones(n, np.int64),
        input_uri=np.array([f"s3://b/{i}.jpg" for i in ids], dtype=object),
        label=None if labels is None else np.array(labels, np.int64),
    )


def labels(ids: list[str], values: list[int], at: float = 900.0) -> LabelBatch:
    return LabelBatch(source="labels/l.parquet", request_id=np.array(ids, dtype=object),
                      label=np.array(values, np.int64), labeled_at=np.full(len(ids), at))


@pytest.fixture()
def store(tmp_path):
    s = StateStore.open(tmp_path)
    yield s
    s.close()


def test_prediction_first_then_label(store):
    joiner = LabelJoiner(store, IngestConfig())
    dup, joined = joiner.add_predictions(predictions(["a", "b", "c"], first_row=40))
    assert not dup.any() and joined == []
    joined = joiner.add_labels(labels(["b", "zz"], [1, 0]))
    [j] = joined
    assert (j.request_id, j.model_version, j.prediction, j.label, j.row, j.source) == ("b", "v1", 1, 1, 41, "logs/p.parquet")
    assert j.timestamp == 501.0 and j.labeled_at == 900.0 and j.delay_seconds == 399.0
    assert j.confidence == pytest.approx(0.7) and j.input_uri == "s3://b/b.jpg"
    assert joiner.pending_counts() == (2, 1)
    assert store.counters()[(LABELS, JOINED)] == 1


def test_label_first_then_prediction(store):
    joiner = LabelJoiner(store, IngestConfig())
    assert joiner.add_labels(labels(["x", "y"], [2, 0])) == []
    dup, joined = joiner.add_predictions(predictions(["w", "x"]))
    assert [(j.request_id, j.label, j.prediction) for j in joined] == [("x", 2, 1)]
    assert joiner.pending_counts() == (1, 1)


def test_duplicate_predictions_and_labels(store):
    joiner = LabelJoiner(store, IngestConfig())
    dup, _ = joiner.add_predictions(predictions(["a", "b", "a"]))
    assert list(dup) == [False, False, True]
    joiner.add_labels(labels(["a"], [1]))
    dup, _ = joiner.add_predictions(predictions(["a", "b", "c"]))  # a: labelled, b: pending
    assert list(dup) == [True, True, False]
    assert joiner.add_labels(labels(["a", "d", "d"], [0, 1, 2])) == []  # a again, d twice
    assert store.counters()[(LABELS, DUPLICATE)] == 2
    assert [(r.request_id, r.label) for r in labelled_rows(store.connection)] == [("a", 1)]


def test_inline_labels_join_at_once(store):
    joiner = LabelJoiner(store, IngestConfig())
    _, joined = joiner.add_predictions(predictions(["a", "b"], labels=[2, -1]))
    assert [(j.request_id, j.label, j.labeled_at) for j in joined] == [("a", 2, 500.0)]
    assert joiner.pending_counts() == (1, 0)


def test_ttl_expiry_and_caps_are_counted_in_event_time(store):
    """Every age is the watermark's (the newest prediction time), never the wall clock."""
    cfg = IngestConfig(prediction_ttl_seconds=100, label_ttl_seconds=10, max_pending_predictions=3,
                       max_pending_labels=100, labelled_retention_seconds=1000)
    joiner = LabelJoiner(store, cfg)
    joiner.add_labels(labels(["early"], [1], at=0.0), event_time=None)  # before any prediction: ages from labeled_at
    joiner.add_predictions(predictions(["p0", "p1"], t0=0.0), event_time=1.0)
    joiner.add_predictions(predictions(["p2", "p3", "p4"], t0=50.0), event_time=52.0)
    counts = joiner.expire(52.0)  # early label is 52 s old > 10 s; 5 predictions > cap 3: two oldest dropped
    assert (counts.labels_unmatched, counts.predictions_expired, counts.predictions_dropped) == (1, 0, 2)
    joiner.add_labels(labels(["p4"], [0], at=100.0), event_time=120.0)
    counts = joiner.expire(120.0)  # p2, p3 were predicted at 50 and 51: 70 s old, kept
    assert counts.predictions_expired == 0 and joiner.pending_counts() == (2, 0)
    assert joiner.expire(151.5).predictions_expired == 2
    assert joiner.expire(1051.0).labelled_pruned == 0  # p4 was predicted at 52: 999 s old
    assert joiner.expire(1052.5).labelled_pruned == 1
    c = store.counters()
    assert c[(LABELS, UNMATCHED)] == 1 and c[(PREDICTIONS, EXPIRED)] == 2
    assert c[(PREDICTIONS, DROPPED_OVER_CAP)] == 2 and c[(LABELLED, PRUNED)] == 1
    assert (LABELS, DROPPED_OVER_CAP) not in c


def test_old_logs_age_like_live_ones(store):
    """A replay of logs stamped 70 days ago joins and keeps its rows: only the watermark ages them."""
    seventy_days_ago = 1_800_000_000.0 - 70 * 86400
    joiner = LabelJoiner(store, IngestConfig())  # defaults: 14-day prediction TTL, 30-day retention
    wm = seventy_days_ago + 3
    joiner.add_predictions(predictions(["a", "b", "c", "d"], t0=seventy_days_ago), event_time=wm)
    joined = joiner.add_labels(labels(["a", "b", "c"], [1, 1, 0], at=seventy_days_ago + 500), event_time=wm)
    assert len(joined) == 3
    assert not joiner.expire(wm).any  # nothing is old by the stream's own clock
    assert count_labelled(store.connection) == 3
    # ... and once the stream itself moves 31 days on, they are pruned
    assert joiner.expire(seventy_days_ago + 31 * 86400).labelled_pruned == 3


def test_no_watermark_ages_nothing(store):
    joiner = LabelJoiner(store, IngestConfig(label_ttl_seconds=1))
    joiner.add_labels(labels(["x"], [1], at=0.0), event_time=None)
    assert not joiner.expire(None).any and joiner.pending_counts() == (0, 1)


def test_label_cap_drops_oldest_and_counts_them_unmatched(store, caplog):
    joiner = LabelJoiner(store, IngestConfig(max_pending_labels=2))
    for i, rid in enumerate(["l0", "l1", "l2"]):
        joiner.add_labels(labels([rid], [0]), event_time=float(i))
    assert joiner.expire(None).labels_dropped == 1
    assert store.counters()[(LABELS, UNMATCHED)] == 1 and store.counters()[(LABELS, DROPPED_OVER_CAP)] == 1
    assert [j.request_id for j in joiner.add_predictions(predictions(["l0", "l1", "l2"]))[1]] == ["l1", "l2"]
    assert "max_pending" in caplog.text
    assert joiner.add_predictions(predictions(["early"]))[1] == []  # the expired label is gone


def test_state_persists_across_reopen_and_readonly_queries(tmp_path):
    store = StateStore.open(tmp_path)
    joiner = LabelJoiner(store, IngestConfig())
    joiner.add_predictions(predictions(["a", "b", "c"], version="v1"))
    joiner.add_predictions(predictions(["d"], version="v2"))
    joiner.add_labels(labels(["zz"], [1]))
    store.commit()
    joiner.add_labels(labels(["a"], [1]))  # not committed: lost, and so is its join number
    store.close()

    store = StateStore.open(tmp_path)
    joiner = LabelJoiner(store, IngestConfig())
    assert joiner.pending_counts() == (4, 1) and joiner.join_seq == 0
    joiner.add_labels(labels(["a"], [1], at=10.0))
    first = joiner.join_seq
    joiner.add_labels(labels(["b"], [0], at=20.0))
    joiner.add_labels(labels(["d"], [2], at=30.0))
    joiner.add_predictions(predictions(["zz"]))
    store.commit()
    reader = connect_readonly(tmp_path)
    assert [r.request_id for r in labelled_rows(reader)] == ["a", "b", "d", "zz"]
    assert [r.request_id for r in labelled_rows(reader, limit=2)] == ["zz", "d"]
    assert [r.request_id for r in labelled_rows(reader, since=15.0, until=30.0)] == ["b"]
    assert [r.request_id for r in labelled_rows(reader, model_version="v2")] == ["d"]
    assert [r.request_id for r in labelled_rows(reader, predicted_since=501.0)] == ["b"]  # prediction time
    # "joined since" counts join numbers, whatever the producer's labeled_at says
    assert count_labelled(reader) == 4 and count_labelled(reader, after_join=first) == 3
    assert count_labelled(reader, after_join=first, model_version="v1") == 2
    assert count_labelled(reader, predicted_since=501.0) == 1
    reader.close()
    store.close()
