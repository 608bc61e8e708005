"""What an HTTP request to driftd may carry and how its answers are shaped.

The request body's checks (Content-Length, size, a JSON object), the retrain reason's (one line of
printable text), the error every 4xx carries, and the JSON and probe answers. Apart from the routes
(monitor.service.api) so that what is accepted, and how it is refused, reads in one place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

MAX_BODY_BYTES = 64 * 1024
MAX_REASON_CHARS = 1000          # a retrain reason is one line: logs, job records, a Job annotation


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


def read_json_body(environ: dict[str, Any]) -> dict[str, Any]:
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


def json_response(status: HTTPStatus, data: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    return status, (json.dumps(data, allow_nan=False) + "\n").encode(), JSON, list(headers)


def probe_response(answer: tuple[bool, str]) -> Response:
    ok, why = answer
    return (HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE), (why + "\n").encode(), TEXT, []

