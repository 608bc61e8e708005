"""Tailer: discovery order, bounded resumable chunks, not-ready vs unreadable files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ingest_helpers import inference_table, label_table, write
from monitor.ingest.config import IngestConfig
from monitor.errors import ConfigError, ContractError
from monitor.ingest.counters import FEATURE_DIM, SCHEMA, UNREADABLE
from monitor.ingest.store import FileProgress
from monitor.ingest.tail import FileNotReady, Tailer


def tailer(root: Path, *, kind="inference", clock=lambda: 2e9, **cfg) -> Tailer:
    return Tailer(str(root), kind, IngestConfig(**cfg), clock=clock)


def test_discovery_skips_temp_and_marker_files_and_sorts_hive_values(tmp_path):
    t = inference_table(1)
    for rel in ["dt=2026-11-26/hour=10/part-0.parquet", "dt=2026-11-26/hour=9/part-1.parquet",
                "dt=2026-11-26/hour=9/part-0.parquet", "dt=2026-11-25/hour=23/a.parquet",
                "dt=2026-11-26/hour=9/.part-2.parquet.tmp", "dt=2026-11-26/hour=9/.part-3.parquet",
                "_staging/x.parquet", "dt=2026-11-26/notes.txt"]:
        write(t, tmp_path / rel)
    (tmp_path / "dt=2026-11-26" / "_SUCCESS").write_text("")
    found = [os.path.relpath(f.path, tmp_path) for f in tailer(tmp_path).discover({})]
    assert found == ["dt=2026-11-25/hour=23/a.parquet", "dt=2026-11-26/hour=9/part-0.parquet",
                     "dt=2026-11-26/hour=9/part-1.parquet", "dt=2026-11-26/hour=10/part-0.parquet"]


def test_discovery_excludes_finished_files_and_caps_count(tmp_path):
    for i in range(5):
        write(inference_table(1), tmp_path / f"p{i}.parquet")
    tl = tailer(tmp_path, max_files_per_cycle=2)
    files = tl.discover({})
    assert [Path(f.path).name for f in files] == ["p0.parquet", "p1.parquet"]
    known = {files[0].path: FileProgress(files[0].path, "done", 1, files[0].size, files[0].mtime),
             files[1].path: FileProgress(files[1].path, "partial", 0, files[1].size, files[1].mtime),
             str(tmp_path / "p2.parquet"): FileProgress(str(tmp_path / "p2.parquet"), "quarantined", 0, 0, 0.0)}
    assert [Path(f.path).name for f in tl.discover(known)] == ["p1.parquet", "p3.parquet"]


def test_missing_location_is_an_error_naming_the_key_and_file_uri_works(tmp_path):
    # A mistyped directory used to read as an empty log forever; now driftd refuses to start.
    with pytest.raises(ConfigError, match=r"logs\.inference: .*nowhere does not exist"):
        tailer(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"logs\.labels: .*nowhere does not exist"):
        Tailer((tmp_path / "nowhere").as_uri(), "labels", IngestConfig())
    write(inference_table(2), tmp_path / "a" / "x.parquet")
    tl = Tailer((tmp_path / "a").as_uri(), "inference", IngestConfig())
    [f] = tl.discover({})
    [chunk] = list(tl.read(f, 0, {}))
    assert len(chunk.batch) == 2 and chunk.end_of_file


def test_chunks_are_bounded_and_resume_mid_file(tmp_path):
    table = inference_table(1000, dim=8, classes=4)
    write(table, tmp_path / "big.parquet", row_group_size=128)
    tl = tailer(tmp_path, batch_rows=100)
    [f] = tl.discover({})
    chunks = list(tl.read(f, 0, {}))
    assert all(len(c.batch) <= 100 for c in chunks)
    assert [c.end_of_file for c in chunks].count(True) == 1 and chunks[-1].end_of_file
    ids = [r for c in chunks for r in c.batch.request_id]
    assert ids == [f"r{i}" for i in range(1000)]
    assert chunks[-1].next_row == 1000
    # resume in the middle of the 5th row group: earlier groups are skipped, rows continue exactly
    resumed = list(tl.read(f, 555, {}))
    assert resumed[0].batch.first_row == 555
    assert [r for c in resumed for r in c.batch.request_id] == [f"r{i}" for i in range(555, 1000)]
    np.testing.assert_array_equal(resumed[0].batch.features[0], np.asarray(table["features"][555].as_py(), np.float32))


def test_finished_or_empty_file_yields_one_empty_final_chunk(tmp_path):
    write(inference_table(3), tmp_path / "a.parquet")
    write(inference_table(0), tmp_path / "b.parquet")
    tl = tailer(tmp_path)
    for f, start in zip(tl.discover({}), (3, 0)):
        [chunk] = list(tl.read(f, start, {}))
        assert len(chunk.batch) == 0 and chunk.end_of_file and chunk.next_row == start


def _truncated(tmp_path: Path) -> Path:
    path = write(inference_table(50), tmp_path / "half.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_partial_file_not_ready_while_fresh_then_unreadable(tmp_path):
    path = _truncated(tmp_path)
    mtime = path.stat().st_mtime
    fresh = tailer(tmp_path, clock=lambda: mtime + 5, settle_seconds=30)
    [f] = fresh.discover({})
    with pytest.raises(FileNotReady):
        list(fresh.read(f, 0, {}))
    old = tailer(tmp_path, clock=lambda: mtime + 31, settle_seconds=30)
    with pytest.raises(ContractError) as err:
        list(old.read(f, 0, {}))
    assert err.value.reason == UNREADABLE and str(path) in str(err.value) and err.value.path == str(path)


def test_file_level_defects_raise_before_rows(tmp_path):
    write(inference_table(4, dim=4).drop_columns(["model_version"]), tmp_path / "a.parquet")
    write(inference_table(4, dim=4), tmp_path / "b.parquet")
    tl = tailer(tmp_path)
    a, b = tl.discover({})
    with pytest.raises(ContractError) as err:
        next(tl.read(a, 0, {}))
    assert (err.value.reason, err.value.column) == (SCHEMA, "model_version")
    with pytest.raises(ContractError) as err:
        next(tl.read(b, 0, {"v1": (16, 3)}))
    assert err.value.reason == FEATURE_DIM


def test_variable_lists_use_the_first_chunks_dims_for_later_chunks(tmp_path):
    table = inference_table(6, dim=3, classes=2, fixed=False)
    rows = table["features"].to_pylist()
    rows[4] = [1.0, 2.0]  # a later chunk whose first row is short must not redefine D
    rows[5] = [1.0, 2.0]
    table = table.set_column(3, "features", pa.array(rows, pa.list_(pa.float32())))
    write(table, tmp_path / "v.parquet", row_group_size=2)
    tl = tailer(tmp_path, batch_rows=2)
    [f] = tl.discover({})
    chunks = list(tl.read(f, 0, {}))
    assert [len(c.batch) for c in chunks] == [2, 2, 0]
    assert dict(chunks[2].rejections.counts) == {FEATURE_DIM: 2} and chunks[2].rejections.first_row == 4


def test_label_files_are_read_as_label_batches(tmp_path):
    write(label_table(["a", "b"], [0, 1]), tmp_path / "l.parquet")
    tl = tailer(tmp_path, kind="labels")
    [f] = tl.discover({})
    [chunk] = list(tl.read(f, 0, {}))
    assert list(chunk.batch.request_id) == ["a", "b"] and chunk.end_of_file


def test_lag_is_age_of_oldest_unfinished_file(tmp_path):
    a = write(inference_table(1), tmp_path / "a.parquet")
    b = write(inference_table(1), tmp_path / "b.parquet")
    os.utime(a, (1000.0, 1000.0))
    os.utime(b, (1500.0, 1500.0))
    tl = tailer(tmp_path, clock=lambda: 2000.0)
    assert tl.lag_seconds({}) == pytest.approx(1000.0)
    done = {str(a): FileProgress(str(a), "done", 1, 0, 1000.0)}
    assert tl.lag_seconds(done) == pytest.approx(500.0)
    done[str(b)] = FileProgress(str(b), "done", 1, 0, 1500.0)
    assert tl.lag_seconds(done) == 0.0


def test_corrupt_pages_after_good_rows_raise_unreadable_with_the_row(tmp_path):
    import pyarrow.parquet as pq

    path = write(inference_table(400, dim=32), tmp_path / "c.parquet", row_group_size=200)
    column = pq.read_metadata(path).row_group(1).column(3)  # features of the second row group
    data = bytearray(path.read_bytes())
    start = column.data_page_offset + 40
    data[start:start + 2000] = b"\xff" * 2000
    path.write_bytes(bytes(data))
    tl = tailer(tmp_path, batch_rows=100)
    [f] = tl.discover({})
    read = tl.read(f, 0, {})
    assert [next(read).next_row, next(read).next_row] == [100, 200]  # the intact row group is used
    with pytest.raises(ContractError) as err:
        next(read)
    assert (err.value.reason, err.value.row) == (UNREADABLE, 200) and "corrupt" in str(err.value)


def test_a_settled_file_with_an_io_error_is_retried_before_quarantine(tmp_path: Path) -> None:
    """A corrupt footer (pyarrow raises OSError, as for a storage hiccup) gets IO_ATTEMPTS reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from monitor.ingest.config import IngestConfig
    from monitor.errors import ContractError
    from monitor.ingest.tail import IO_ATTEMPTS, FileNotReady, Tailer

    logs = tmp_path / "logs"
    logs.mkdir()
    pq.write_table(pa.table({"a": list(range(100))}), logs / "p.parquet")
    data = (logs / "p.parquet").read_bytes()
    (logs / "p.parquet").write_bytes(data[:-20] + b"x" * 12 + data[-8:])  # footer length intact, thrift broken
    tailer = Tailer(str(logs), "inference", IngestConfig(settle_seconds=0.0))
    (info,) = tailer.discover({})
    for _ in range(IO_ATTEMPTS - 1):
        with pytest.raises(FileNotReady, match="retrying"):
            list(tailer.read(info, 0, {}))
    with pytest.raises(ContractError) as err:
        list(tailer.read(info, 0, {}))
    assert err.value.reason == UNREADABLE
