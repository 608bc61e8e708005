"""Why a cycle failed: state-directory faults (full filesystem, corruption, read-only, I/O) told
apart from everything else, each with a message that says what to do.

Kept apart from the checkpoint database (``monitor.ingest.store``) because only the daemon's
health reporting uses it: a fault that repeats every cycle is reported once, as a state.
"""

from __future__ import annotations

import errno
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from monitor.ingest.store import DB_NAME, restore_hint

FaultKind = Literal["disk_full", "corrupt", "read_only", "io", "other"]

# SQLite primary result codes (the low byte of sqlite_errorcode)
_SQLITE_KINDS: dict[int, FaultKind] = {13: "disk_full", 11: "corrupt", 26: "corrupt", 8: "read_only", 10: "io"}
_ERRNO_KINDS: dict[int, FaultKind] = {errno.ENOSPC: "disk_full", errno.EDQUOT: "disk_full", errno.EROFS: "read_only",
                                      errno.EIO: "io"}


@dataclass(frozen=True)
class Fault:
    """Why a cycle failed, grouped so a fault that repeats every cycle is reported once.

    ``kind`` is ``disk_full``, ``corrupt``, ``read_only`` or ``io`` for state-directory faults,
    ``other`` for anything else; ``message`` says what to do.
    """

    kind: FaultKind
    message: str

    @property
    def is_state_fault(self) -> bool:
        return self.kind != "other"

    @property
    def key(self) -> str:
        """What makes two failures the same state: the kind of a state fault (its message names
        whichever file hit it), the whole message of any other."""
        return self.kind if self.is_state_fault else f"{self.kind}: {self.message}"


def classify_fault(exc: BaseException, state_dir: Path) -> Fault:
    """Name the fault behind ``exc`` (or an exception it was raised from or during)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        kind = _fault_kind(cause)
        if kind is not None:
            return Fault(kind, _fault_message(kind, Path(state_dir), cause))
        cause = cause.__cause__ or cause.__context__
    return Fault("other", f"{type(exc).__name__}: {exc}")


def _fault_kind(exc: BaseException) -> FaultKind | None:
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(code, int) and (code & 0xFF) in _SQLITE_KINDS:
            return _SQLITE_KINDS[code & 0xFF]
        text = str(exc)
        if "disk is full" in text:
            return "disk_full"
        if "malformed" in text or "not a database" in text:
            return "corrupt"
        return None
    if isinstance(exc, OSError) and exc.errno in _ERRNO_KINDS:
        return _ERRNO_KINDS[exc.errno]
    return None


def _fault_message(kind: FaultKind, state_dir: Path, exc: BaseException) -> str:
    what = f"{type(exc).__name__}: {exc}"
    if kind == "disk_full":
        return (f"{state_dir}: the filesystem holding the state is full ({what}); free space or grow the volume: "
                "driftd keeps retrying and resumes from its last checkpoint, no row is lost or counted twice")
    if kind == "corrupt":
        return (f"{state_dir / DB_NAME}: the checkpoint database is corrupt ({what}); stop driftd and "
                f"{restore_hint(state_dir / DB_NAME)}")
    if kind == "read_only":
        return f"{state_dir}: the state directory became read-only ({what}); remount it read-write or fix its permissions"
    return f"{state_dir}: I/O error on the state directory ({what}); check the disk and the kernel log"
