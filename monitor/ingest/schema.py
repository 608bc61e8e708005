"""The file-level half of the log contract (see ``monitor.ingest.contract`` for the columns):
each file's footer schema is checked before any of its rows is used.

Kept apart from the row conversion because it needs the footer only: a missing or mistyped
column, or a fixed-size list whose length no reference expects, makes the whole file unusable
and raises :class:`ContractError`, which the caller turns into a quarantined file. What passes
is an :class:`InferenceLayout` / :class:`LabelLayout`, telling the reader which columns to read
and how to convert them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

from monitor.errors import ContractError
from monitor.ingest.counters import FEATURE_DIM, PROBS_LENGTH, SCHEMA

_FLOATS = (pa.float16(), pa.float32(), pa.float64())


@dataclass(frozen=True)
class InferenceLayout:
    """What one inference file's footer says: which columns to read and how to convert them."""

    path: str
    scores: Literal["probs", "logits"]   # which column holds the class scores
    feature_dim: int | None              # D when ``features`` is a fixed-size list, else None
    class_dim: int | None                # C when the scores column is a fixed-size list, else None
    timestamp_unit: str                  # "s"/"ms"/"us"/"ns" for Arrow timestamps, "epoch_ms" for int64
    has_prediction: bool
    has_input_uri: bool
    has_label: bool

    @property
    def columns(self) -> list[str]:
        """The only columns a reader should fetch (extra columns are never read)."""
        cols = ["request_id", "timestamp", "model_version", "features", self.scores]
        cols += [name for name, present in (("prediction", self.has_prediction),
                                           ("input_uri", self.has_input_uri),
                                           ("label", self.has_label)) if present]
        return cols


@dataclass(frozen=True)
class LabelLayout:
    path: str
    timestamp_unit: str                  # unit of ``labeled_at``, as in InferenceLayout

    @property
    def columns(self) -> list[str]:
        return ["request_id", "label", "labeled_at"]


def _schema_error(path: str, column: str, found: str, expected: str) -> ContractError:
    return ContractError(
        f"{path}: column {column!r} is {found}, expected {expected}; "
        "fix the producer (see monitor.ingest.writer.LogWriter) and write a corrected file under a new name",
        reason=SCHEMA, path=path, column=column,
    )


def _field_type(schema: pa.Schema, name: str, path: str, expected: str, *, required: bool = True) -> pa.DataType | None:
    index = schema.get_field_index(name)
    if index < 0:
        if required:
            raise _schema_error(path, name, "missing", expected)
        return None
    return schema.field(index).type


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _check_string(schema: pa.Schema, name: str, path: str, *, required: bool = True) -> bool:
    t = _field_type(schema, name, path, "string", required=required)
    if t is None:
        return False
    if not _is_string(t):
        raise _schema_error(path, name, f"of type {t}", "string")
    return True


def _check_int(schema: pa.Schema, name: str, path: str, *, required: bool = True) -> bool:
    t = _field_type(schema, name, path, "an integer type", required=required)
    if t is None:
        return False
    if not pa.types.is_integer(t):
        raise _schema_error(path, name, f"of type {t}", "an integer type (int32/int64)")
    return True


def _time_unit(schema: pa.Schema, name: str, path: str) -> str:
    expected = "an Arrow timestamp (any unit) or int64 epoch milliseconds"
    t = _field_type(schema, name, path, expected)
    if pa.types.is_timestamp(t):
        return str(t.unit)
    if pa.types.is_int64(t):
        return "epoch_ms"
    raise _schema_error(path, name, f"of type {t}", expected)


def _float_list_dim(schema: pa.Schema, name: str, path: str, *, required: bool = True) -> tuple[bool, int | None]:
    """(present, fixed size or None) for a list-of-float column."""
    expected = "fixed_size_list<float32>[N] or list<float32> (float16/float64 values are accepted)"
    t = _field_type(schema, name, path, expected, required=required)
    if t is None:
        return False, None
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    if not is_list or t.value_type not in _FLOATS:
        raise _schema_error(path, name, f"of type {t}", expected)
    return True, (t.list_size if pa.types.is_fixed_size_list(t) else None)


def check_inference_schema(schema: pa.Schema, path: str) -> InferenceLayout:
    """File-level check of an inference file from its footer schema.

    Raises ContractError(reason="schema", column=...) naming the file, column, found and expected type.
    """
    _check_string(schema, "request_id", path)
    unit = _time_unit(schema, "timestamp", path)
    _check_string(schema, "model_version", path)
    _, feature_dim = _float_list_dim(schema, "features", path)
    has_probs, probs_dim = _float_list_dim(schema, "probs", path, required=False)
    has_logits, logits_dim = _float_list_dim(schema, "logits", path, required=False)
    if not (has_probs or has_logits):
        raise _schema_error(path, "probs", "missing (and no 'logits' column either)",
                            "a 'probs' or 'logits' list<float32> column")
    return InferenceLayout(
        path=path,
        scores="probs" if has_probs else "logits",
        feature_dim=feature_dim,
        class_dim=probs_dim if has_probs else logits_dim,
        timestamp_unit=unit,
        has_prediction=_check_int(schema, "prediction", path, required=False),
        has_input_uri=_check_string(schema, "input_uri", path, required=False),
        has_label=_check_int(schema, "label", path, required=False),
    )


def check_label_schema(schema: pa.Schema, path: str) -> LabelLayout:
    """File-level check of a label file; raises ContractError(reason="schema") like the above."""
    _check_string(schema, "request_id", path)
    _check_int(schema, "label", path)
    return LabelLayout(path=path, timestamp_unit=_time_unit(schema, "labeled_at", path))


def check_layout_dims(layout: InferenceLayout, expectations: Mapping[str, tuple[int, int]]) -> None:
    """A fixed-size list whose length no reference expects makes every row unusable: a file defect.

    Raises ContractError(reason="feature_dim" | "probs_length"). No-op when expectations is empty.
    """
    if not expectations:
        return
    checks = ((FEATURE_DIM, "features", layout.feature_dim, 0), (PROBS_LENGTH, layout.scores, layout.class_dim, 1))
    for reason, column, dim, i in checks:
        wanted = sorted({dims[i] for dims in expectations.values()})
        if dim is not None and dim not in wanted:
            versions = ", ".join(f"{v}={d[i]}" for v, d in sorted(expectations.items()))
            raise ContractError(
                f"{layout.path}: column {column!r} is a fixed-size list of {dim} values but the references "
                f"expect {wanted} ({versions}); the producer logs a different model than the references "
                "describe: build a reference for it (`driftd reference build`) or fix the producer",
                reason=reason, path=layout.path, column=column,
            )
