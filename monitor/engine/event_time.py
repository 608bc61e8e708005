"""The stream's own clock: the *watermark* (the newest prediction timestamp accepted, persisted
with the checkpoint) and each model_version's [first, last] prediction time.

Label TTLs and retention are judged against the watermark (see ``monitor.ingest.labels``),
windows span event time, and the retrain job's lookback reads it, so a replay of months-old logs
behaves exactly as the live traffic did. Kept apart from the cycle because it is the one place
that decides what time the stream is at; the wall clock enters only to cap a producer clock far
ahead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from monitor.ingest.store import WATERMARK, StateStore

log = logging.getLogger("monitor.engine")  # the engine's logger: log filters keep working

# A producer clock far ahead (a typo'd year) must not age every buffered row out at once: the
# watermark never runs more than this ahead of this host's clock.
MAX_CLOCK_AHEAD_SECONDS = 3600.0


class EventTime:
    """The watermark, read from and written to ``store``, and the versions' event-time spans."""

    def __init__(self, store: StateStore, *, clock: Callable[[], float] = time.time):
        self.store = store
        self.clock = clock
        self.watermark: float | None = store.get_mark(WATERMARK)
        # model_version -> [first, last] prediction time seen (event time), every version
        self.version_times: dict[str, list[float]] = {}
        self._warned_ahead = False

    def reload(self) -> None:
        """Back to the last commit (after a rollback): the stored watermark, no spans (the
        checkpoint restores those)."""
        self.watermark = self.store.get_mark(WATERMARK)
        self.version_times = {}

    def advance(self, newest: float) -> None:
        """A batch's newest prediction time: moves the watermark on (never back, never more than
        MAX_CLOCK_AHEAD_SECONDS past this host's clock) and persists it in the open transaction."""
        ceiling = self.clock() + MAX_CLOCK_AHEAD_SECONDS
        if newest > ceiling:
            if not self._warned_ahead:
                self._warned_ahead = True
                log.warning("prediction timestamps reach %s, more than %.0f s ahead of this host's clock: the "
                            "event-time watermark is held at the host's clock + %.0f s (check the producer's clock)",
                            iso_time(newest), MAX_CLOCK_AHEAD_SECONDS, MAX_CLOCK_AHEAD_SECONDS)
            newest = ceiling
        if self.watermark is None or newest > self.watermark:
            self.watermark = newest
            self.store.set_mark(WATERMARK, newest)

    def note_version(self, version: str, timestamps: np.ndarray) -> None:
        """Widen ``version``'s [first, last] span to cover ``timestamps``."""
        if not len(timestamps):
            return
        lo, hi = float(timestamps.min()), float(timestamps.max())
        span = self.version_times.get(version)
        self.version_times[version] = [lo, hi] if span is None else [min(span[0], lo), max(span[1], hi)]


def iso_time(ts: float | None) -> str:
    if ts is None:
        return "(none yet)"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
