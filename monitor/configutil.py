"""Reading config files and sections into typed values, collecting every error with its key path,
and the locations a config names (paths relative to the config file, or URIs).

A section is declared once, as a frozen dataclass whose fields carry their defaults and, in
their metadata (:func:`setting`), their bounds, choices, whether they name a location, or a
reader of their own for the few keys no generic rule fits. :func:`parse_section` reads any such
dataclass from a :class:`Section`. Sections are parsed once at the edge (see
``monitor.config.load_config``); code inside driftd only sees the frozen dataclasses. Every
section owner (ingest, signals, the engine, the policy, the service, retrain) builds on this
module, which imports nothing of driftd but its errors, so no owner needs another to read its own
keys, and a layer below the whole file (retrain's launcher) can read its own section of it.
"""

from __future__ import annotations

import builtins
import dataclasses
import os
import re
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Final, TypeVar, cast, overload

import yaml

from monitor.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")
D = TypeVar("D", bound="DataclassInstance")


class _Missing:
    """The default of a required key (a distinct type, so accessors can be typed by it)."""

    def __repr__(self) -> builtins.str:
        return "MISSING"


MISSING: Final = _Missing()


class Section:
    """A mapping from a config file plus the dotted path it came from.

    Every accessor records the key as known; :meth:`finish` reports keys nobody asked for,
    so a typo such as ``windw`` is an error rather than a silently ignored setting. A
    required key that is missing is recorded as an error and read as a placeholder of its
    type ("" or 0): ``load_config`` raises before any placeholder is used.
    """

    def __init__(self, data: object, path: builtins.str, errors: list[builtins.str]):
        self.path = path
        self.errors = errors
        self._known: set[builtins.str] = set()
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            errors.append(f"{path or '<top>'}: expected a table/mapping, got {type(data).__name__}")
            data = {}
        self.data: Mapping[builtins.str, object] = data

    def key(self, name: builtins.str) -> builtins.str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: builtins.str) -> builtins.bool:
        return name in self.data

    def _get(self, name: builtins.str, required: builtins.bool) -> object:
        """The value, or None when absent or null (recording the error when it is required)."""
        self._known.add(name)
        value = self.data.get(name)
        if value is None and required:
            self.errors.append(f"{self.key(name)}: required key is missing")
        return value

    @overload
    def str(self, name: builtins.str) -> builtins.str: ...
    @overload
    def str(self, name: builtins.str, default: builtins.str) -> builtins.str: ...
    @overload
    def str(self, name: builtins.str, default: None) -> builtins.str | None: ...

    def str(self, name: builtins.str, default: builtins.str | None | _Missing = MISSING) -> builtins.str | None:
        return self._text(name, default)

    def _text(self, name: builtins.str, default: builtins.str | None | _Missing,
              options: Sequence[builtins.str] = ()) -> builtins.str | None:
        """A string, or one of ``options`` when given (the generic reader of both accessors)."""
        fallback = (options[0] if options else "") if isinstance(default, _Missing) else default
        value = self._get(name, isinstance(default, _Missing))
        if value is None:
            return fallback
        if options:
            if not isinstance(value, builtins.str) or value not in options:
                self.errors.append(f"{self.key(name)}: must be one of {', '.join(map(repr, options))}, got {value!r}")
                return fallback
        elif not isinstance(value, builtins.str) or not value:
            self.errors.append(f"{self.key(name)}: expected a non-empty string, got {value!r}")
            return fallback
        return value

    def _number(self, name: builtins.str, default: builtins.float | None | _Missing, integer: builtins.bool,
                minimum: builtins.float | None, maximum: builtins.float | None) -> builtins.float | None:
        fallback = (0 if integer else 0.0) if isinstance(default, _Missing) else default
        value = self._get(name, isinstance(default, _Missing))
        if value is None:
            return fallback
        ok = isinstance(value, builtins.int) if integer else isinstance(value, (builtins.int, builtins.float))
        if isinstance(value, builtins.bool) or not ok:
            self.errors.append(f"{self.key(name)}: expected {'an integer' if integer else 'a number'}, got {value!r}")
            return fallback
        number = cast("builtins.int | builtins.float", value)
        if minimum is not None and number < minimum:
            self.errors.append(f"{self.key(name)}: must be >= {minimum}, got {value!r}")
        if maximum is not None and number > maximum:
            self.errors.append(f"{self.key(name)}: must be <= {maximum}, got {value!r}")
        return builtins.int(number) if integer else builtins.float(number)

    @overload
    def int(self, name: builtins.str, default: builtins.int | _Missing = MISSING, *,
            minimum: builtins.int | None = None, maximum: builtins.int | None = None) -> builtins.int: ...
    @overload
    def int(self, name: builtins.str, default: None, *,
            minimum: builtins.int | None = None, maximum: builtins.int | None = None) -> builtins.int | None: ...

    def int(self, name: builtins.str, default: builtins.int | None | _Missing = MISSING, *,
            minimum: builtins.int | None = None, maximum: builtins.int | None = None) -> builtins.int | None:
        value = self._number(name, default, True, minimum, maximum)
        return None if value is None else builtins.int(value)

    @overload
    def float(self, name: builtins.str, default: builtins.float | _Missing = MISSING, *,
              minimum: builtins.float | None = None, maximum: builtins.float | None = None) -> builtins.float: ...
    @overload
    def float(self, name: builtins.str, default: None, *,
              minimum: builtins.float | None = None, maximum: builtins.float | None = None) -> builtins.float | None: ...

    def float(self, name: builtins.str, default: builtins.float | None | _Missing = MISSING, *,
              minimum: builtins.float | None = None, maximum: builtins.float | None = None) -> builtins.float | None:
        return self._number(name, default, False, minimum, maximum)

    def bool(self, name: builtins.str, default: builtins.bool | _Missing = MISSING) -> builtins.bool:
        fallback = False if isinstance(default, _Missing) else default
        value = self._get(name, isinstance(default, _Missing))
        if value is None:
            return fallback
        if not isinstance(value, builtins.bool):
            self.errors.append(f"{self.key(name)}: expected true or false, got {value!r}")
            return fallback
        return value

    @overload
    def choice(self, name: builtins.str, options: Sequence[builtins.str],
               default: builtins.str | _Missing = MISSING) -> builtins.str: ...
    @overload
    def choice(self, name: builtins.str, options: Sequence[builtins.str], default: None) -> builtins.str | None: ...

    def choice(self, name: builtins.str, options: Sequence[builtins.str],
               default: builtins.str | None | _Missing = MISSING) -> builtins.str | None:
        return self._text(name, default, options)

    def str_list(self, name: builtins.str, default: tuple[builtins.str, ...] | _Missing = MISSING) -> tuple[builtins.str, ...]:
        fallback = () if isinstance(default, _Missing) else default
        value = self._get(name, isinstance(default, _Missing))
        if value is None:
            return fallback
        if not isinstance(value, list) or not all(isinstance(v, builtins.str) for v in value):
            self.errors.append(f"{self.key(name)}: expected a list of strings, got {value!r}")
            return fallback
        return tuple(cast("list[builtins.str]", value))

    def section(self, name: builtins.str) -> Section:
        self._known.add(name)
        return Section(self.data.get(name), self.key(name), self.errors)

    def sections(self, name: builtins.str) -> list[Section]:
        """A list of tables, e.g. ``policy.rules``."""
        self._known.add(name)
        value = self.data.get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            self.errors.append(f"{self.key(name)}: expected a list of tables, got {type(value).__name__}")
            return []
        return [Section(item, f"{self.key(name)}[{i}]", self.errors) for i, item in enumerate(value)]

    def error(self, name: builtins.str, message: builtins.str) -> None:
        self.errors.append(f"{self.key(name)}: {message}")

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self._known)
        for name in unknown:
            allowed = ", ".join(sorted(self._known)) or "(none)"
            self.errors.append(f"{self.key(name)}: unknown key; allowed keys here: {allowed}")


# -- sections declared as dataclasses ---------------------------------------------------------

@dataclass(frozen=True)
class Reading:
    """What a field's own reader (``setting(parse=...)``) gets: its section and key, the field's
    default, the config file's directory, and the fields of the section read before it."""

    section: Section
    name: str
    default: object
    base: Path | None
    parsed: Mapping[str, object]


@dataclass(frozen=True)
class Rules:
    """A field's rules, kept in its metadata: bounds for numbers, choices for strings, whether a
    string or path names a location (resolved against the config file's directory), a reader of
    its own, or (``derived``) no key at all: the section's owner sets it after reading."""

    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    location: bool = False
    parse: Callable[[Reading], object] | None = None
    derived: bool = False


_RULES = "driftd.config"
_PLAIN = Rules()


def rules(*, minimum: float | None = None, maximum: float | None = None, choices: Sequence[str] = (),
          location: bool = False, parse: Callable[[Reading], object] | None = None,
          derived: bool = False) -> dict[str, Rules]:
    """Field metadata for a key without a default: ``x: str = field(metadata=rules(location=True))``."""
    return {_RULES: Rules(minimum, maximum, tuple(choices), location, parse, derived)}


def setting(default: T, *, minimum: float | None = None, maximum: float | None = None, choices: Sequence[str] = (),
            location: bool = False, parse: Callable[[Reading], object] | None = None, derived: bool = False) -> T:
    """A field with its default and its rules: ``batch_rows: int = setting(16_384, minimum=1)``."""
    return dataclasses.field(default=default, metadata=rules(
        minimum=minimum, maximum=maximum, choices=choices, location=location, parse=parse, derived=derived))


def parse_section(section: Section, cls: type[D], *, base: Path | None = None, finish: bool = True) -> D:
    """Read every field of the dataclass ``cls`` from ``section`` by its type and rules (nested
    dataclasses from the sub-section of the field's name), then report unknown keys unless
    ``finish`` is false (a section other owners read keys of too). Errors are collected in the
    section's error list; the result holds placeholders where a key was bad."""
    hints = typing.get_type_hints(cls)
    values: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        field_rules = f.metadata.get(_RULES, _PLAIN)
        if not isinstance(field_rules, Rules):
            raise TypeError(f"{cls.__name__}.{f.name}: metadata {_RULES!r} must come from setting() or rules()")
        if field_rules.derived:
            continue
        values[f.name] = _read(section, cls, f, hints[f.name], field_rules, base, values)
    if finish:
        section.finish()
    return cls(**values)


def _default(f: dataclasses.Field[object]) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING


def _read(section: Section, cls: type, f: dataclasses.Field[object], hint: object, r: Rules, base: Path | None,
          parsed: Mapping[str, object]) -> object:
    default = _default(f)
    if r.parse is not None:
        return r.parse(Reading(section, f.name, default, base, parsed))
    kind, optional = _unwrap(hint)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return parse_section(section.section(f.name), kind, base=base)
    required = isinstance(default, _Missing)
    if not required and default is None and not optional:
        raise TypeError(f"{cls.__name__}.{f.name}: a default of None needs an optional type")
    if kind is bool:
        return section.bool(f.name, cast("bool | _Missing", default))
    if kind is int or kind is float:
        number = cast("int | float | None | _Missing", default)
        return section._number(f.name, number, kind is int, r.minimum, r.maximum)
    if kind is str or kind is Path:
        text_default = str(default) if isinstance(default, Path) else cast("str | None | _Missing", default)
        text = section._text(f.name, text_default, r.choices)
        if text is None:
            return None
        if r.location and text:
            if base is None:
                raise TypeError(f"{cls.__name__}.{f.name} names a location: parse it with base=")
            text = resolve_location(text, base)
        return Path(text) if kind is Path else text
    if hint == tuple[str, ...]:
        return section.str_list(f.name, cast("tuple[str, ...] | _Missing", default))
    raise TypeError(f"{cls.__name__}.{f.name}: no generic reader for {hint!r}; give it setting(parse=...)")


def _unwrap(hint: object) -> tuple[object, bool]:
    """``X | None`` -> (X, True); anything else -> (hint, False)."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


# -- files -----------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no type stubs
    """PyYAML's safe loader with YAML 1.2's floats: YAML 1.1 wants a dot and a signed exponent,
    so ``lr_backbone: 1e-4`` was the string '1e-4' and a config error."""


_Loader.add_implicit_resolver(  # after 1.1's own float and int rules: only what they miss (1e-4, 1.5e3)
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_document(path: Path) -> object:
    """Parse a YAML (.yaml/.yml) or TOML (.toml) file into plain Python data."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; pass --config with an existing YAML or TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(text)
        return yaml.load(text, Loader=_Loader)  # safe: _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def raise_config_errors(source: builtins.str, errors: Sequence[builtins.str]) -> None:
    """Raise one ConfigError naming ``source`` and listing every error, when there are any."""
    if errors:
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(errors))


# -- locations ------------------------------------------------------------------------------

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
