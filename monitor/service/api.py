"""The daemon's HTTP face: Prometheus metrics, health, status and the retrain control endpoints.

=======  ===========================  ======================================================
method   path                         answer
=======  ===========================  ======================================================
GET      /metrics                     Prometheus text format
GET      /healthz                     200 while the scheduler is alive, else 503
GET      /readyz                      200 once references are loaded and the first scan is done
GET      /api/v1/status               JSON status (see ``Daemon.status``)
POST     /api/v1/retrain              ``{"reason": "..."}`` -> 202 ``{"job_id": ...}``   (token)
GET      /api/v1/retrain/<id>         progress and outcome of one job                      (token)
=======  ===========================  ======================================================

Control endpoints need ``Authorization: Bearer <token>`` when a token is configured; without
a valid one the answer is 401 and nothing happens. Every request has one catch point: an
unexpected error is logged, counted and answered with 500.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from monitor.errors import DriftdError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
RETRAIN_PATH = "/api/v1/retrain"


class Backend(Protocol):
    """What the HTTP layer asks of the daemon."""

    def healthy(self) -> bool: ...
    def ready(self) -> tuple[bool, str]: ...
    def status(self) -> dict[str, Any]: ...
    def request_retrain(self, reason: str) -> str: ...
    def retrain_info(self, job_id: str) -> dict[str, Any] | None: ...
    def count_error(self, job: str) -> None: ...


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class ApiServer:
    """A ThreadingHTTPServer on its own thread; ``token()`` is read per request (SIGHUP may change it)."""

    def __init__(
        self, host: str, port: int, *, backend: Backend, registry: CollectorRegistry, token: Callable[[], str | None]
    ):
        handler = type("DriftdHandler", (_Handler,), {"backend": backend, "registry": registry, "token": staticmethod(token)})
        try:
            self.server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise DriftdError(
                f"cannot listen on {host}:{port}: {exc.strerror}; stop the other process or set http.port"
            ) from None
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="driftd-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        """Serve on the background thread (again-safe: a second call does nothing)."""
        if not self._thread.is_alive():
            self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    backend: Backend
    registry: CollectorRegistry
    token: Callable[[], str | None]
    server_version = "driftd"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        # the default writes to stderr with no level; headers (the token) are never logged
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            self._route(method, path)
        except HttpError as exc:
            self._json(exc.status, {"error": str(exc)})
        except DriftdError as exc:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
        except Exception:  # the one catch point per request: log, count, answer, keep serving
            log.exception("HTTP %s %s failed", method, path)
            self.backend.count_error("http")
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; see the driftd log"})

    def _route(self, method: str, path: str) -> None:
        routes: dict[str, tuple[str, Callable[[], None]]] = {
            "/metrics": ("GET", self._metrics),
            "/healthz": ("GET", self._healthz),
            "/readyz": ("GET", self._readyz),
            "/api/v1/status": ("GET", lambda: self._json(HTTPStatus.OK, self.backend.status())),
            RETRAIN_PATH: ("POST", self._retrain),
        }
        if path.startswith(RETRAIN_PATH + "/"):
            routes[path] = ("GET", lambda: self._retrain_info(path[len(RETRAIN_PATH) + 1:]))
        if path not in routes:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint {path}; see /api/v1/status, /metrics")
        allowed, action = routes[path]
        if method != allowed:
            raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} accepts {allowed}, not {method}")
        action()

    # -- endpoints -------------------------------------------------------------------------------
    def _metrics(self) -> None:
        self._send(HTTPStatus.OK, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    def _healthz(self) -> None:
        ok = self.backend.healthy()
        self._send(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, b"ok\n" if ok else b"scheduler not running\n")

    def _readyz(self) -> None:
        ok, why = self.backend.ready()
        self._send(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, (why + "\n").encode())

    def _retrain(self) -> None:
        self._authorize()
        body = self._body()
        reason = body.get("reason", "requested through the API")
        if not isinstance(reason, str) or not reason.strip():
            raise HttpError(HTTPStatus.BAD_REQUEST, '"reason" must be a non-empty string')
        job_id = self.backend.request_retrain(reason.strip())
        self._json(HTTPStatus.ACCEPTED, {"job_id": job_id, "status_url": f"{RETRAIN_PATH}/{job_id}"})

    def _retrain_info(self, job_id: str) -> None:
        self._authorize()
        info = self.backend.retrain_info(job_id)
        if info is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no retrain job {job_id!r}")
        self._json(HTTPStatus.OK, info)

    # -- plumbing --------------------------------------------------------------------------------
    def _authorize(self) -> None:
        expected = self.token()
        if expected is None:
            return  # loopback-only daemon without a token (config refuses this on other addresses)
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected.encode()):
            raise HttpError(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token (Authorization: Bearer <token>)")

    def _body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise HttpError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if length > MAX_BODY_BYTES:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise HttpError(HTTPStatus.BAD_REQUEST, 'body must be a JSON object such as {"reason": "..."}')
        return data

    def _json(self, status: HTTPStatus, data: Any) -> None:
        self._send(status, (json.dumps(data, allow_nan=False) + "\n").encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Bearer realm="driftd"')
        self.end_headers()
        self.wfile.write(body)
