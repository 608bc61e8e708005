"""The engine's checkpoint: what :class:`monitor.engine.cycle.Engine` keeps in memory between
commits (each version's tracker state, the latest and the unacknowledged windows, label
evaluations, per-version event times), as one versioned npz blob in the state store.

Kept apart from the cycle because the format is a contract with every state directory already
written: STATE_FORMAT says which fields a blob has, a blob from a newer driftd is refused with a
message, and older formats still load. The blob is committed in the same SQLite transaction as
the ingest cursor (``monitor.ingest.store``), which is what makes the cycle exactly-once.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitor.errors import StateError
from monitor.signals.results import AccuracyStats, LabelEvaluation, WindowSignals

STATE_BLOB = "engine"
STATE_FORMAT = 3  # 2: unacknowledged windows; 3: label evaluations, per-version event times


@dataclass(frozen=True)
class EngineCheckpoint:
    """One checkpoint, decoded. ``trackers``: model_version -> (arrays, meta) as
    ``WindowTracker.state_dict`` returns them; ``online_config`` fingerprints the online detector
    settings the tracker states were calibrated with (None when the blob has none)."""

    online_config: dict | None
    trackers: dict[str, tuple[dict[str, np.ndarray], dict]]
    latest: dict[str, WindowSignals]
    unacked: list[WindowSignals]
    unacked_evaluations: list[LabelEvaluation]
    version_times: dict[str, list[float]]

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {}
        versions = {}
        for i, (version, (a, meta)) in enumerate(sorted(self.trackers.items())):
            arrays.update({f"{i}.{k}": v for k, v in a.items()})
            versions[version] = {"slot": i, **meta}
        latest = {v: dataclasses.asdict(w) for v, w in self.latest.items()}
        header = {
            "format": STATE_FORMAT,
            "online_config": self.online_config,
            "versions": versions,
            "latest": latest,
            "unacked": [dataclasses.asdict(w) for w in self.unacked],
            "unacked_evaluations": [dataclasses.asdict(e) for e in self.unacked_evaluations],
            "version_times": self.version_times,
        }
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes, state_dir: Path) -> EngineCheckpoint:
        """Decode a blob written by :meth:`to_bytes` (this or an older format). Raises StateError,
        naming ``state_dir``, when it is unreadable or from a newer driftd."""
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            header = json.loads(arrays.pop("header").tobytes())
        except (ValueError, KeyError, OSError) as exc:
            raise StateError(
                f"{state_dir}: engine checkpoint is unreadable ({exc}); move the state "
                "directory aside to start over (the logs will be read again)"
            ) from None
        if header.get("format", 0) > STATE_FORMAT:
            raise StateError(
                f"{state_dir}: checkpoint format {header['format']} is newer than this driftd "
                f"({STATE_FORMAT}); upgrade driftd or point state_dir elsewhere"
            )
        trackers = {}
        for version, meta in header["versions"].items():
            prefix = f"{meta['slot']}."
            trackers[version] = ({k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}, meta)
        latest = {v: _window_from_dict(d) for v, d in header["latest"].items()}
        unacked = [_window_from_dict(d) for d in header["unacked"]] if header["format"] >= 2 else []
        evaluations: list[LabelEvaluation] = []
        version_times: dict[str, list[float]] = {}
        if header["format"] >= 3:
            evaluations = [_evaluation_from_dict(d) for d in header["unacked_evaluations"]]
            version_times = {str(v): [float(a), float(b)] for v, (a, b) in header["version_times"].items()}
        return cls(
            online_config=header.get("online_config"),
            trackers=trackers,
            latest=latest,
            unacked=unacked,
            unacked_evaluations=evaluations,
            version_times=version_times,
        )


def _window_from_dict(d: dict) -> WindowSignals:
    """Rebuild the last window of each version (so status is complete right after a restart)."""
    from monitor.signals import results as r

    act = dict(d["activations"])
    act["top_dims"] = tuple(r.DimShift(**x) for x in act["top_dims"])
    pred = dict(d["predictions"])
    pred["class_share"] = tuple(pred["class_share"])
    return WindowSignals(
        model_version=d["model_version"],
        index=d["index"],
        start_time=d["start_time"],
        end_time=d["end_time"],
        rows=d["rows"],
        activations=r.ActivationStats(**act),
        predictions=r.PredictionStats(**pred),
        mmd=None if d["mmd"] is None else r.MmdResult(**d["mmd"]),
        online=r.OnlineMmdStatus(**d["online"]),
        accuracy=_accuracy_from_dict(d["accuracy"]),
        estimate=None if d["estimate"] is None else r.EstimateStats(**d["estimate"]),
        reference_id=d.get("reference_id", ""),
    )


def _accuracy_from_dict(d: dict) -> AccuracyStats:
    acc = dict(d)
    acc["per_class_recall"] = {int(k): v for k, v in acc["per_class_recall"].items()}
    return AccuracyStats(**acc)


def _evaluation_from_dict(d: dict) -> LabelEvaluation:
    return LabelEvaluation(**{**d, "accuracy": _accuracy_from_dict(d["accuracy"])})
