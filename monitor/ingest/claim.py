"""One writer per state directory: the ``state.lock`` flock, and the claim a daemon takes on its
state directory before it binds its HTTP port.

Kept apart from the checkpoint database (``monitor.ingest.store``) because it holds no data and is
taken earlier: it only keeps two engines from committing cursors and signal state in turn, each
overwriting the other's checkpoint. The kernel drops the lock when the process dies.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import IO

from monitor.errors import StateError

LOCK_NAME = "state.lock"


def take_lock(state_dir: Path) -> IO[str]:
    """One writer per state directory: two engines committing cursors and signal state in turn
    would each overwrite the other's checkpoint. The kernel drops the lock if the process dies."""
    lock_path = state_dir / LOCK_NAME
    try:
        handle = open(lock_path, "a+", encoding="utf-8")
    except OSError as exc:
        raise StateError(f"{lock_path}: cannot open the state lock: {exc.strerror}; fix the state directory's "
                         "permissions or point state_dir elsewhere") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise StateError(
            f"{state_dir}: already in use by another driftd (pid {holder}); stop it, or give this one its own "
            "state_dir (`driftd check` next to a running daemon needs a separate --state)"
        ) from None
    try:  # the pid only makes the refusal above more helpful: a full filesystem must not stop the start
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    except OSError:
        pass
    return handle


class StateClaim:
    """This process's hold on a state directory, taken before the checkpoint is opened.

    The daemon claims its state directory before it binds its HTTP port, so a second daemon on
    the same directory refuses without ever listening. :meth:`StateStore.open` in this process
    then adopts the claim (the same flock: a second ``open()`` + ``flock`` of the lock file would
    conflict with it), and closing the store releases it. :meth:`release` frees a claim that was
    never adopted (start-up failed before the store was opened).
    """

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self._key = _claim_key(state_dir)
        handle = take_lock(state_dir)
        with _CLAIMS_LOCK:
            if self._key in _CLAIMS:  # claimed twice in one process: the first claim still holds
                handle.close()
                raise StateError(f"{state_dir}: already claimed by this process; open its checkpoint first")
            _CLAIMS[self._key] = handle

    def release(self) -> None:
        with _CLAIMS_LOCK:
            handle = _CLAIMS.pop(self._key, None)
        if handle is not None:
            handle.close()


# Claims taken by this process and not yet adopted by StateStore.open (see StateClaim).
_CLAIMS: dict[str, IO[str]] = {}
_CLAIMS_LOCK = threading.Lock()


def _claim_key(state_dir: Path) -> str:
    return os.path.realpath(state_dir)


def claim_state_dir(state_dir: Path) -> StateClaim:
    """Create ``state_dir`` if needed and take its lock; raises StateError when another process holds it."""
    state_dir = Path(state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"{state_dir}: cannot create state directory: {exc.strerror}; fix its permissions or point state_dir elsewhere") from None
    return StateClaim(state_dir)


def adopt_claim(state_dir: Path) -> IO[str] | None:
    """The lock of a :class:`StateClaim` this process took on ``state_dir``, handed over to the
    store that opens it (None when there is none)."""
    with _CLAIMS_LOCK:
        return _CLAIMS.pop(_claim_key(state_dir), None)
