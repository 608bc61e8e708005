"""Log set-up for ``driftd run``: human-readable lines by default, JSON lines for log shippers."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import TextIO

FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# LogRecord attributes that are not user-supplied ``extra`` fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC ISO 8601), level, logger, message, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(fmt: str, level: str = "INFO", stream: TextIO = sys.stderr) -> None:
    """Replace the root handlers with one writing ``fmt`` ("text" or "json") to ``stream``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    root.addHandler(handler)
    root.setLevel(level)
    # APScheduler logs every run at INFO and every coalesced/skipped run of a slow cycle at WARNING;
    # job failures are logged by the daemon's own catch points, with context.
    logging.getLogger("apscheduler").setLevel(max(logging.ERROR, root.level))
