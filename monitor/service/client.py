"""A small HTTP client for the running daemon (``driftd status`` / ``driftd retrain``)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from monitor.errors import DriftdError


class DaemonClient:
    """Talks to ``driftd run`` at ``base_url``; every failure is a DriftdError saying what to do."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError):
                message = exc.reason
            hint = {401: "; pass the token the daemon's http.token_file/token_env names"}.get(exc.code, "")
            raise DriftdError(f"driftd at {self.base_url} answered {exc.code} to {method} {path}: {message}{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DriftdError(f"cannot reach driftd at {self.base_url} ({reason}): is `driftd run` running?") from None
