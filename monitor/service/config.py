"""The daemon's own config sections: ``http`` (where to listen, the control token, the server's
bounds) and ``scheduler`` (cycle interval, shutdown grace, when a stall makes driftd unhealthy).

The token itself never lives in the config file: ``http.token_file`` names a file holding it and
``http.token_env`` an environment variable; :func:`load_token` reads it when the daemon starts.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from monitor.configutil import Reading, Section, parse_section, setting
from monitor.errors import ConfigError


@dataclass(frozen=True)
class HttpConfig:
    host: str = setting("127.0.0.1")
    port: int = setting(9464, minimum=0, maximum=65535)
    token_file: Path | None = setting(None, location=True)  # file whose stripped content is the bearer token
    token_env: str | None = setting(None)     # or the name of an environment variable holding it
    # The server's bounds (monitor.service.http_server): a fixed pool runs requests; connections are read
    # by one event loop, so idle or slow sockets cost a file descriptor, never a thread.
    threads: int = setting(16, minimum=1, maximum=256)       # worker threads answering requests
    backlog: int = setting(1024, minimum=1, maximum=65535)   # listen() queue for connection bursts (capped by net.core.somaxconn)
    max_connections: int = setting(1000, minimum=1, maximum=100_000)  # open connections beyond this wait in the backlog
    header_timeout_seconds: float = setting(10.0, minimum=1.0)  # a request's line and headers must arrive within this
    body_timeout_seconds: float = setting(30.0, minimum=1.0)    # and its body within this after the headers
    idle_timeout_seconds: float = setting(75.0, minimum=1.0)    # keep-alive connections idle longer than this are closed

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):  # a wildcard bind is reached through loopback from this host
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    @property
    def has_token(self) -> bool:
        return self.token_file is not None or self.token_env is not None


UNHEALTHY_AFTER_INTERVALS = 5  # default scheduler.unhealthy_after_seconds, in cycle intervals


def _unhealthy_after(r: Reading) -> float:
    """Default 5 x interval_seconds; must exceed it, or the wait between two cycles is a stall."""
    interval = cast(float, r.parsed["interval_seconds"])
    value = r.section.float(r.name, None, minimum=0.1)
    if value is None:
        return UNHEALTHY_AFTER_INTERVALS * interval
    if value <= interval:
        r.section.error(r.name, f"must be more than interval_seconds ({interval:g}), or the wait "
                        f"between two cycles would count as a stall; the default is {UNHEALTHY_AFTER_INTERVALS} x interval_seconds")
    return value


@dataclass(frozen=True)
class SchedulerConfig:
    interval_seconds: float = setting(30.0, minimum=0.05)        # between ingest/evaluate cycles
    shutdown_grace_seconds: float = setting(30.0, minimum=0.1)   # SIGTERM: finish the batch and exit within this
    retrain_poll_seconds: float = setting(5.0, minimum=0.05)     # how often a running retrain's progress is read
    # /healthz, /readyz and the systemd watchdog fail once no cycle has made progress (succeeded
    # or committed a checkpoint) for this long while work is pending; default 5 x interval_seconds.
    unhealthy_after_seconds: float = setting(150.0, parse=_unhealthy_after)


@dataclass(frozen=True)
class ServiceConfig:
    http: HttpConfig = field(default_factory=HttpConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


def is_loopback(host: str) -> bool:
    """True for names/addresses that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_service(root: Section, base: Path) -> ServiceConfig:
    """Read ``http`` and ``scheduler`` from the top-level section; errors are collected in ``root``.

    A non-loopback ``http.host`` without ``token_file``/``token_env`` is an error: the control
    endpoints would be open to the network.
    """
    http = parse_section(root.section("http"), HttpConfig, base=base)
    if not is_loopback(http.host) and not http.has_token:
        root.error(
            "http.host",
            f"{http.host!r} is not a loopback address, so the control API needs a token: "
            "set http.token_file or http.token_env (or bind 127.0.0.1)",
        )
    return ServiceConfig(http=http, scheduler=parse_section(root.section("scheduler"), SchedulerConfig))


def load_token(http: HttpConfig, environ: Mapping[str, str] = os.environ) -> str | None:
    """The control token, or None when none is configured.

    Raises ConfigError when a token is configured but missing or empty (the daemon must not
    start with its control API silently open).
    """
    if http.token_file is not None:
        try:
            token = http.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"http.token_file: cannot read {http.token_file}: {exc.strerror}; create it with the token") from None
        if not token:
            raise ConfigError(f"http.token_file: {http.token_file} is empty; write the control token into it")
        return token
    if http.token_env is not None:
        token = environ.get(http.token_env, "").strip()
        if not token:
            raise ConfigError(f"http.token_env: environment variable {http.token_env} is unset or empty; export the token")
        return token
    return None
