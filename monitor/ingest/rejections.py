"""Rows a batch drops, counted by reason: :class:`RowRejections` and the ordered row checks that
fill it (:func:`classify_rows`).

Kept apart from the contract's conversion code because the engine uses it too (rows with a
``duplicate_request_id``), and the quarantine records and counts what it holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class RowRejections:
    """Rows dropped from one batch (or file), by reason, plus the first offender for the record.

    ``first_row`` is a row index within the file; ``counts`` maps reason -> number of rows.
    """

    counts: Mapping[str, int] = field(default_factory=dict)
    first_row: int | None = None
    first_column: str = ""
    first_reason: str = ""

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return self.total > 0

    def merge(self, other: "RowRejections") -> "RowRejections":
        """Counts added together; the first offender is the earlier row of the two."""
        counts = dict(self.counts)
        for reason, n in other.counts.items():
            counts[reason] = counts.get(reason, 0) + n
        first = self
        if self.first_row is None or (other.first_row is not None and other.first_row < self.first_row):
            first = other
        return RowRejections(counts, first.first_row, first.first_column, first.first_reason)


def classify_rows(first_row: int, checks: Sequence[tuple[str, str, np.ndarray]]) -> tuple[np.ndarray, RowRejections]:
    """Apply row checks in order; each ``(reason, column, bad_mask)`` only claims rows still kept.

    Returns the keep mask and the rejections (row indices offset by ``first_row``). The engine
    uses this too, e.g. for ``duplicate_request_id``.
    """
    keep: np.ndarray | None = None
    counts: dict[str, int] = {}
    first: tuple[int, str, str] | None = None
    for reason, column, bad in checks:
        if keep is None:
            keep = np.ones(bad.shape[0], dtype=bool)
        hit = bad & keep
        n = int(hit.sum())
        if n == 0:
            continue
        counts[reason] = counts.get(reason, 0) + n
        row = int(np.argmax(hit))
        if first is None or row < first[0]:
            first = (row, column, reason)
        keep &= ~hit
    if keep is None:
        keep = np.ones(0, dtype=bool)
    if first is None:
        return keep, RowRejections()
    return keep, RowRejections(counts, first_row + first[0], first[1], first[2])
