"""systemd ``Type=notify`` support without a systemd library: datagrams to ``$NOTIFY_SOCKET``.

``NOTIFY_SOCKET`` is a filesystem path or an abstract name starting with ``@``. Without it
every call is a no-op, so the daemon behaves the same outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages; never raises (a missing supervisor must not stop the daemon)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self.address = address
        self.watchdog_usec = watchdog_usec

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Notifier":
        address = environ.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        raw = environ.get("WATCHDOG_USEC")
        if raw:
            try:
                usec = int(raw)
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%r: not an integer number of microseconds", raw)
            # WATCHDOG_PID names the process the watchdog is meant for; another one must not ping.
            pid = environ.get("WATCHDOG_PID")
            if pid and pid.isdigit() and int(pid) != os.getpid():
                usec = None
        return cls(address, usec if usec and usec > 0 else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the watchdog timeout, as systemd recommends."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def send(self, *messages: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True when delivered."""
        if self.address is None:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # never block the scheduler on a supervisor that stopped reading (queue full: EAGAIN)
                sock.setblocking(False)
                sock.connect(addr)
                sock.sendall("\n".join(messages).encode("utf-8"))
            return True
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")
