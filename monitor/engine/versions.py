"""Which model_versions have a reference, and one :class:`WindowTracker` per such version.

Kept apart from the cycle (``monitor.engine.cycle``) because it is the engine's link to the
reference directory: loading the references, reloading them when one is added or rebuilt (a
promotion), looking once a cycle for the reference of a version seen in the logs without one,
and dropping a version's tracker when its reference changes, so its windows start afresh.
"""

from __future__ import annotations

import logging

from monitor.engine.config import MonitorConfig
from monitor.engine.reference import Reference, load_references
from monitor.engine.window import WindowTracker
from monitor.errors import ReferenceMissingError

log = logging.getLogger("monitor.engine")  # the engine's logger: log filters keep working


class VersionTrackers:
    """The references in ``config.reference_dir`` and the trackers of the versions seen so far.
    Raises ReferenceMissingError when the directory holds no reference."""

    def __init__(self, config: MonitorConfig):
        self.config = config
        self.references: dict[str, Reference] = load_references(config.reference_dir)
        if not self.references:
            raise ReferenceMissingError(
                f"no reference in {config.reference_dir}: build one from labelled validation logs with "
                f"`driftd reference build --logs PATH --out {config.reference_dir}`"
            )
        self.trackers: dict[str, WindowTracker] = {}
        self._warned_missing: set[str] = set()
        self._looked_up: set[str] = set()  # versions whose reference was looked for this cycle

    def new_cycle(self) -> None:
        """A cycle starts: versions without a reference may be looked for on disk again."""
        self._looked_up.clear()

    def reload(self) -> None:
        """Pick up references added or rebuilt since start-up (e.g. after a promotion).

        Raises ReferenceMissingError, keeping every reference already loaded, when the directory
        is gone, holds none, or one cannot be read: dropping them would silently stop the
        monitoring (and let a file of the wrong width through as if no reference expected one)."""
        root = self.config.reference_dir
        keeping = f"keeping the {len(self.references)} reference(s) already loaded"
        if not root.is_dir():
            raise ReferenceMissingError(f"{root}: reference directory is missing; {keeping}. Restore it, or "
                                        f"rebuild with `driftd reference build --out {root}`")
        fresh = load_references(root)  # a corrupt one raises, naming its file
        if not fresh:
            raise ReferenceMissingError(f"{root}: no reference found; {keeping}. Rebuild with "
                                        f"`driftd reference build --out {root}`")
        for version, ref in fresh.items():
            old = self.references.get(version)
            if old is None or old.reference_id != ref.reference_id:
                log.info("reference for model_version %s %s", version, "loaded" if old is None else "replaced")
                self.trackers.pop(version, None)
                self._warned_missing.discard(version)
        self.references = fresh

    def tracker(self, version: str) -> WindowTracker | None:
        """The tracker of ``version``, created on first use; None (warned once) when it has no
        reference, even after looking for one on disk once a cycle."""
        tracker = self.trackers.get(version)
        if tracker is not None:
            return tracker
        if version not in self.references and version not in self._looked_up:
            self._looked_up.add(version)  # once a cycle: the disk is not re-read for every chunk
            try:
                self.reload()  # a promotion may have just written it
            except ReferenceMissingError as exc:
                log.error("looking for the reference of model_version %s: %s", version, exc)
        ref = self.references.get(version)
        if ref is None:
            if version not in self._warned_missing:
                self._warned_missing.add(version)
                log.warning(
                    "rows for model_version %r but no reference for it in %s: its rows are counted and "
                    "labels joined, but no drift signals are computed; run `driftd reference build "
                    "--logs <validation logs of %s> --out %s`",
                    version, self.config.reference_dir, version, self.config.reference_dir,
                )
            return None
        tracker = self.trackers[version] = WindowTracker(ref, self.config)
        return tracker
