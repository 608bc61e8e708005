"""Label joins by request_id in either arrival order, duplicates, TTLs and persistence."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.config import IngestConfig
from monitor.ingest.labels import LabelJoiner, count_labelled, labelled_rows
from monitor.ingest.records import InferenceBatch, LabelBatch
from monitor.ingest.store import StateStore, connect_readonly


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


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
    joiner = LabelJoiner(store, IngestConfig(), clock=Clock())
    dup, joined = joiner.add_predictions(predictions(["a", "b", "c"], first_row=40))
    assert not dup.any() and joined == []
    joined = joiner.add_labels(labels(["b", "zz"], [1, 0]))
    [j] = joined
    assert (j.request_id, j.model_version, j.prediction, j.label, j.row, j.source) == ("b", "v1", 1, 1, 41, "logs/p.parquet")
    assert j.timestamp == 501.0 and j.labeled_at == 900.0 and j.delay_seconds == 399.0
    assert j.confidence == pytest.approx(0.7) and j.input_uri == "s3://b/b.jpg"
    assert joiner.pending_counts() == (2, 1)
    assert store.counters()[("labels", "joined")] == 1


def test_label_first_then_prediction(store):
    joiner = LabelJoiner(store, IngestConfig(), clock=Clock())
    assert joiner.add_labels(labels(["x", "y"], [2, 0])) == []
    dup, joined = joiner.add_predictions(predictions(["w", "x"]))
    assert [(j.request_id, j.label, j.prediction) for j in joined] == [("x", 2, 1)]
    assert joiner.pending_counts() == (1, 1)


def test_duplicate_predictions_and_labels(store):
    joiner = LabelJoiner(store, IngestConfig(), clock=Clock())
    dup, _ = joiner.add_predictions(predictions(["a", "b", "a"]))
    assert list(dup) == [False, False, True]
    joiner.add_labels(labels(["a"], [1]))
    dup, _ = joiner.add_predictions(predictions(["a", "b", "c"]))  # a: labelled, b: pending
    assert list(dup) == [True, True, False]
    assert joiner.add_labels(labels(["a", "d", "d"], [0, 1, 2])) == []  # a again, d twice
    assert store.counters()[("labels", "duplicate")] == 2
    assert [(r.request_id, r.label) for r in labelled_rows(store.connection)] == [("a", 1)]


def test_inline_labels_join_at_once(store):
    joiner = LabelJoiner(store, IngestConfig(), clock=Clock())
    _, joined = joiner.add_predictions(predictions(["a", "b"], labels=[2, -1]))
    assert [(j.request_id, j.label, j.labeled_at) for j in joined] == [("a", 2, 500.0)]
    assert joiner.pending_counts() == (1, 0)


def test_ttl_expiry_and_caps_are_counted(store):
    clock = Clock(0.0)
    cfg = IngestConfig(prediction_ttl_seconds=100, label_ttl_seconds=10, max_pending_predictions=3,
                       max_pending_labels=100, labelled_retention_seconds=1000)
    joiner = LabelJoiner(store, cfg, clock=clock)
    joiner.add_labels(labels(["early"], [1], at=0.0))
    joiner.add_predictions(predictions(["p0", "p1"]))
    clock.now = 50.0
    joiner.add_predictions(predictions(["p2", "p3", "p4"]))
    counts = joiner.expire()  # early label is 50 s old > 10 s; 5 predictions > cap 3: two oldest dropped
    assert (counts.labels_unmatched, counts.predictions_expired, counts.predictions_dropped) == (1, 0, 2)
    clock.now = 120.0
    joiner.add_labels(labels(["p4"], [0], at=100.0))
    counts = joiner.expire()  # p2, p3 arrived at 50: 70 s old, kept
    assert counts.predictions_expired == 0 and joiner.pending_counts() == (2, 0)
    clock.now = 151.0
    assert joiner.expire().predictions_expired == 2
    clock.now = 1101.0
    assert joiner.expire().labelled_pruned == 1
    c = store.counters()
    assert c[("labels", "unmatched")] == 1 and c[("predictions", "expired")] == 2
    assert c[("predictions", "dropped_over_cap")] == 2 and c[("labelled", "pruned")] == 1
    assert ("labels", "dropped_over_cap") not in c


def test_label_cap_drops_oldest_and_counts_them_unmatched(store, caplog):
    clock = Clock(0.0)
    joiner = LabelJoiner(store, IngestConfig(max_pending_labels=2), clock=clock)
    for i, rid in enumerate(["l0", "l1", "l2"]):
        clock.now = float(i)
        joiner.add_labels(labels([rid], [0]))
    assert joiner.expire().labels_dropped == 1
    assert store.counters()[("labels", "unmatched")] == 1 and store.counters()[("labels", "dropped_over_cap")] == 1
    assert [j.request_id for j in joiner.add_predictions(predictions(["l0", "l1", "l2"]))[1]] == ["l1", "l2"]
    assert "max_pending" in caplog.text
    assert joiner.add_predictions(predictions(["early"]))[1] == []  # the expired label is gone


def test_state_persists_across_reopen_and_readonly_queries(tmp_path):
    store = StateStore.open(tmp_path)
    joiner = LabelJoiner(store, IngestConfig(), clock=Clock())
    joiner.add_predictions(predictions(["a", "b", "c"], version="v1"))
    joiner.add_predictions(predictions(["d"], version="v2"))
    joiner.add_labels(labels(["zz"], [1]))
    store.commit()
    joiner.add_labels(labels(["a"], [1]))  # not committed: lost
    store.close()

    store = StateStore.open(tmp_path)
    clock = Clock()
    joiner = LabelJoiner(store, IngestConfig(), clock=clock)
    assert joiner.pending_counts() == (4, 1)
    joiner.add_labels(labels(["a"], [1], at=10.0))
    clock.now += 100  # joins are counted by driftd's clock, not the producer's labeled_at
    joiner.add_labels(labels(["b"], [0], at=20.0))
    joiner.add_labels(labels(["d"], [2], at=30.0))
    joiner.add_predictions(predictions(["zz"]))
    store.commit()
    reader = connect_readonly(tmp_path)
    assert [r.request_id for r in labelled_rows(reader)] == ["a", "b", "d", "zz"]
    assert [r.request_id for r in labelled_rows(reader, limit=2)] == ["zz", "d"]
    assert [r.request_id for r in labelled_rows(reader, since=15.0, until=30.0)] == ["b"]
    assert [r.request_id for r in labelled_rows(reader, model_version="v2")] == ["d"]
    assert count_labelled(reader, None) == 4 and count_labelled(reader, clock.now) == 3
    reader.close()
    store.close()
