"""Builders for real inference/label Parquet files used by the ingest tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def float_lists(values: np.ndarray, *, fixed: bool = True, dtype: pa.DataType = pa.float32()) -> pa.Array:
    """A [n, k] array as fixed_size_list<dtype>[k] (or list<dtype>)."""
    n, k = values.shape
    flat = pa.array(values.reshape(-1).astype(dtype.to_pandas_dtype()), type=dtype)
    if fixed:
        return pa.FixedSizeListArray.from_arrays(flat, k)
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), flat)


def probs_for(n: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    p = rng.random((n, classes)).astype(np.float64) + 0.05
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def inference_table(
    n: int, *, dim: int = 4, classes: int = 3, start: int = 0, version: str = "v1", seed: int = 0,
    fixed: bool = True, t0_ms: int = 1_790_000_000_000, prefix: str = "r",
) -> pa.Table:
    """n valid inference rows with request ids ``{prefix}{start}..``, one per second from t0."""
    rng = np.random.default_rng(seed)
    return pa.table({
        "request_id": pa.array([f"{prefix}{i}" for i in range(start, start + n)], pa.string()),
        "timestamp": pa.array(t0_ms + 1000 * np.arange(start, start + n, dtype=np.int64), pa.timestamp("ms", tz="UTC")),
        "model_version": pa.array([version] * n, pa.string()),
        "features": float_lists(rng.normal(size=(n, dim)).astype(np.float32), fixed=fixed),
        "probs": float_lists(probs_for(n, classes, rng), fixed=fixed),
    })


def label_table(ids: list[str], labels: list[int], labeled_at_ms: int = 1_790_000_100_000) -> pa.Table:
    return pa.table({
        "request_id": pa.array(ids),
        "label": pa.array(labels, pa.int64()),
        "labeled_at": pa.array([labeled_at_ms] * len(ids), pa.int64()),
    })


def write(table: pa.Table, path: Path, *, row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def replace_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def consume(location: str, state_dir: Path, *, commit_every: int, batch_rows: int, stop_after_chunks: int | None = None,
            chunk_delay: float = 0.0, announce: bool = False) -> None:
    """A minimal engine: applies each chunk (counts every request_id in counter "seen"), records
    the file cursor, and commits every ``commit_every`` chunks. ``stop_after_chunks`` simulates a
    crash: it returns without committing what came after the last commit."""
    import sys
    import time

    from monitor.ingest.config import IngestConfig
    from monitor.ingest.store import FileProgress, StateStore
    from monitor.ingest.tail import Tailer

    store = StateStore.open(state_dir)
    tailer = Tailer(location, "inference", IngestConfig(batch_rows=batch_rows))
    chunks = 0
    try:
        for file in tailer.discover(store.file_progress("inference")):
            known = store.file_progress("inference").get(file.path)
            for chunk in tailer.read(file, known.rows_done if known else 0, {}):
                for rid in chunk.batch.request_id:
                    store.add_counter("seen", str(rid), 1)
                store.set_file_progress("inference", FileProgress(
                    file.path, "done" if chunk.end_of_file else "partial", chunk.next_row, file.size, file.mtime))
                chunks += 1
                if stop_after_chunks is not None and chunks >= stop_after_chunks:
                    return
                if chunks % commit_every == 0:
                    store.commit()
                    if announce:
                        print(f"committed {chunks}", flush=True)
                time.sleep(chunk_delay)
        store.commit()
        if announce:
            print("finished", flush=True)
            sys.stdout.flush()
    finally:
        store.close()
