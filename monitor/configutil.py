"""Reading one config section into typed values, collecting every error with its key path, and
the locations a config names (paths relative to the config file, or URIs).

Sections are parsed once at the edge (see ``monitor.config.load_config``); code inside
driftd only sees the frozen dataclasses the parsers build. Every section owner (the monitor
core, the policy, the service, retrain) builds on this module, which imports nothing of
driftd, so no owner needs another to read its own keys.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

T = TypeVar("T")

_MISSING: Any = object()


class Section:
    """A mapping from a config file plus the dotted path it came from.

    Every accessor records the key as known; :meth:`finish` reports keys nobody asked for,
    so a typo such as ``windw`` is an error rather than a silently ignored setting.
    """

    def __init__(self, data: Any, path: str, errors: list[str]):
        self.path = path
        self.errors = errors
        self._known: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            errors.append(f"{path or '<top>'}: expected a table/mapping, got {type(data).__name__}")
            data = {}
        self.data: Mapping[str, Any] = data

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self.data

    def _get(self, name: str, default: Any) -> Any:
        self._known.add(name)
        if name in self.data and self.data[name] is not None:
            return self.data[name]
        if default is _MISSING:
            self.errors.append(f"{self.key(name)}: required key is missing")
            return None  # accessors turn this into a typed placeholder; load_config raises before use
        return default

    def str(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if value is default or value is None:
            return "" if default is _MISSING else value
        if not isinstance(value, str) or not value:
            self.errors.append(f"{self.key(name)}: expected a non-empty string, got {value!r}")
            return default if default is not _MISSING else ""
        return value

    def optional_str(self, name: str) -> str | None:
        return self.str(name, None)

    def _number(self, name: str, default: Any, kind: type, minimum: float | None, maximum: float | None) -> Any:
        value = self._get(name, default)
        if value is default or value is None:
            return kind(0) if default is _MISSING else value
        ok_types = (int,) if kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_types):
            self.errors.append(f"{self.key(name)}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
            return default if default is not _MISSING else kind(0)
        if minimum is not None and value < minimum:
            self.errors.append(f"{self.key(name)}: must be >= {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            self.errors.append(f"{self.key(name)}: must be <= {maximum}, got {value!r}")
        return kind(value)

    def int(self, name: str, default: Any = _MISSING, *, minimum: int | None = None, maximum: int | None = None) -> Any:
        return self._number(name, default, int, minimum, maximum)

    def float(
        self, name: str, default: Any = _MISSING, *, minimum: float | None = None, maximum: float | None = None
    ) -> Any:
        return self._number(name, default, float, minimum, maximum)

    def bool(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if value is default or value is None:
            return False if default is _MISSING else value
        if not isinstance(value, bool):
            self.errors.append(f"{self.key(name)}: expected true or false, got {value!r}")
            return bool(default) if default is not _MISSING else False
        return value

    def choice(self, name: str, options: Sequence[str], default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if value is default or value is None:
            return options[0] if default is _MISSING else value
        if value not in options:
            self.errors.append(f"{self.key(name)}: must be one of {', '.join(map(repr, options))}, got {value!r}")
            return default if default is not _MISSING else options[0]
        return value

    def str_list(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if value is default or value is None:
            return () if default is _MISSING else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.errors.append(f"{self.key(name)}: expected a list of strings, got {value!r}")
            return default if default is not _MISSING else []
        return tuple(value)

    def section(self, name: str) -> "Section":
        self._known.add(name)
        return Section(self.data.get(name), self.key(name), self.errors)

    def sections(self, name: str) -> list["Section"]:
        """A list of tables, e.g. ``policy.rules``."""
        self._known.add(name)
        value = self.data.get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            self.errors.append(f"{self.key(name)}: expected a list of tables, got {type(value).__name__}")
            return []
        return [Section(item, f"{self.key(name)}[{i}]", self.errors) for i, item in enumerate(value)]

    def error(self, name: str, message: str) -> None:
        self.errors.append(f"{self.key(name)}: {message}")

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self._known)
        for name in unknown:
            allowed = ", ".join(sorted(self._known)) or "(none)"
            self.errors.append(f"{self.key(name)}: unknown key; allowed keys here: {allowed}")


_SECRET_QUERY_KEYS = ("access_key", "secret_key", "session_token")


def redact_location(location: str) -> str:
    """A location fit for logs and error messages: credentials a URI may carry (user:secret@ or
    access_key/secret_key/session_token options) replaced by ***.

    Works on the raw text, not a URI parse: an unencoded secret may contain "/" (AWS keys do),
    which would end a parser's authority early and leave the secret in the "path"."""
    if "://" not in location:
        return location
    scheme, rest = location.split("://", 1)
    head, sep, query = rest.partition("?")
    at = head.rfind("@")
    # user@ / user:secret@ before the bucket; an "@" deeper in a path without ":" before it is
    # taken as part of an object key (over-redacting a message is the safe mistake)
    if at >= 0 and ("/" not in head[:at] or ":" in head[:at]):
        head = "***" + head[at:]
    if query:
        query = "&".join(
            f"{item.partition('=')[0]}=***" if item.partition("=")[0] in _SECRET_QUERY_KEYS else item
            for item in query.split("&")
        )
    return f"{scheme}://{head}{sep}{query}"


def comparable_location(location: str) -> PurePosixPath:
    """A location as a path for containment checks: a URI becomes scheme/bucket/key (its query,
    e.g. an S3 endpoint, dropped), a local path stays itself."""
    if "://" not in location:
        return PurePosixPath(location)
    parts = urllib.parse.urlsplit(location)
    if parts.scheme == "file":  # the same files as the local path
        return PurePosixPath(parts.path)
    return PurePosixPath("/", parts.scheme, parts.netloc.rpartition("@")[2], parts.path.lstrip("/"))


def resolve_location(value: str, base: Path) -> str:
    """A path relative to the config file, or a URI (``s3://``, ``gs://``, ``file://``) unchanged."""
    if "://" in value:
        return value
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else (base / path).resolve())
