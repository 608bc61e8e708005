"""A retrain job's progress events: what each line of ``progress.jsonl`` holds.

``{"time": epoch s, "event": "started"|"phase"|"epoch"|"step"|"guard"|"gate"|"promoted"|"rejected"|"failed", ...}``;
"step" comes every 25 fine-tune steps with ``epoch``, ``grad_norm`` and ``weight_drift`` (the
daemon's guard gauges read the last line), "guard" on every trip. The job directory's reader and
writer of these lines is retrain.jobdir; this module is the event type both sides agree on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

EVENTS = ("started", "phase", "epoch", "step", "guard", "gate", "promoted", "rejected", "failed")
# The daemon's guard gauges: these keep their last reported value while lines without them
# (a phase starting, a guard trip) come in between.
GAUGE_KEYS = ("epoch", "grad_norm", "weight_drift")


@dataclass(frozen=True)
class ProgressEvent:
    """One progress line: its kind, when it was written, and the kind's own fields."""

    event: str
    time: float | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.event not in EVENTS:
            raise ValueError(f"unknown progress event {self.event!r}; expected one of {', '.join(EVENTS)}")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ProgressEvent":
        rest = {k: v for k, v in data.items() if k not in ("event", "time")}
        return cls(event=data.get("event"), time=data.get("time"), fields=rest)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        """The line as written: ``time`` first, then ``event`` and the fields."""
        return {"time": self.time, "event": self.event, **self.fields}

    def number(self, key: str) -> float | None:
        """``fields[key]`` when it is a real number (not a bool), else None."""
        value = self.fields.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
