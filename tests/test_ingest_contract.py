"""The log contract: schema checks, row rejections by reason, conversions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from monitor.errors import ContractError
from monitor.ingest.contract import to_inference_batch, to_label_batch
from monitor.ingest.counters import (
    FEATURE_DIM,
    LABEL_INVALID,
    NON_FINITE,
    NULL_FIELD,
    PREDICTION_INVALID,
    PROBS_INVALID,
    PROBS_LENGTH,
    SCHEMA,
)
from monitor.ingest.rejections import RowRejections, classify_rows
from monitor.ingest.schema import check_inference_schema, check_label_schema, check_layout_dims
from ingest_helpers import float_lists, inference_table, label_table, replace_column


def convert(table: pa.Table, expectations=None, first_row: int = 0):
    layout = check_inference_schema(table.schema, "f.parquet")
    return to_inference_batch(table, layout, path="f.parquet", first_row=first_row, expectations=expectations or {})


def test_valid_rows_convert_to_numpy():
    table = inference_table(5, dim=4, classes=3)
    batch, rej = convert(table)
    assert not rej and len(batch) == 5
    assert batch.features.dtype == np.float32 and batch.features.shape == (5, 4)
    np.testing.assert_allclose(batch.features, np.asarray(table["features"].to_pylist(), dtype=np.float32))
    assert batch.probs.shape == (5, 3)
    np.testing.assert_array_equal(batch.prediction, batch.probs.argmax(axis=1))  # derived when absent
    assert batch.timestamp[1] - batch.timestamp[0] == pytest.approx(1.0)
    assert batch.timestamp[0] == pytest.approx(1_790_000_000.0)
    assert list(batch.request_id) == [f"r{i}" for i in range(5)]
    assert batch.input_uri is None and batch.label is None


@pytest.mark.parametrize("ts_type", [pa.timestamp("s"), pa.timestamp("us", tz="UTC"), pa.timestamp("ns", tz="Europe/Paris"), pa.int64()],
                         ids=["naive-s", "utc-us", "paris-ns", "epoch-ms"])
def test_timestamp_types_become_epoch_seconds(ts_type):
    table = inference_table(2)
    seconds = np.array([1_790_000_000, 1_790_000_001], dtype=np.int64)
    if pa.types.is_int64(ts_type):
        values = pa.array(seconds * 1000, pa.int64())
    else:
        scale = {"s": 1, "us": 10**6, "ns": 10**9}[ts_type.unit]
        values = pa.array(seconds * scale, pa.int64()).cast(ts_type)
    batch, _ = convert(replace_column(table, "timestamp", values))
    np.testing.assert_allclose(batch.timestamp, seconds.astype(float))


def test_logits_softmaxed_and_variable_lists_float64_accepted():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 3)) * 5
    table = inference_table(4, fixed=False).drop_columns(["probs"]).append_column(
        "logits", float_lists(logits, fixed=False, dtype=pa.float64()))
    batch, rej = convert(table)
    assert not rej
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(batch.probs, expected, rtol=1e-5)
    assert batch.probs.dtype == np.float32


def test_extra_columns_ignored_and_optional_columns_read():
    table = inference_table(3).append_column("debug_blob", pa.array([b"x"] * 3)).append_column(
        "input_uri", pa.array(["s3://b/0.jpg", None, "s3://b/2.jpg"])).append_column(
        "label", pa.array([2, None, 0], pa.int32())).append_column("prediction", pa.array([0, 1, 2], pa.int64()))
    layout = check_inference_schema(table.schema, "f.parquet")
    assert "debug_blob" not in layout.columns
    batch, _ = convert(table)
    assert list(batch.input_uri) == ["s3://b/0.jpg", None, "s3://b/2.jpg"]
    assert list(batch.label) == [2, -1, 0]
    assert list(batch.prediction) == [0, 1, 2]


@pytest.mark.parametrize("column,bad_type", [
    ("request_id", pa.int64()), ("timestamp", pa.string()), ("model_version", pa.int32()),
    ("features", pa.list_(pa.string())), ("features", pa.float32()), ("probs", pa.int32()),
], ids=["request_id-int", "timestamp-str", "version-int", "features-strings", "features-scalar", "probs-int"])
def test_mistyped_column_is_a_schema_error(column, bad_type):
    schema = inference_table(1).schema
    schema = schema.set(schema.get_field_index(column), pa.field(column, bad_type))
    with pytest.raises(ContractError) as err:
        check_inference_schema(schema, "logs/a.parquet")
    e = err.value
    assert (e.reason, e.column, e.path) == (SCHEMA, column, "logs/a.parquet")
    assert str(bad_type) in str(e) and "expected" in str(e) and "logs/a.parquet" in str(e)


@pytest.mark.parametrize("column", ["request_id", "timestamp", "model_version", "features", "probs"])
def test_missing_column_is_a_schema_error(column):
    schema = inference_table(1).schema
    with pytest.raises(ContractError, match="missing") as err:
        check_inference_schema(schema.remove(schema.get_field_index(column)), "a.parquet")
    assert err.value.column == column


def test_label_schema_checked():
    check_label_schema(label_table(["a"], [1]).schema, "l.parquet")
    bad = label_table(["a"], [1]).schema
    bad = bad.set(1, pa.field("label", pa.float32()))
    with pytest.raises(ContractError) as err:
        check_label_schema(bad, "l.parquet")
    assert err.value.column == "label"


def test_fixed_dims_matching_no_reference_is_a_file_defect():
    layout = check_inference_schema(inference_table(1, dim=4, classes=3).schema, "a.parquet")
    check_layout_dims(layout, {})  # nothing to compare against
    check_layout_dims(layout, {"v1": (4, 3)})
    with pytest.raises(ContractError) as err:
        check_layout_dims(layout, {"v1": (8, 3), "v2": (16, 3)})
    assert (err.value.reason, err.value.column) == (FEATURE_DIM, "features")
    with pytest.raises(ContractError) as err:
        check_layout_dims(layout, {"v1": (4, 10)})
    assert (err.value.reason, err.value.column) == (PROBS_LENGTH, "probs")


def _variable_rows(rows: list[list[float] | None]) -> pa.Array:
    return pa.array(rows, pa.list_(pa.float32()))


def test_row_reasons_counted_once_with_first_offender():
    n = 8
    table = inference_table(n, dim=2, classes=2, fixed=False)
    feats = np.asarray(table["features"].to_pylist())
    probs = np.asarray(table["probs"].to_pylist())
    rows_f: list = feats.tolist()
    rows_p: list = probs.tolist()
    rows_f[1] = [np.nan, 1.0]             # non_finite
    rows_f[2] = [1.0, 2.0, 3.0]           # feature_dim
    rows_p[3] = [1.0]                     # probs_length
    rows_p[4] = [0.7, 0.7]                # probs_invalid (sum)
    rows_p[5] = [1.5, -0.5]               # probs_invalid (negative)
    rows_f[6] = None                      # null_field
    rows_p[6] = [np.inf, 0.0]             # also non-finite, but counted once as null_field
    table = replace_column(table, "features", _variable_rows(rows_f))
    table = replace_column(table, "probs", _variable_rows(rows_p))
    batch, rej = convert(table, first_row=100)
    assert dict(rej.counts) == {NON_FINITE: 1, FEATURE_DIM: 1, PROBS_LENGTH: 1, PROBS_INVALID: 2, NULL_FIELD: 1}
    assert (rej.first_row, rej.first_column, rej.first_reason) == (101, "features", NON_FINITE)
    assert list(batch.request_id) == ["r0", "r7"]
    assert batch.first_row == 100


def test_null_request_id_and_expectation_mismatch():
    table = inference_table(4, dim=3, classes=2, fixed=False)
    table = replace_column(table, "request_id", pa.array(["a", None, "c", "d"]))
    table = replace_column(table, "model_version", pa.array(["v1", "v1", "v2", "v3"]))
    # v1 expects D=3 (ok), v2 expects D=5 (row 2 wrong), v3 has no reference (file dims apply)
    batch, rej = convert(table, {"v1": (3, 2), "v2": (5, 2)})
    assert dict(rej.counts) == {NULL_FIELD: 1, FEATURE_DIM: 1}
    assert (rej.first_row, rej.first_column) == (1, "request_id")
    assert list(batch.request_id) == ["a", "d"]


def test_probs_length_against_expectation_and_bad_prediction():
    table = inference_table(3, dim=2, classes=3).append_column("prediction", pa.array([0, 7, None], pa.int64()))
    _, rej = convert(table, {"v1": (2, 4)})
    assert dict(rej.counts) == {PROBS_LENGTH: 3}
    batch, rej = convert(table, {"v1": (2, 3)})
    assert dict(rej.counts) == {PREDICTION_INVALID: 1} and rej.first_row == 1
    assert batch.prediction[1] == batch.probs[1].argmax()  # null prediction derived


def test_label_rows_rejected_by_reason():
    table = label_table(["a", "b", None, "d"], [1, -2, 0, 3])
    layout = check_label_schema(table.schema, "l.parquet")
    batch, rej = to_label_batch(table, layout, path="l.parquet", first_row=10)
    assert dict(rej.counts) == {LABEL_INVALID: 1, NULL_FIELD: 1}
    assert (rej.first_row, rej.first_reason, rej.first_column) == (11, LABEL_INVALID, "label")
    assert list(batch.request_id) == ["a", "d"] and list(batch.label) == [1, 3]
    assert batch.labeled_at[0] == pytest.approx(1_790_000_100.0)


def test_large_batch_keeps_values_in_row_order():
    table = inference_table(20_000, dim=64, classes=10)
    batch, rej = convert(table)
    assert not rej and batch.features.shape == (20_000, 64)
    flat = table["features"].combine_chunks().values.to_numpy()
    np.testing.assert_array_equal(batch.features.reshape(-1), flat)


@pytest.mark.parametrize("dtype", [pa.float16(), pa.float64()], ids=["float16", "float64"])
def test_other_float_widths_cast_and_overflow_is_non_finite(dtype):
    values = np.array([[0.5, -1.0], [1e300 if dtype == pa.float64() else np.inf, 0.0]])  # 1e300 overflows float32
    table = replace_column(inference_table(2, dim=2), "features", float_lists(values, dtype=dtype))
    batch, rej = convert(table)
    assert dict(rej.counts) == {NON_FINITE: 1} and rej.first_row == 1
    assert batch.features.dtype == np.float32 and batch.features.tolist() == [[0.5, -1.0]]


def test_classify_rows_claims_each_row_once_in_order():
    keep, rej = classify_rows(50, [
        ("a", "x", np.array([False, True, True, False])),
        ("b", "y", np.array([True, True, False, False])),
    ])
    assert keep.tolist() == [False, False, False, True]
    assert dict(rej.counts) == {"a": 2, "b": 1} and (rej.first_row, rej.first_reason, rej.first_column) == (50, "b", "y")
    assert rej.merge(RowRejections({"a": 1}, 10, "z", "a")).counts == {"a": 3, "b": 1}
    assert rej.merge(RowRejections({"a": 1}, 10, "z", "a")).first_row == 10
