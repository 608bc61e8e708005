"""The stable names behind driftd's counters: rejection reasons and counter kinds.

A counter in the state store is keyed ``(kind, key)`` (:meth:`monitor.ingest.store.StateStore.add_counter`)
and becomes a Prometheus series whose label is the key, so these strings are part of the
interface: dashboards, alerts and quarantine records name them. Each is defined once here; code
and tests import the constant, so a renamed reason or kind fails the tests that count it.

Rejection reasons are what :class:`monitor.errors.ContractError` carries (``reason``), what a
quarantine record says and what keys the ``rejected_rows`` and ``quarantined_files`` counters.
"""

from __future__ import annotations

# -- rejection reasons: a whole file (quarantined) ------------------------------------------
UNREADABLE = "unreadable"                      # the file (or a data page of it) cannot be read
SCHEMA = "schema"                              # a missing or mistyped column
REWRITTEN = "rewritten"                        # changed in place after driftd read part of it
# -- a whole file (a fixed-size list no reference expects) or a row -------------------------
FEATURE_DIM = "feature_dim"                    # features of a length the reference does not expect
PROBS_LENGTH = "probs_length"                  # probs/logits of a length the reference does not expect
# -- rejection reasons: a row (dropped, the file goes on), in the order they are checked -----
NULL_FIELD = "null_field"
NON_FINITE = "non_finite"                      # a NaN or infinite feature or score
PROBS_INVALID = "probs_invalid"                # negative probs, or probs not summing to 1
PREDICTION_INVALID = "prediction_invalid"      # a logged prediction outside [0, C)
LABEL_INVALID = "label_invalid"                # a negative label
DUPLICATE_REQUEST_ID = "duplicate_request_id"  # the engine's, via the label joiner

# Stable reason tokens (metric labels): pre-create them so dashboards show 0 before any defect.
FILE_REASONS = (UNREADABLE, SCHEMA, FEATURE_DIM, PROBS_LENGTH, REWRITTEN)
ROW_REASONS = (NULL_FIELD, NON_FINITE, FEATURE_DIM, PROBS_LENGTH, PROBS_INVALID, PREDICTION_INVALID,
               LABEL_INVALID, DUPLICATE_REQUEST_ID)

# -- counter kinds, and what their keys are ---------------------------------------------------
ROWS = "rows"                                  # inference rows accepted; key: model_version
ROWS_WITHOUT_REFERENCE = "rows_without_reference"  # rows of a version with no reference; key: model_version
WINDOWS = "windows"                            # windows closed; key: model_version
FILES = "files"                                # log files fully read; key: "inference" or "labels"
REJECTED_ROWS = "rejected_rows"                # key: a rejection reason
QUARANTINED_FILES = "quarantined_files"        # key: a rejection reason
LABELS = "labels"                              # label rows; key: JOINED, DUPLICATE, UNMATCHED, DROPPED_OVER_CAP
PREDICTIONS = "predictions"                    # predictions waiting for labels; key: EXPIRED, DROPPED_OVER_CAP
LABELLED = "labelled"                          # joined rows; key: PRUNED

# -- keys of the label-join counters --------------------------------------------------------
JOINED = "joined"                              # a label met its prediction
DUPLICATE = "duplicate"                        # a label for a request_id already labelled or waiting
UNMATCHED = "unmatched"                        # a label that aged out (or was dropped) unmatched
DROPPED_OVER_CAP = "dropped_over_cap"          # dropped, oldest first, over the buffer's cap
EXPIRED = "expired"                            # a prediction that waited its TTL without a label
PRUNED = "pruned"                              # a joined row older than the retention
