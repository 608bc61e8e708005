"""The monitoring engine: new log rows in, WindowSignals out, with an exactly-once checkpoint.

One cycle tails the inference logs then the label logs, validates each bounded chunk against
the contract, joins labels, feeds each model_version's :class:`WindowTracker`, and commits.
The ingest cursor, the label buffers and every signal's state live in one SQLite transaction
(``monitor.ingest.store``; the engine's own blob is ``monitor.engine.checkpoint``): a crash or
``kill -9`` anywhere rolls back to the last commit, and the rows after it are read again exactly
once, because the state they changed rolled back too.
Long files are committed every couple of seconds mid-file, so progress is visible and a kill
resumes at the last committed batch.

Time: the engine keeps the stream's own clock, the *watermark* (the newest prediction timestamp
accepted, persisted with the checkpoint; ``monitor.engine.event_time``). Label TTLs and retention are judged against it (see
``monitor.ingest.labels``), windows span event time, and the retrain job's lookback reads it, so
a replay of months-old logs behaves exactly as the live traffic did. The wall clock is used only
for what is about this process: when a file settled, when traffic stopped arriving, how old the
oldest unread file is, when to commit.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from monitor.engine.checkpoint import STATE_BLOB, EngineCheckpoint
from monitor.engine.config import MonitorConfig
from monitor.engine.event_time import EventTime, iso_time
from monitor.engine.handover import Handover
from monitor.engine.reference import Reference
from monitor.engine.versions import VersionTrackers
from monitor.engine.window import WindowTracker
from monitor.errors import ContractError
from monitor.ingest.counters import (
    DUPLICATE_REQUEST_ID,
    FILES,
    REJECTED_ROWS,
    REWRITTEN,
    ROWS,
    ROWS_WITHOUT_REFERENCE,
    WINDOWS,
)
from monitor.ingest.labels import ExpiryCounts, LabelJoiner, count_labelled, window_accuracy
from monitor.ingest.quarantine import Quarantine
from monitor.ingest.records import InferenceBatch, JoinedLabel
from monitor.ingest.store import FileProgress, StateStore, connect_readonly
from monitor.ingest.tail import Chunk, FileNotReady, Tailer
from monitor.signals.results import LabelEvaluation, WindowSignals

log = logging.getLogger("monitor.engine")  # the logger name from before the move: log filters keep working

_CHECKPOINT_EVERY_SECONDS = 2.0


@dataclass(frozen=True)
class CycleReport:
    windows: list[WindowSignals]    # windows closed during the cycle, in order
    joined: list[JoinedLabel]       # labels joined during the cycle
    rows: int                       # inference rows accepted
    files: int                      # files finished (inference and labels)
    lag_seconds: float              # age of the oldest file not yet fully processed
    started_at: float
    finished_at: float
    stopped_early: bool             # should_stop() interrupted the cycle (state is still checkpointed)
    evaluations: list[LabelEvaluation] = dataclasses.field(default_factory=list)  # label-time accuracy
    expired: ExpiryCounts = ExpiryCounts()   # what the label buffers aged out or pruned this cycle
    watermark: float | None = None           # the stream's clock after the cycle (epoch s)


class Engine:
    """Owns the state store, the tailers and the versions' trackers (:class:`VersionTrackers`)."""

    def __init__(self, config: MonitorConfig, *, clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        torch.set_num_threads(config.signals.threads)  # see SignalsConfig.threads
        self.versions = VersionTrackers(config)  # raises when reference_dir holds no reference
        # Log locations first: a bad one fails before the state directory is opened and locked.
        self.inference = Tailer(config.logs.inference, "inference", config.ingest, clock=clock)
        self.labels = Tailer(config.logs.labels, "labels", config.ingest, clock=clock) if config.logs.labels else None
        self.store = StateStore.open(config.state_dir)
        try:
            self.quarantine = Quarantine(self.store, config.ingest.quarantine_dir, clock=clock)
            self.joiner = LabelJoiner(self.store, config.ingest)
            self.event_time = EventTime(self.store, clock=clock)
            self._latest: dict[str, WindowSignals] = {}
            self._handover = Handover()  # closed windows and evaluations the consumer has not acknowledged
            self._last_commit = clock()
            self.last_progress = clock()  # read by the daemon's watchdog from another thread
            self._restore()
        except BaseException:
            self.store.close()  # releases the state directory's lock for the next attempt
            raise

    # -- public ---------------------------------------------------------------------------------

    def run_cycle(self, should_stop: Callable[[], bool] = lambda: False,
                  on_checkpoint: Callable[[], None] = lambda: None) -> CycleReport:
        """Process what is new since the checkpoint, then checkpoint. Safe to call repeatedly.

        ``on_checkpoint`` is called after every mid-cycle commit (a long file commits every
        couple of seconds), e.g. so the daemon's metrics show the progress as it happens.

        If anything unexpected is raised half-way, the open transaction is rolled back and the
        in-memory state reloaded from the last checkpoint before the error propagates, so the
        next cycle reads the same rows again instead of finding them half-applied.
        """
        try:
            return self._cycle(should_stop, on_checkpoint)
        except BaseException:
            self.store.rollback()
            self.versions.trackers.clear()
            self._latest, self._handover = {}, Handover()
            self.joiner = LabelJoiner(self.store, self.config.ingest)  # its join number rolled back too
            self.event_time.reload()
            self._restore()
            raise

    def _cycle(self, should_stop: Callable[[], bool], on_checkpoint: Callable[[], None]) -> CycleReport:
        started = self.last_progress = self.clock()
        self.versions.new_cycle()
        windows: list[WindowSignals] = []
        evaluations: list[LabelEvaluation] = []
        joined: list[JoinedLabel] = []
        rows = files = 0
        stopped = False
        for tailer in (self.inference, self.labels):
            if tailer is None or stopped:
                continue
            known = self.store.file_progress(tailer.kind)
            pending = tailer.discover(known)
            for info in tailer.rewritten(known):
                self._quarantine_rewritten(tailer.kind, info, known[info.path])
            for info in pending:
                if should_stop():
                    stopped = True
                    break
                progress = known.get(info.path)
                start = progress.rows_done if progress is not None else 0
                try:
                    for chunk in tailer.read(info, start, self._expectations()):
                        rows_in, new_windows, new_joined, new_evaluations = self._apply(tailer.kind, chunk)
                        rows += rows_in
                        windows += new_windows
                        joined += new_joined
                        evaluations += new_evaluations
                        status = "done" if chunk.end_of_file else "partial"
                        self.store.set_file_progress(
                            tailer.kind, FileProgress(info.path, status, chunk.next_row, info.size, info.mtime)
                        )
                        if chunk.end_of_file:
                            files += 1
                            self.store.add_counter(FILES, tailer.kind, 1)
                        if self._maybe_checkpoint():
                            on_checkpoint()
                        self.last_progress = self.clock()
                        if should_stop():
                            stopped = True
                            break
                except FileNotReady:
                    log.debug("%s is still being written; retrying next cycle", info.path)
                except ContractError as exc:
                    self.quarantine.file(tailer.kind, info, exc, move=False)
                    self._checkpoint()  # the record is durable before the file leaves the logs
                    self.quarantine.move(tailer.kind, info)
                    self._checkpoint()
                if stopped:
                    break
        expired = self.joiner.expire(self.watermark)  # counts what it drops in the store's counters
        if expired.any:
            log.info(
                "label buffers at event time %s: %d joined rows pruned (older than ingest.labelled_retention_seconds), "
                "%d predictions expired unlabelled, %d early labels never matched, %d predictions and %d labels "
                "dropped over the caps", iso_time(self.watermark), expired.labelled_pruned, expired.predictions_expired,
                expired.labels_unmatched, expired.predictions_dropped, expired.labels_dropped)
        for tracker in self.versions.trackers.values():
            flushed = tracker.flush_labels()
            if flushed is not None:
                evaluations += self._record_evaluations([flushed])
        now = self.clock()
        for tracker in self.versions.trackers.values():
            idle = tracker.close_if_idle(now)
            if idle is not None:
                windows += self._record([idle])
        self._checkpoint()
        lag = self.inference.lag_seconds(self.store.file_progress("inference"))
        return CycleReport(
            windows=windows,
            joined=joined,
            rows=rows,
            files=files,
            lag_seconds=lag,
            started_at=started,
            finished_at=self.clock(),
            stopped_early=stopped,
            evaluations=evaluations,
            expired=expired,
            watermark=self.watermark,
        )

    def catch_up(self) -> list[WindowSignals]:
        """Run cycles until one finds nothing new; returns (and acknowledges) the windows closed.

        For one-shot consumers (``driftd check``, reports) that act on the windows themselves."""
        return self.catch_up_with_labels()[0]

    def catch_up_with_labels(self) -> tuple[list[WindowSignals], list[LabelEvaluation]]:
        """:meth:`catch_up`, plus the label evaluations made on the way (acknowledged too)."""
        windows: list[WindowSignals] = []
        evaluations: list[LabelEvaluation] = []
        while True:
            report = self.run_cycle()
            windows += report.windows
            evaluations += report.evaluations
            self.acknowledge(report.windows, report.evaluations)
            if report.rows == 0 and report.files == 0:
                return windows, evaluations

    def latest_windows(self) -> dict[str, WindowSignals]:
        return dict(self._latest)

    def pending_windows(self) -> list[WindowSignals]:
        """Closed windows not yet acknowledged, oldest first. They are part of the checkpoint, so
        windows committed just before a crash are handed over again after it (the policy skips
        the ones it had already evaluated)."""
        return list(self._handover.windows)

    def pending_evaluations(self) -> list[LabelEvaluation]:
        """Label evaluations not yet acknowledged, oldest first (handed over again after a crash,
        like :meth:`pending_windows`)."""
        return list(self._handover.evaluations)

    def acknowledge(self, windows: list[WindowSignals], evaluations: list[LabelEvaluation] = ()) -> None:
        """The consumer has durably acted on ``windows`` and ``evaluations``; persisted with the
        next checkpoint."""
        self._handover.acknowledge(windows, evaluations)

    def counters(self) -> dict[tuple[str, str], float]:
        return self.store.counters()

    @property
    def watermark(self) -> float | None:
        """The stream's clock: the newest prediction timestamp accepted (epoch s), None before any."""
        return self.event_time.watermark

    @property
    def version_times(self) -> dict[str, list[float]]:
        """model_version -> [first, last] prediction time seen (event time), every version."""
        return self.event_time.version_times

    @property
    def references(self) -> dict[str, Reference]:
        """model_version -> the reference its windows are judged against."""
        return self.versions.references

    def reload_references(self) -> None:
        """Pick up references added or rebuilt since start-up (see :meth:`VersionTrackers.reload`)."""
        self.versions.reload()

    def count_labelled(self, *, after_join: int = 0, predicted_since: float | None = None,
                       model_version: str | None = None) -> int:
        """Committed labelled rows joined after join number ``after_join``, predicted at or after
        ``predicted_since`` (event time), of ``model_version`` (any thread: own read-only connection)."""
        conn = connect_readonly(self.config.state_dir)
        try:
            return count_labelled(conn, after_join=after_join, predicted_since=predicted_since,
                                  model_version=model_version)
        finally:
            conn.close()

    def pending_counts(self) -> tuple[int, int]:
        """(predictions waiting for labels, labels waiting for predictions), in the open transaction."""
        return self.joiner.pending_counts()

    @property
    def join_seq(self) -> int:
        """Number of the last label join (counts up; a retrain records it to count what is new)."""
        return self.joiner.join_seq

    def window_accuracy(self, window: WindowSignals) -> tuple[int, int]:
        """(labelled rows, correct) of the window's own predictions, from the labels joined so far."""
        return window_accuracy(self.store.connection, window.model_version, window.start_time, window.end_time)

    def close(self) -> None:
        self.store.close()

    # -- internals ------------------------------------------------------------------------------

    def _expectations(self) -> dict[str, tuple[int, int]]:
        return {v: (r.feature_dim, r.n_classes) for v, r in self.references.items()}

    def _apply(self, kind: str, chunk: Chunk
               ) -> tuple[int, list[WindowSignals], list[JoinedLabel], list[LabelEvaluation]]:
        if chunk.rejections.total:
            self.quarantine.rows(kind, chunk.file, chunk.rejections)
        if kind == "labels":
            joined = self.joiner.add_labels(chunk.batch, self.watermark)
            return 0, [], joined, self._feed_labels(joined)
        batch: InferenceBatch = chunk.batch
        if len(batch):
            self.event_time.advance(float(batch.timestamp.max()))
        duplicate, joined = self.joiner.add_predictions(batch, self.watermark)
        if duplicate.any():
            self.store.add_counter(REJECTED_ROWS, DUPLICATE_REQUEST_ID, float(duplicate.sum()))
            batch = batch.take(~duplicate)
        evaluations = self._feed_labels(joined)
        windows: list[WindowSignals] = []
        now = self.clock()
        versions = _versions(batch.model_version)
        for version in versions:
            part = batch if versions.size == 1 else batch.take(batch.model_version == version)
            self.store.add_counter(ROWS, str(version), len(part))
            self.event_time.note_version(str(version), part.timestamp)
            tracker = self.versions.tracker(str(version))
            if tracker is None:
                self.store.add_counter(ROWS_WITHOUT_REFERENCE, str(version), len(part))
                continue
            windows += self._record(tracker.add(part, now=now))
        return len(batch), windows, joined, evaluations

    def _quarantine_rewritten(self, kind: str, info, before: FileProgress) -> None:
        """A file whose size or mtime changed after it was read: its rows were used as they were, so
        it is neither skipped silently nor read again; recorded (and counted) as ``rewritten``."""
        message = (f"{info.path}: rewritten in place after driftd read {before.rows_done} rows of it (size "
                   f"{before.size} -> {info.size} bytes, mtime {before.mtime:.3f} -> {info.mtime:.3f}); its new "
                   "content is NOT read. Producers must write new rows to new files; to re-read it, write it "
                   "under a new name")
        log.warning("%s", message)
        self.quarantine.file(kind, info, ContractError(message, reason=REWRITTEN, path=info.path), move=False)
        self._checkpoint()

    def _record(self, windows: list[WindowSignals]) -> list[WindowSignals]:
        """Count closed windows in the same transaction as the state that closed them, and keep
        them for the consumer until it acknowledges them (see :meth:`pending_windows`)."""
        for window in windows:
            self._latest[window.model_version] = window
            self.store.add_counter(WINDOWS, window.model_version, 1)
        self._handover.add_windows(windows)
        return windows

    def _feed_labels(self, joined: list[JoinedLabel]) -> list[LabelEvaluation]:
        by_version: dict[str, list[JoinedLabel]] = {}
        for j in joined:
            by_version.setdefault(j.model_version, []).append(j)
        evaluations: list[LabelEvaluation] = []
        for version, items in by_version.items():
            tracker = self.versions.tracker(version)
            if tracker is not None:
                evaluations += self._record_evaluations(tracker.add_labels(items))
                # Labels arrive after their window closed: keep the latest view's accuracy current.
                if version in self._latest:
                    self._latest[version] = dataclasses.replace(self._latest[version], accuracy=tracker.accuracy.stats())
        return evaluations

    def _record_evaluations(self, evaluations: list[LabelEvaluation]) -> list[LabelEvaluation]:
        """Keep label evaluations for the consumer until acknowledged (as :meth:`_record` windows)."""
        self._handover.add_evaluations(evaluations)
        return evaluations

    def _maybe_checkpoint(self) -> bool:
        """Commit when the last commit is a couple of seconds old; True when it did."""
        if self.clock() - self._last_commit >= _CHECKPOINT_EVERY_SECONDS:
            self._checkpoint()
            return True
        return False

    def _checkpoint(self) -> None:
        self.store.put_blob(STATE_BLOB, self._serialize())
        self.store.commit()
        self._last_commit = self.clock()

    def _online_fingerprint(self) -> dict:
        return dataclasses.asdict(self.config.signals.online_mmd)

    def _serialize(self) -> bytes:
        return EngineCheckpoint(
            online_config=self._online_fingerprint(),
            trackers={version: tracker.state_dict() for version, tracker in self.versions.trackers.items()},
            latest=self._latest,
            unacked=self._handover.windows,
            unacked_evaluations=self._handover.evaluations,
            version_times=self.version_times,
        ).to_bytes()

    def _restore(self) -> None:
        blob = self.store.get_blob(STATE_BLOB)
        if blob is None:
            return
        saved = EngineCheckpoint.from_bytes(blob, self.config.state_dir)
        keep_online = saved.online_config == self._online_fingerprint()
        if not keep_online:
            log.info("signals.online_mmd changed since the checkpoint: recalibrating the online detectors")
        for version, (state, meta) in saved.trackers.items():
            ref = self.references.get(version)
            if ref is None or ref.reference_id != meta["reference_id"]:
                log.info("reference of model_version %s changed since the checkpoint: its windows start afresh", version)
                continue
            if not keep_online:
                state = {k: v for k, v in state.items() if not k.startswith("online.")}
            self.versions.trackers[version] = WindowTracker(ref, self.config, state=(state, meta))
        self._latest = saved.latest
        self._handover = Handover(saved.unacked, saved.unacked_evaluations)
        self.event_time.version_times = saved.version_times


def _versions(model_version: np.ndarray) -> np.ndarray:
    """Distinct model versions of a batch; one version (the usual case) without sorting strings."""
    if model_version.size and bool((model_version == model_version[0]).all()):
        return model_version[:1]
    return np.unique(model_version)
