"""Health = progress: driftd is healthy while it gets its work done, not merely while it runs.

A daemon whose every cycle fails (a full state filesystem, a corrupt checkpoint) is alive but
useless, and a liveness probe that keeps answering 200 never gets it restarted or looked at. The
rule, shared by ``/healthz``, ``/readyz`` and the systemd watchdog:

    unhealthy  when  no progress for ``scheduler.unhealthy_after_seconds``  while work is pending

- *progress* is a cycle that succeeded, or a checkpoint committed by the cycle still running (a
  long cycle over a large file commits every few seconds, so it is not a stall; the commits of
  a cycle that then fails do not count: its work is not done, e.g. the policy state unsaved);
- *work is pending* while cycles fail (a failing cycle cannot tell whether it had work, and its
  rows are not committed), while a cycle runs, or when the last good cycle left files unread.
  An idle daemon with nothing to read stays healthy; if the scheduler stops starting cycles at
  all, that is a stall too.

:class:`Health` also groups failures into *states* (a :class:`~monitor.ingest.faults.Fault`: its
kind and message), so the daemon logs a fault that repeats every cycle once, when it starts,
and once more when it ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from monitor.ingest.faults import Fault


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    reason: str  # one line saying why, healthy or not


@dataclass
class FailureState:
    fault: Fault
    since: float        # first failure of this state
    count: int = 1      # cycles failed in this state


def _ago(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Health:
    """Thread-safe: the cycle job reports, HTTP threads and the watchdog ask."""

    def __init__(self, unhealthy_after: float, *, clock: Callable[[], float]):
        self.unhealthy_after = unhealthy_after
        self._clock = clock
        self._lock = threading.Lock()
        self._baseline = clock()            # progress is measured from here until the first one
        self._last_success: float | None = None
        self._cycle_progress: float | None = None  # last commit of the running cycle
        self._last_activity = self._baseline  # a cycle started or ended
        self._running_since: float | None = None
        self._backlog = True                # nothing scanned yet: the first scan is pending work
        self._failure: FailureState | None = None
        self._unhealthy = False             # as of the last check: its turn is logged once

    # -- reports (cycle thread) -----------------------------------------------------------------
    def restart_clock(self) -> None:
        """Loading references is over: measure stalls from now, not from process start."""
        with self._lock:
            self._baseline = self._last_activity = self._clock()

    def progress(self) -> None:
        """A checkpoint was committed (``StateStore.add_commit_listener``)."""
        now = self._clock()
        with self._lock:
            if self._running_since is not None:
                self._cycle_progress = now

    def cycle_started(self) -> None:
        now = self._clock()
        with self._lock:
            self._running_since = self._last_activity = now
            self._cycle_progress = None

    def cycle_succeeded(self, *, backlog: bool) -> FailureState | None:
        """Record a good cycle; returns the failure state it ended, if any (to log the recovery)."""
        now = self._clock()
        with self._lock:
            self._last_success = self._last_activity = now
            self._running_since = self._cycle_progress = None
            self._backlog = backlog
            ended, self._failure = self._failure, None
            return ended

    def cycle_failed(self, fault: Fault) -> tuple[FailureState, bool]:
        """Record a failed cycle; returns its failure state and whether that state is new."""
        now = self._clock()
        with self._lock:
            self._running_since = self._cycle_progress = None
            self._last_activity = now
            current = self._failure
            if current is not None and current.fault.key == fault.key:
                current.count += 1
                return current, False
            self._failure = FailureState(fault, now)
            return self._failure, True

    # -- questions (any thread) -----------------------------------------------------------------
    @property
    def failure(self) -> FailureState | None:
        with self._lock:
            return self._failure

    @property
    def last_success(self) -> float | None:
        with self._lock:
            return self._last_success

    def check(self) -> tuple[Verdict, bool]:
        """The verdict now, and whether it just turned unhealthy (for the daemon to log once)."""
        verdict = self._verdict()
        with self._lock:
            turned = not verdict.healthy and not self._unhealthy
            self._unhealthy = not verdict.healthy
        return verdict, turned

    def _verdict(self) -> Verdict:
        now = self._clock()
        limit = self.unhealthy_after
        with self._lock:
            last = max(t for t in (self._baseline, self._last_success, self._cycle_progress) if t is not None)
            stalled = now - last
            failure, running = self._failure, self._running_since
            pending = failure is not None or running is not None or self._backlog
            idle_for = now - self._last_activity
            last_success = self._last_success
        key = f"scheduler.unhealthy_after_seconds={limit:g}"
        if failure is not None:
            detail = (f"{failure.count} cycle(s) failed since {_when(failure.since)}: {failure.fault.message}")
        elif running is not None:
            detail = f"the running cycle (started {_ago(now - running)} ago) committed nothing"
        else:
            detail = "files are waiting to be read"
        if pending and stalled >= limit:
            return Verdict(False, f"no progress for {_ago(stalled)} ({key}): {detail}")
        if running is None and idle_for >= limit:
            return Verdict(False, f"no cycle started for {_ago(idle_for)} ({key}): the scheduler is not running cycles")
        if failure is not None:
            return Verdict(True, f"degraded, unhealthy in {_ago(limit - stalled)} unless a cycle succeeds: {detail}")
        if last_success is None:
            return Verdict(True, "ok: first scan in progress")
        return Verdict(True, f"ok: last cycle succeeded {_ago(now - last_success)} ago")
