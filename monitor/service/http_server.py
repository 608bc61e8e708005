"""The HTTP server driftd's API runs in: waitress on its own event-loop thread.

The server is waitress (HTTP/1.1 keep-alive and pipelining, strict request parsing: a bad or
negative Content-Length, an oversized body or header block is a 400/413/431 before our code
runs). One event loop reads every connection and hands only complete requests to a fixed pool
of ``http.threads`` workers, so idle or slow sockets never hold a thread; the standard library's
ThreadingHTTPServer this replaces started a thread per connection, unbounded (406 threads for 400
idle sockets). waitress has an idle timeout only, so this module adds the deadlines a request's
headers and body must arrive within (a client trickling one byte a second never goes idle).
"""

from __future__ import annotations

import logging
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import create_server

from monitor.errors import DriftdError
from monitor.service.api import Api, Backend
from monitor.service.config import HttpConfig
from monitor.service.http_messages import MAX_BODY_BYTES

log = logging.getLogger("driftd.http")

MAX_HEADER_BYTES = 32 * 1024
_RESERVED_FDS = 64               # descriptors kept for the state, logs and the retrain job
_LOOP_TICK = 1.0                 # event-loop poll timeout: deadline resolution and stop latency
GIL_SWITCH_SECONDS = 0.001       # see ApiServer.start


_TIMEOUT_BODY = b"request not received in time; send it whole\n"
_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


class _Parser(HTTPRequestParser):
    """waitress's parser, refusing request lines without HTTP/1.0 or HTTP/1.1 (it would answer
    ``GET /metrics HTTP/9.9`` or a version-less HTTP/0.9 line as if they were HTTP/1.0)."""

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        if self.version not in ("1.0", "1.1"):
            shown = f"HTTP/{self.version}" if self.version else "a request line without an HTTP version"
            raise ParsingError(f"{shown} is not supported; use HTTP/1.1")


class _Channel(HTTPChannel):
    """waitress's connection, plus read deadlines: a connection's first request must arrive
    within ``header_timeout`` of accept, later ones within it of their first byte, and a body
    within ``body_timeout`` of its headers. (Between requests waitress's idle timeout applies.)"""

    parser_class = _Parser
    header_timeout = 10.0
    body_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any):
        self._accepted = time.monotonic()
        self._received_any = False
        self._partial: Any = None          # the request being read, as last seen
        self._partial_since = 0.0
        self._headers_at: float | None = None
        super().__init__(*args, **kwargs)

    def received(self, data: bytes) -> bool:
        now = time.monotonic()
        self._received_any = True
        result = super().received(data)
        request = self.request  # None once every byte so far formed complete requests
        if request is None:
            self._partial, self._headers_at = None, None
        else:
            if request is not self._partial:
                self._partial, self._partial_since, self._headers_at = request, now, None
            if request.headers_finished and self._headers_at is None:
                self._headers_at = now
        return result

    def overdue(self, now: float) -> str | None:
        """Which deadline this connection missed, if any (event-loop thread)."""
        if self.requests or self.will_close or self.close_when_flushed:
            return None  # a request is being answered, or the connection is closing anyway
        if self.request is None:
            if not self._received_any and now - self._accepted > self.header_timeout:
                return "no request"
            return None
        if self._headers_at is None:
            return "headers" if now - self._partial_since > self.header_timeout else None
        return "body" if now - self._headers_at > self.body_timeout else None

    def time_out(self, what: str) -> None:
        log.debug("closing connection from %s: %s not received in time", self.addr, what)
        if what == "no request":
            self.will_close = True  # nothing was asked: nothing to answer
            return
        with self.outbuf_lock:
            self.outbufs[-1].append(_REQUEST_TIMEOUT)
            self.total_outbufs_len += len(_REQUEST_TIMEOUT)
        with self.requests_lock:
            self.request = None
            self.close_when_flushed = True


class _QuietWaitress(logging.Filter):
    """Client disconnects and a momentary queue of requests are normal under load: they go to
    driftd's log at DEBUG instead of waitress's INFO/WARNING (and are never counted as errors)."""

    QUIET = ("Client disconnected", "Task queue depth")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.QUIET):
            log.debug("%s", message)
            return False
        return True


_QUIET = _QuietWaitress()


def _file_limit(wanted: int) -> int:
    """Raise the soft open-file limit toward ``wanted`` (within the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else int(soft)


class ApiServer:
    """The HTTP server on its own event-loop thread; ``token()`` is read per request (SIGHUP may change it).

    The port is bound in the constructor, so a busy port fails before anything else starts.
    """

    def __init__(self, http: HttpConfig, *, backend: Backend, registry: CollectorRegistry,
                 token: Callable[[], str | None]):
        limit = _file_limit(http.max_connections + _RESERVED_FDS)
        connections = http.max_connections
        if limit - _RESERVED_FDS < connections:
            connections = max(1, limit - _RESERVED_FDS)
            log.warning("open-file limit %d allows %d HTTP connections, not http.max_connections=%d; raise the "
                        "limit (systemd LimitNOFILE=, ulimit -n) to allow more", limit, connections, http.max_connections)
        sock = _bind(http.host, http.port)
        self._map: dict[int, Any] = {}
        self.server = create_server(
            Api(backend, registry, token), map=self._map, sockets=[sock],
            threads=http.threads, backlog=http.backlog,
            connection_limit=connections + 2,  # the map also holds the listener and the loop's trigger
            channel_timeout=max(1, round(http.idle_timeout_seconds)), cleanup_interval=1,
            max_request_header_size=MAX_HEADER_BYTES, max_request_body_size=MAX_BODY_BYTES,
            asyncore_use_poll=True,  # select() cannot watch descriptors above 1024
            log_socket_errors=False, expose_tracebacks=False, ident="driftd",
        )
        self.server.channel_class = type("DriftdChannel", (_Channel,), {
            "header_timeout": http.header_timeout_seconds, "body_timeout": http.body_timeout_seconds})
        for name in ("waitress", "waitress.queue"):
            logger = logging.getLogger(name)
            if _QUIET not in logger.filters:
                logger.addFilter(_QUIET)
        self.threads = http.threads
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="driftd-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.effective_port)

    def start(self) -> None:
        """Serve on the background thread (again-safe: a second call does nothing)."""
        if not self._thread.is_alive() and not self._stop.is_set():
            # The event loop needs the GIL for a moment per socket event; at CPython's default
            # 5 ms switch interval it waits behind every render. 1 ms, measured with 200 clients
            # (bench/README.md): 551 -> 808 requests/s, p99 817 -> 676 ms, under a higher load.
            if sys.getswitchinterval() > GIL_SWITCH_SECONDS:
                sys.setswitchinterval(GIL_SWITCH_SECONDS)
            self._thread.start()

    def _loop(self) -> None:
        next_check = 0.0
        while not self._stop.is_set():
            wasyncore.loop(timeout=_LOOP_TICK, map=self._map, use_poll=True, count=1)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + _LOOP_TICK
                for channel in list(self._map.values()):
                    if isinstance(channel, _Channel):
                        what = channel.overdue(now)
                        if what is not None:
                            channel.time_out(what)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self.server.pull_trigger()  # wake the loop from its poll
            self._thread.join(timeout=5)
        self.server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        wasyncore.close_all(self._map)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise DriftdError(f"cannot listen on {host}:{port}: {exc}; check http.host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while old connections linger
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" also serves IPv4
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise DriftdError(
            f"cannot listen on {host}:{port}: {exc.strerror}; stop the other process or set http.port"
        ) from None
    return sock
