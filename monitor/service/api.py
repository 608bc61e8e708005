"""The daemon's HTTP face: Prometheus metrics, health, status and the retrain control endpoints.

=======  ===========================  ======================================================
method   path                         answer
=======  ===========================  ======================================================
GET      /metrics                     Prometheus text format
GET      /healthz                     200 while cycles make progress, else 503 and why
GET      /readyz                      200 once references are loaded, the first scan is done
                                      and driftd is healthy; else 503 and why
GET      /api/v1/status               JSON status (see ``Daemon.status``)
POST     /api/v1/retrain              ``{"reason": "..."}`` -> 202 ``{"job_id": ...}``   (token)
GET      /api/v1/retrain/<id>         progress and outcome of one job                      (token)
=======  ===========================  ======================================================

GET routes also answer HEAD. Control endpoints need ``Authorization: Bearer <token>`` when a
token is configured; without a valid one the answer is 401 and nothing happens. Every request
has one catch point: an unexpected error is logged, counted and answered with 500; every bad
request is a 4xx that says what is wrong.

The server is waitress (HTTP/1.1 keep-alive and pipelining, strict request parsing: a bad or
negative Content-Length, an oversized body or header block is a 400/413/431 before our code
runs). One event loop reads every connection and hands only complete requests to a fixed pool
of ``http.threads`` workers, so idle or slow sockets never hold a thread; the standard library's
ThreadingHTTPServer this replaces started a thread per connection, unbounded (406 threads for 400
idle sockets). waitress has an idle timeout only, so this module adds the deadlines a request's
headers and body must arrive within (a client trickling one byte a second never goes idle).
"""

from __future__ import annotations

import hmac
import json
import logging
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import create_server

from monitor.errors import DriftdError
from monitor.service.config import HttpConfig

log = logging.getLogger("driftd.http")

MAX_BODY_BYTES = 64 * 1024
MAX_HEADER_BYTES = 32 * 1024
MAX_REASON_CHARS = 1000          # a retrain reason is one line: logs, job records, a Job annotation
RETRAIN_PATH = "/api/v1/retrain"
_RESERVED_FDS = 64               # descriptors kept for the state, logs and the retrain job
_LOOP_TICK = 1.0                 # event-loop poll timeout: deadline resolution and stop latency
GIL_SWITCH_SECONDS = 0.001       # see ApiServer.start


class Backend(Protocol):
    """What the HTTP layer asks of the daemon."""

    def healthy(self) -> tuple[bool, str]: ...
    def ready(self) -> tuple[bool, str]: ...
    def status(self) -> dict[str, Any]: ...
    def request_retrain(self, reason: str) -> dict[str, Any]: ...  # {"job_id", "joined"}
    def retrain_info(self, job_id: str) -> dict[str, Any] | None: ...
    def count_error(self, job: str) -> None: ...


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str, headers: Iterable[tuple[str, str]] = ()):
        super().__init__(message)
        self.status = status
        self.headers = list(headers)


Response = tuple[HTTPStatus, bytes, str, list[tuple[str, str]]]
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


def check_reason(value: Any) -> str:
    """A retrain reason as the API accepts it: one line of printable text, 1-1000 characters.

    It travels into logs, the job record, the job's command line (a NUL byte there crashed the
    job after the API had said 202) and a Kubernetes annotation.
    """
    if not isinstance(value, str) or not value.strip():
        raise HttpError(HTTPStatus.BAD_REQUEST, '"reason" must be a non-empty string')
    reason = value.strip()
    if len(reason) > MAX_REASON_CHARS:
        raise HttpError(HTTPStatus.BAD_REQUEST, f'"reason" is {len(reason)} characters; at most {MAX_REASON_CHARS}')
    for i, ch in enumerate(reason):
        if not ch.isprintable():
            raise HttpError(
                HTTPStatus.BAD_REQUEST,
                f'"reason" contains a non-printable character (U+{ord(ch):04X} at position {i}); send one line of printable text',
            )
    return reason


class Coalesced:
    """One render at a time; requests that arrive during a render share the next one.

    ``/metrics`` costs ~7 ms of Python (prometheus_client formats every sample) and
    ``/api/v1/status`` ~2 ms, under the GIL: 200 clients each asking in a loop would queue behind
    200 renders. Each caller gets a render that *started after it arrived* (never older data than
    a fresh render would give), and while one render runs, every caller arriving meanwhile waits
    for the next and shares it, so a burst costs two renders, not one per request.
    """

    def __init__(self, render: Callable[[], Any]):
        self._render = render
        self._cv = threading.Condition()
        self._started = 0      # renders begun
        self._done = 0         # renders finished; _result belongs to render number _done
        self._running = False
        self._result: tuple[bool, Any] = (True, None)  # (ok, value or exception)

    def __call__(self) -> Any:
        with self._cv:
            wanted = self._started + 1  # the first render that begins after this call
            while self._done < wanted:
                if not self._running:
                    self._running = True
                    self._started += 1
                    number = self._started
                    self._cv.release()
                    try:
                        try:
                            result: tuple[bool, Any] = (True, self._render())
                        except Exception as exc:  # every caller sharing this render sees its error
                            result = (False, exc)
                    finally:
                        self._cv.acquire()
                    self._result, self._done, self._running = result, number, False
                    self._cv.notify_all()
                else:
                    self._cv.wait()
            ok, value = self._result
        if not ok:
            raise value
        return value


class Api:
    """The WSGI application: routing, auth, the endpoints, one catch point per request."""

    def __init__(self, backend: Backend, registry: CollectorRegistry, token: Callable[[], str | None]):
        self.backend = backend
        self.registry = registry
        self.token = token
        self._metrics_body = Coalesced(lambda: generate_latest(self.registry))
        self._status_body = Coalesced(lambda: _json(HTTPStatus.OK, self.backend.status()))

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        method = environ["REQUEST_METHOD"]
        path = (environ.get("PATH_INFO") or "/").rstrip("/") or "/"
        try:
            status, body, content_type, headers = self._route(method, path, environ)
        except HttpError as exc:
            status, body, content_type, headers = _json(exc.status, {"error": str(exc)}, exc.headers)
        except DriftdError as exc:
            status, body, content_type, headers = _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
        except Exception:  # the one catch point per request: log, count, answer, keep serving
            log.exception("HTTP %s %s failed", method, path)
            self.backend.count_error("http")
            status, body, content_type, headers = _json(HTTPStatus.INTERNAL_SERVER_ERROR,
                                                        {"error": "internal error; see the driftd log"})
        start_response(f"{status.value} {status.phrase}",
                       [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers])
        return [b""] if method == "HEAD" else [body]

    def _route(self, method: str, path: str, environ: dict[str, Any]) -> Response:
        routes: dict[str, tuple[str, Callable[[], Response]]] = {
            "/metrics": ("GET", self._metrics),
            "/healthz": ("GET", lambda: _probe(self.backend.healthy())),
            "/readyz": ("GET", lambda: _probe(self.backend.ready())),
            "/api/v1/status": ("GET", self._status_body),
            RETRAIN_PATH: ("POST", lambda: self._retrain(environ)),
        }
        if path.startswith(RETRAIN_PATH + "/"):
            job_id = path[len(RETRAIN_PATH) + 1:]
            routes[path] = ("GET", lambda: self._retrain_info(environ, job_id))
        if path not in routes:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint {path}; see /api/v1/status, /metrics")
        allowed, action = routes[path]
        if method != allowed and not (method == "HEAD" and allowed == "GET"):
            allow = "GET, HEAD" if allowed == "GET" else allowed
            raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} accepts {allow}, not {method}", [("Allow", allow)])
        return action()

    # -- endpoints -------------------------------------------------------------------------------
    def _metrics(self) -> Response:
        return HTTPStatus.OK, self._metrics_body(), CONTENT_TYPE_LATEST, []

    def _retrain(self, environ: dict[str, Any]) -> Response:
        self._authorize(environ)
        body = _body(environ)
        unknown = sorted(set(body) - {"reason"})
        if unknown:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown field(s) {', '.join(map(repr, unknown))}; the body is "
                                                    '{"reason": "..."}')
        reason = check_reason(body.get("reason", "requested through the API"))
        ticket = self.backend.request_retrain(reason)
        job_id = ticket["job_id"]
        return _json(HTTPStatus.ACCEPTED, {**ticket, "status_url": f"{RETRAIN_PATH}/{job_id}"})

    def _retrain_info(self, environ: dict[str, Any], job_id: str) -> Response:
        self._authorize(environ)
        info = self.backend.retrain_info(job_id)
        if info is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no retrain job {job_id!r}")
        return _json(HTTPStatus.OK, info)

    def _authorize(self, environ: dict[str, Any]) -> None:
        expected = self.token()
        if expected is None:
            return  # loopback-only daemon without a token (config refuses this on other addresses)
        given = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, value = given.partition(" ")
        # latin-1: WSGI headers are latin-1 strings; compare bytes in constant time
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode("latin-1", "replace"),
                                                                  expected.encode()):
            raise HttpError(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token (Authorization: Bearer <token>)",
                            [("WWW-Authenticate", 'Bearer realm="driftd"')])


def _body(environ: dict[str, Any]) -> dict[str, Any]:
    """The JSON object in the request body ({} when empty). waitress has already refused a
    malformed or oversized Content-Length; this check stands on its own under any WSGI server."""
    raw_length = str(environ.get("CONTENT_LENGTH") or "0").strip()
    if not raw_length.isdigit() or not raw_length.isascii():
        raise HttpError(HTTPStatus.BAD_REQUEST, f"Content-Length {raw_length!r} is not a non-negative integer")
    length = int(raw_length)
    if length > MAX_BODY_BYTES:
        raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
    raw = environ["wsgi.input"].read(length) if length else b""
    if len(raw) != length:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"body is {len(raw)} bytes, Content-Length said {length}")
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HttpError(HTTPStatus.BAD_REQUEST, 'body must be a JSON object such as {"reason": "..."}')
    return data


def _json(status: HTTPStatus, data: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return status, (json.dumps(data, allow_nan=False) + "\n").encode(), JSON, list(headers)


def _probe(answer: tuple[bool, str]) -> Response:
    ok, why = answer
    return (HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE), (why + "\n").encode(), TEXT, []


# -- the server -----------------------------------------------------------------------------------

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
