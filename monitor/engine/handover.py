"""What the engine hands its consumer (the daemon's policy, ``driftd check``): closed windows and
label evaluations, kept until the consumer acknowledges them.

Kept apart from the cycle because it is the engine's side of an at-least-once hand-over: the
pending items are part of the checkpoint (``monitor.engine.checkpoint``), so items committed just
before a crash are handed over again after it; the consumer skips the ones it had already acted
on. At most _MAX_UNACKED of each are kept, the newest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from monitor.signals.results import LabelEvaluation, WindowSignals

log = logging.getLogger("monitor.engine")  # the engine's logger: log filters keep working

_MAX_UNACKED = 1000


class Handover:
    """Closed windows and label evaluations not yet acknowledged, oldest first."""

    def __init__(self, windows: Iterable[WindowSignals] = (), evaluations: Iterable[LabelEvaluation] = ()):
        self.windows: list[WindowSignals] = list(windows)
        self.evaluations: list[LabelEvaluation] = list(evaluations)

    def add_windows(self, windows: list[WindowSignals]) -> None:
        self.windows += windows
        if len(self.windows) > _MAX_UNACKED:
            log.warning("%d closed windows were never acknowledged; keeping the newest %d",
                        len(self.windows), _MAX_UNACKED)
            del self.windows[:-_MAX_UNACKED]

    def add_evaluations(self, evaluations: list[LabelEvaluation]) -> None:
        self.evaluations += evaluations
        if len(self.evaluations) > _MAX_UNACKED:
            del self.evaluations[:-_MAX_UNACKED]

    def acknowledge(self, windows: Iterable[WindowSignals], evaluations: Iterable[LabelEvaluation] = ()) -> None:
        """The consumer has durably acted on ``windows`` and ``evaluations``."""
        done = {(w.model_version, w.reference_id, w.index) for w in windows}
        self.windows = [w for w in self.windows if (w.model_version, w.reference_id, w.index) not in done]
        judged = {(e.model_version, e.reference_id, e.index) for e in evaluations}
        self.evaluations = [e for e in self.evaluations
                            if (e.model_version, e.reference_id, e.index) not in judged]
