"""Bad files end up quarantined (recorded, counted, moved not deleted); bad rows only rejected."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from ingest_helpers import inference_table, replace_column, write
from monitor.ingest.config import IngestConfig
from monitor.errors import ContractError
from monitor.ingest.counters import (
    FEATURE_DIM,
    NON_FINITE,
    PROBS_LENGTH,
    QUARANTINED_FILES,
    REJECTED_ROWS,
    SCHEMA,
    UNREADABLE,
)
from monitor.ingest.rejections import RowRejections
from monitor.ingest.quarantine import Quarantine
from monitor.ingest.store import FileProgress, StateStore
from monitor.ingest.tail import FileNotReady, Tailer

NOW = 2e9


def ingest_once(logs: Path, store: StateStore, quarantine: Quarantine, expectations=None) -> list[str]:
    """What the engine does per cycle: read each file, quarantine file defects, record row defects."""
    tailer = Tailer(str(logs), "inference", IngestConfig(batch_rows=4), clock=lambda: NOW)
    used = []
    for file in tailer.discover(store.file_progress("inference")):
        try:
            for chunk in tailer.read(file, 0, expectations or {}):
                used += list(chunk.batch.request_id)
                quarantine.rows("inference", file, chunk.rejections)
        except ContractError as err:
            quarantine.file("inference", file, err)
            continue
        except FileNotReady:
            continue
        store.set_file_progress("inference", FileProgress(file.path, "done", chunk.next_row, file.size, file.mtime))
    store.commit()
    return used


def bad_logs(root: Path) -> dict[str, Path]:
    good = inference_table(10, dim=4, classes=3)
    feats = good["features"].to_pylist()
    feats[3] = [float("nan")] * 4
    paths = {
        "good": write(good, root / "dt=1/a-good.parquet"),
        "schema": write(good.drop_columns(["probs"]), root / "dt=1/b-schema.parquet"),
        "dim": write(inference_table(10, dim=8, classes=3, start=100), root / "dt=2/c-dim.parquet"),
        "nan": write(replace_column(inference_table(10, dim=4, start=200), "features",
                                    pa.array(feats, pa.list_(pa.float32(), 4))), root / "dt=2/d-nan.parquet"),
        "probs": write(inference_table(10, dim=4, classes=5, start=300, fixed=False), root / "dt=3/e-probs.parquet"),
        "garbage": root / "dt=3/f-garbage.parquet",
    }
    paths["garbage"].write_bytes(b"PAR1 not really")
    os.utime(paths["garbage"], (NOW - 3600, NOW - 3600))
    return paths


def test_file_and_row_defects_are_recorded_and_counted(tmp_path, caplog):
    paths = bad_logs(tmp_path / "logs")
    store = StateStore.open(tmp_path / "state")
    q = Quarantine(store, None, clock=lambda: NOW)
    with caplog.at_level(logging.WARNING, logger="monitor.ingest.quarantine"):
        used = ingest_once(tmp_path / "logs", store, q, {"v1": (4, 3)})
    # good file fully, nan file minus one row; the rest rejected (probs has 5 classes, not 3)
    assert len(used) == 19 and "r203" not in used
    records = {Path(r.path).name: r for r in q.records()}
    assert (records["b-schema.parquet"].reason, records["b-schema.parquet"].column) == (SCHEMA, "probs")
    assert records["b-schema.parquet"].whole_file and records["b-schema.parquet"].rows == 10
    assert records["c-dim.parquet"].reason == FEATURE_DIM
    assert records["f-garbage.parquet"].reason == UNREADABLE and records["f-garbage.parquet"].rows is None
    nan = records["d-nan.parquet"]
    assert (nan.reason, nan.column, nan.row, nan.rows, nan.whole_file) == (NON_FINITE, "features", 3, 1, False)
    # three chunks of bad rows, one record adding them up
    assert records["e-probs.parquet"].reason == PROBS_LENGTH and records["e-probs.parquet"].rows == 10
    assert len(q.records()) == 5
    assert "a-good.parquet" not in records
    c = store.counters()
    assert c[(QUARANTINED_FILES, SCHEMA)] == 1 and c[(QUARANTINED_FILES, UNREADABLE)] == 1
    assert c[(REJECTED_ROWS, SCHEMA)] == 10 and c[(REJECTED_ROWS, FEATURE_DIM)] == 10
    assert c[(REJECTED_ROWS, NON_FINITE)] == 1 and c[(REJECTED_ROWS, PROBS_LENGTH)] == 10
    progress = store.file_progress("inference")
    assert progress[str(paths["schema"])].status == "quarantined"
    assert len(caplog.records) == 5  # one WARNING per file with a problem
    warnings = [r.getMessage() for r in caplog.records if "quarantined inference file" in r.getMessage()]
    assert len(warnings) == 3 and any("b-schema.parquet" in w and "column=probs" in w and "reason=schema" in w
                                      for w in warnings)
    # quarantined files are not offered again; files left in place are untouched
    assert all(p.exists() for p in paths.values())
    assert ingest_once(tmp_path / "logs", store, q) == []
    store.close()


def test_quarantine_dir_moves_files_keeping_relative_paths(tmp_path):
    paths = bad_logs(tmp_path / "logs")
    store = StateStore.open(tmp_path / "state")
    qdir = tmp_path / "quarantine"
    schema_bytes = paths["schema"].read_bytes()
    q = Quarantine(store, str(qdir), clock=lambda: NOW)
    ingest_once(tmp_path / "logs", store, q, {"v1": (4, 3)})
    moved = qdir / "inference" / "dt=1" / "b-schema.parquet"
    assert moved.read_bytes() == schema_bytes and not paths["schema"].exists()
    assert (qdir / "inference" / "dt=3" / "f-garbage.parquet").exists()
    assert paths["good"].exists() and paths["nan"].exists()  # row-level defects stay in place
    record = next(r for r in q.records() if r.reason == SCHEMA)
    assert record.moved_to == str(moved)
    # the same name quarantined again never overwrites the first
    write(inference_table(2).drop_columns(["probs"]), paths["schema"])
    [again] = [f for f in Tailer(str(tmp_path / "logs"), "inference", IngestConfig()).discover({})
               if f.path == str(paths["schema"])]
    record = q.file("inference", again, ContractError("again", reason=SCHEMA, column="probs"))
    assert record.moved_to == str(moved) + ".1" and moved.read_bytes() == schema_bytes
    store.close()


def test_failed_move_is_recorded_and_file_kept(tmp_path, caplog):
    logs = tmp_path / "logs"
    path = write(inference_table(3).drop_columns(["features"]), logs / "x.parquet")
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the quarantine directory should be")
    store = StateStore.open(tmp_path / "state")
    q = Quarantine(store, str(blocker), clock=lambda: NOW)
    with caplog.at_level(logging.WARNING):
        ingest_once(logs, store, q)
    assert path.exists()
    [record] = q.records()
    assert record.moved_to is None and record.column == "features"
    assert any("could not move" in r.getMessage() for r in caplog.records)
    store.close()


def test_rows_with_no_rejections_record_nothing(tmp_path):
    store = StateStore.open(tmp_path)
    q = Quarantine(store, None, clock=lambda: NOW)
    write(inference_table(1), tmp_path / "a.parquet")
    [file] = Tailer(str(tmp_path), "inference", IngestConfig()).discover({})
    assert q.rows("inference", file, RowRejections()) is None
    assert q.records() == [] and np.isfinite(NOW)
    store.close()
