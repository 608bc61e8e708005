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

The parts live apart: monitor.service.http_messages (what a request may carry, how an answer is
shaped) and monitor.service.http_server (waitress, its connection deadlines, the listening socket).
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from monitor.errors import DriftdError
from monitor.service.http_messages import (
    HttpError,
    Response,
    check_reason,
    json_response,
    probe_response,
    read_json_body,
)

log = logging.getLogger("driftd.http")

RETRAIN_PATH = "/api/v1/retrain"


class Backend(Protocol):
    """What the HTTP layer asks of the daemon."""

    def healthy(self) -> tuple[bool, str]: ...
    def ready(self) -> tuple[bool, str]: ...
    def status(self) -> dict[str, Any]: ...
    def request_retrain(self, reason: str) -> dict[str, Any]: ...  # {"job_id", "joined"}
    def retrain_info(self, job_id: str) -> dict[str, Any] | None: ...
    def count_error(self, job: str) -> None: ...


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
        self._status_body = Coalesced(lambda: json_response(HTTPStatus.OK, self.backend.status()))

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        method = environ["REQUEST_METHOD"]
        path = (environ.get("PATH_INFO") or "/").rstrip("/") or "/"
        try:
            status, body, content_type, headers = self._route(method, path, environ)
        except HttpError as exc:
            status, body, content_type, headers = json_response(exc.status, {"error": str(exc)}, exc.headers)
        except DriftdError as exc:
            status, body, content_type, headers = json_response(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
        except Exception:  # the one catch point per request: log, count, answer, keep serving
            log.exception("HTTP %s %s failed", method, path)
            self.backend.count_error("http")
            status, body, content_type, headers = json_response(HTTPStatus.INTERNAL_SERVER_ERROR,
                                                        {"error": "internal error; see the driftd log"})
        start_response(f"{status.value} {status.phrase}",
                       [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers])
        return [b""] if method == "HEAD" else [body]

    def _route(self, method: str, path: str, environ: dict[str, Any]) -> Response:
        routes: dict[str, tuple[str, Callable[[], Response]]] = {
            "/metrics": ("GET", self._metrics),
            "/healthz": ("GET", lambda: probe_response(self.backend.healthy())),
            "/readyz": ("GET", lambda: probe_response(self.backend.ready())),
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
        body = read_json_body(environ)
        unknown = sorted(set(body) - {"reason"})
        if unknown:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown field(s) {', '.join(map(repr, unknown))}; the body is "
                                                    '{"reason": "..."}')
        reason = check_reason(body.get("reason", "requested through the API"))
        ticket = self.backend.request_retrain(reason)
        job_id = ticket["job_id"]
        return json_response(HTTPStatus.ACCEPTED, {**ticket, "status_url": f"{RETRAIN_PATH}/{job_id}"})

    def _retrain_info(self, environ: dict[str, Any], job_id: str) -> Response:
        self._authorize(environ)
        info = self.backend.retrain_info(job_id)
        if info is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no retrain job {job_id!r}")
        return json_response(HTTPStatus.OK, info)

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

