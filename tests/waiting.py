"""Waiting in tests by progress, not by the wall clock.

A fixed timeout fails a correct system on a busy host. ``wait_until`` instead fails only when
nothing has moved for ``stall_seconds``: the deadline restarts whenever ``progress()`` returns
something new (rows ingested, windows closed, log lines written, a job's progress lines), so a
slow system that keeps working gets the time it needs and a stuck one is reported promptly,
with what it was last seen doing.
"""

from __future__ import annotations

import time
import urllib.error
from collections.abc import Callable
from typing import Any

STALL_SECONDS = 60.0
CPU_QUANTUM_SECONDS = 0.5   # CPU time counts as progress in steps this large (an idle daemon uses < 0.1 %)


def wait_until(what: Callable[[], Any], desc: str, *, progress: Callable[[], Any] = lambda: None,
               stall_seconds: float = STALL_SECONDS, poll_seconds: float = 0.1,
               check: Callable[[], None] = lambda: None, context: Callable[[], str] = lambda: "") -> Any:
    """Poll ``what()`` until it returns something truthy, and return that.

    ``check()`` raises when waiting is pointless (a process died); ``context()`` is appended to
    the failure message (logs). ``what`` raising OSError / URLError counts as not yet."""
    last = progress()
    moved_at = time.monotonic()
    while True:
        check()
        try:
            value = what()
        except (OSError, urllib.error.URLError):
            value = None
        if value:
            return value
        now = time.monotonic()
        current = progress()
        if current != last:
            last, moved_at = current, now
        elif now - moved_at > stall_seconds:
            raise AssertionError(f"waited for {desc}: no progress for {stall_seconds:.0f} s "
                                 f"(last seen: {last!r})\n{context()}")
        time.sleep(poll_seconds)


def cpu_progress(pid: int, quantum: float = CPU_QUANTUM_SECONDS) -> int | None:
    """A token that changes for every ``quantum`` seconds of CPU the process and its children
    used (None once it is gone): a process starting up (imports, loading) is busy, not stuck.
    The default quantum is coarse enough that an idle daemon's periodic cycles do not count."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        total = 0.0
        for p in procs:
            try:
                times = p.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                continue
    except psutil.NoSuchProcess:
        return None
    return int(total // quantum)
